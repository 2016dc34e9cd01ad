"""The distill script as a process (slow; the in-process checks of bad configs are in
test_checks.py): --help, a bad config rejected before Ray starts, and the real deployment path,
`ray job submit --working-dir . -- python pipelines/distill.py --config ...` against a
`ray start --head` cluster on loopback that the test starts and stops."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DISTILL = REPO / "pipelines" / "distill.py"
VENV_BIN = str(Path(sys.executable).parent)


def _run(args, timeout=120, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(DISTILL), *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd
    )


@pytest.mark.slow
def test_the_script_prints_help_and_refuses_a_bad_config_before_ray_starts(tmp_path):
    """The script as a process; every refusal is checked in-process in test_checks.py."""
    r = _run(["--help"])
    assert r.returncode == 0 and "train.budget_tokens" in r.stdout
    r = _run(["--set", "data.sources=[/no/such/dir/teacher_samples.jsonl]"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.sources[0]: '/no/such/dir/teacher_samples.jsonl' does not exist" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- ray job submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def head_node(tmp_path):
    """`ray start --head --block` on loopback with its own temp dir (so no other process on this
    machine discovers it) and Ray token authentication, as on a real cluster; stopping the blocking
    process stops exactly this cluster. The token is private to the test (RAY_AUTH_TOKEN_PATH), so
    the real ~/.ray is never read or written."""
    port, dash = _free_port(), _free_port()
    # Every port the head binds is picked here: other Ray clusters on this machine already hold
    # the defaults (the dashboard agent's 52365, the client server's 10001, ...).
    ports = {
        flag: _free_port()
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    temp = tempfile.mkdtemp(prefix="lrjob", dir="/tmp")  # short: socket paths live under it
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [
            os.path.join(VENV_BIN, "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            *(f"--{flag}={p}" for flag, p in ports.items()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # The one endpoint besides health checks that answers without the token.
        _wait_http(f"http://127.0.0.1:{dash}/api/authentication_mode", timeout=180)
        with pytest.raises(urllib.error.HTTPError) as refused:  # the Jobs API wants the token
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        yield f"http://127.0.0.1:{dash}", env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(head_node, tmp_path, cache_dir, tiny_model_dir):
    from linearard_ray.data.corpus import iter_sotu

    address, env = head_node
    tiny_model_dir("llama")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": d["text"][:2500]}) + "\n" for _, d in zip(range(4), iter_sotu("train"), strict=False)
        )
    )
    cfg = {
        "model": {"teacher": "tiny:llama"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": [str(corpus)], "ctx_len": 64, "output_dir": str(tmp_path / "data")},
        "train": {
            "run_name": "job",
            "storage_path": str(tmp_path / "ray"),
            "output_dir": str(tmp_path / "students"),
            "max_steps": 3,
            "checkpoint_every": 2,
            "cpus_per_worker": 1,
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "job"},
        # train.evaluate_at_end runs the evaluation stage on the exported student, kept tiny here
        "eval": {
            "short_lengths": [64],
            "long_lengths": [128],
            "passkey_lengths": [],
            "max_windows": 1,
            "relation_kl": False,
            "other_texts": [],
        },
    }
    cfg["train"]["evaluate_at_end"] = True
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    runtime_env = {
        "env_vars": {
            "LINEARARD_CACHE": str(cache_dir),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    cmd = [
        os.path.join(VENV_BIN, "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "pipelines/distill.py",
        "--config",
        str(cfg_path),
    ]
    deadline = time.time() + 120
    while True:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        out = r.stdout + r.stderr
        # the dashboard answers before the head's job agent has registered
        if r.returncode == 0 or "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    assert "[distill] step 3/3" in out
    assert f"[distill] student: {tmp_path / 'students' / 'job' / 'merged'}" in out
    assert (tmp_path / "students" / "job" / "merged" / "config.json").exists()
    assert "[distill] MLflow run:" in out
    assert "[distill] evaluation done" in out
    report = json.loads((tmp_path / "students" / "job" / "merged" / "eval" / "report.json").read_text())
    assert report["mlflow"]["run_id"]
