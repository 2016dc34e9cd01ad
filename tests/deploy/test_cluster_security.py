"""cluster.yaml's security: token auth on every node, the head's secrets (made once, 0600, never
printed), their way to the workers, MLflow's password, and the security group Ray builds from it.

The secret-making snippets run for real in a private HOME, with the installed `ray` CLI; the group's
rules are merged by the Ray launcher's own function, as `ray up` would merge them.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
TOKEN = "~/.ray/auth_token"  # Ray 2.60's default token path: every Ray process on a node finds it there
MLFLOW_ENV = "~/.linearard/mlflow.env"
BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _secret_snippets(raw: dict) -> list[str]:
    return [c for c in raw["head_setup_commands"] if "auth_token" in c or "get-auth-token" in c or "mlflow.env" in c]


def _run_head_setup(raw: dict, home: Path) -> subprocess.CompletedProcess:
    """The head's secret-making commands, in order, as `ray up` runs them (one bash per command)."""
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    env = {
        "HOME": str(home),
        "PATH": BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "RAY_AUTH_MODE": "token",  # as ~/.bashrc sets it on the node
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    out, err = "", ""
    for cmd in [c for c in raw["head_setup_commands"] if c in _secret_snippets(raw) or "basic_auth.ini" in c]:
        r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out, err = out + r.stdout, err + r.stderr
    return subprocess.CompletedProcess(["head_setup"], 0, out, err)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow  # three `ray` CLI start-ups (imports take seconds on a shared 2-core box)
def test_head_makes_its_secrets_once_private_and_silently(raw, tmp_path):
    home = tmp_path / "home"
    first = _run_head_setup(raw, home)
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert len(token) == 64 and int(token, 16) >= 0, "a 256-bit hex token"
    assert _mode(token_file) == 0o600 and _mode(token_file.parent) == 0o700
    creds = home / ".linearard" / "mlflow.env"
    assert _mode(creds) == 0o600
    password = _sourced(creds, "MLFLOW_TRACKING_PASSWORD")
    assert len(password) >= 32 and _sourced(creds, "MLFLOW_TRACKING_USERNAME") == "admin"
    for secret in (token, password):  # ray up logs the commands' output: no secret may be in it
        assert secret not in first.stdout + first.stderr
    # A second `ray up` keeps both: workers and the MLflow user store hold the first ones.
    _run_head_setup(raw, home)
    assert token_file.read_text().strip() == token and _sourced(creds, "MLFLOW_TRACKING_PASSWORD") == password
    # Ray's own loader reads the token back from the default path.
    probe = "from ray._raylet import AuthenticationTokenLoader as L; print(L.instance().get_raw_token(True))"
    r = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "HOME": str(home)}, capture_output=True, text=True
    )
    assert r.stdout.strip() == token, r.stderr[-2000:]


def _sourced(path: Path, name: str) -> str:
    r = subprocess.run(["bash", "-c", f'source "{path}"; printf %s "${name}"'], capture_output=True, text=True)
    return r.stdout


def _mlflow_auth_config_module():
    """mlflow.server.auth.config alone: the package's __init__ needs Flask-WTF (the `mlflow[auth]`
    extra the cluster installs), the config reader does not."""
    mlflow = pytest.importorskip("mlflow")
    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_auth_config_is_read_by_mlflow(raw, tmp_path, monkeypatch):
    """The basic-auth config the head writes is valid for MLflow's own reader; the admin password
    comes from the environment at server start, never from the file."""
    cmd = next(c for c in raw["head_setup_commands"] if "basic_auth.ini" in c)
    (tmp_path / "mlflow").mkdir()
    subprocess.run(["bash", "-c", cmd], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    ini = tmp_path / "mlflow" / "basic_auth.ini"
    assert _mode(ini) == 0o600
    parsed = configparser.ConfigParser()
    parsed.read_string(ini.read_text())
    assert "admin_password" not in parsed["mlflow"]
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    cfg = _mlflow_auth_config_module().read_auth_config()
    assert cfg.admin_username == "admin" and cfg.admin_password == "from-the-environment"
    assert cfg.default_permission == "NO_PERMISSIONS"
    assert cfg.database_uri == "sqlite:////home/ubuntu/mlflow/basic_auth.db"


def test_token_auth_on_every_node_and_secrets_reach_the_workers(raw):
    # Every later command of every node (ray start, ray status, ray job submit on the head).
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in raw["setup_commands"])
    # The autoscaler on the head copies these to each worker before its setup (rsync over SSH).
    assert set(raw["cluster_synced_files"]) == {TOKEN, MLFLOW_ENV}
    made = " ".join(_secret_snippets(raw))
    assert "ray get-auth-token --generate > /dev/null" in made and "umask 077" in made
    assert MLFLOW_ENV in made
    everything = yaml.safe_dump(raw)
    for leak in (
        "cat ~/.ray/auth_token",
        "get-auth-token\n",
        "RAY_AUTH_MODE=disabled",
        "echo $MLFLOW_TRACKING_PASSWORD",
    ):
        assert leak not in everything, leak


def test_security_group_admits_ssh_from_one_cidr_and_the_cluster_only(raw):
    """The rules `ray up` writes into a new group (Ray's merge of its defaults with ours): traffic
    from the group itself, SSH, and nothing else from anywhere."""
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    group = raw["provider"]["security_group"]
    assert group["GroupName"]
    ours = group["IpPermissions"]
    assert ours, "no rule of our own: SSH from the user's CIDR"
    for rule in ours:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
        cidrs = [r["CidrIp"] for r in rule["IpRanges"]]
        assert cidrs and "0.0.0.0/0" not in cidrs and not rule.get("Ipv6Ranges"), "AWS refuses a duplicate world rule"
    merged = _create_default_inbound_rules({"sg-cluster"}, ours)
    for rule in merged:
        if rule.get("UserIdGroupPairs"):
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == ["sg-cluster"] and not rule.get("IpRanges")
        else:
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), f"a port open beyond the cluster: {rule}"
    lines = CLUSTER_YAML.read_text().splitlines()
    cidr_line = next(i for i, line in enumerate(lines) if "CidrIp:" in line and not line.lstrip().startswith("#"))
    assert "# EDIT:" in lines[cidr_line - 1] + lines[cidr_line]
