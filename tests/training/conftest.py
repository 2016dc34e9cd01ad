"""A `ray start --head` cluster on loopback for the tests that submit jobs to it with
`ray job submit`, the way users run the pipeline on a cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.local_ray import head_port_flags, local_ray, stop_head, wait_head_started

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


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


@dataclass
class HeadNode:
    address: str  # the dashboard (Jobs API)
    env: dict[str, str]  # what `ray job submit` needs to reach it: the token settings
    temp_dir: Path  # the head's --temp-dir: its sessions, with each job's copy of its working_dir

    def submit(self, runtime_env: dict, entrypoint: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` from the repository root, waiting for the job's end."""
        cmd = [
            os.path.join(VENV_BIN, "ray"),
            "job",
            "submit",
            "--address",
            self.address,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
        ]
        deadline = time.time() + 120
        while True:
            r = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
            # the dashboard answers before the head's job agent has registered
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
                return r
            time.sleep(3)

    def submit_distill(self, cfg: dict, tmp_path: Path, cache_dir: Path, **env_vars: str) -> str:
        """`pipelines/distill.py` on ``cfg`` (written to tmp_path/job.yaml), submitted with the
        tests' model cache and offline; its output, once it has succeeded."""
        cfg_path = tmp_path / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = {"LINEARARD_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = self.submit(
            {"env_vars": {**env, **env_vars}}, ["python", "pipelines/distill.py", "--config", str(cfg_path)]
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        return out


def small_corpus(path: Path, docs: int = 4, chars: int = 2500) -> Path:
    """A jsonl of the first ``docs`` SOTU addresses cut to ``chars`` characters: a few token blocks."""
    from linearard_ray.data.corpus import iter_sotu

    texts = (d["text"][:chars] for _, d in zip(range(docs), iter_sotu("train"), strict=False))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def ray_cluster(cache_dir):
    """A local Ray cluster (4 CPUs) for one test module's in-process runs of run_distill."""
    with local_ray(num_cpus=4, cache_dir=cache_dir):
        yield


def _start_head(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, int, str] | None:
    """One `ray start --head --block` on loopback with its own temp dir: (process, dashboard port,
    temp dir) once the node runs, or None (stopped, temp dir removed) if the start failed."""
    ports = head_port_flags()
    temp = tempfile.mkdtemp(prefix="lrjob", dir="/tmp")  # short: socket paths live under it
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [
                os.path.join(VENV_BIN, "ray"),
                "start",
                "--head",
                "--block",
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
    if wait_head_started(head, log_path, timeout=180):
        return head, ports["dashboard-port"], temp
    stop_head(head, grace_s=5)
    shutil.rmtree(temp, ignore_errors=True)
    return None


@pytest.fixture
def head_node(tmp_path):
    """`ray start --head --block` on loopback with its own temp dir (so no other process on this
    machine discovers it) and Ray token authentication, as on a real cluster; stopping the blocking
    process stops exactly this cluster. The token is private to the test (RAY_AUTH_TOKEN_PATH), so
    the real ~/.ray is never read or written, and no MLflow server of the caller's shell is used."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
    }
    for inherited in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LINEARARD_HOME"):
        env.pop(inherited, None)  # the token would win over the file; the others would redirect the job
    # Ray gives its raylet a fixed 30 s to register; on a loaded 2-core machine that can pass, and
    # the node exits ("timed out during startup"). A second start is what a user would do.
    started = _start_head(env, tmp_path / "head.log") or _start_head(env, tmp_path / "head-again.log")
    assert started is not None, (tmp_path / "head-again.log").read_text()[-3000:]
    head, dash, temp = started
    try:
        # The one endpoint besides health checks that answers without the token.
        _wait_http(f"http://127.0.0.1:{dash}/api/authentication_mode", timeout=180)
        with pytest.raises(urllib.error.HTTPError) as refused:  # the Jobs API wants the token
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        yield HeadNode(f"http://127.0.0.1:{dash}", env, Path(temp))
    finally:
        # after a job, Ray's orderly stop waits about 30 s for its processes: half a minute per test
        stop_head(head, grace_s=5)
        shutil.rmtree(temp, ignore_errors=True)
