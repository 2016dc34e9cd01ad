"""The README's local-cluster lines, run as written: token auth set up, a head started, the job
submitted and its status read, all with Ray 2.60 token authentication on.

The test adds only what isolation needs: a private HOME (the token file never touches the real
~/.ray), free ports, a private --temp-dir, and --block on `ray start` so that stopping exactly this
head is possible; it does not run the README's `ray stop`, which stops every Ray process of the
machine. Submission and status reach the head through RAY_API_SERVER_ADDRESS (the free dashboard
port) instead of the default http://localhost:8265; the lines themselves are the README's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.local_ray import head_port_flags, stop_head

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- local-ray-cluster -->\s*```bash\n(.*?)```\s*<!-- /local-ray-cluster -->", re.S)
MODEL_CACHE = Path.home() / ".cache" / "linearard_ray"  # the real one: the test's HOME is private


def readme_local_cluster_lines() -> list[str]:
    found = BLOCK.findall(README.read_text())
    assert len(found) == 1, "README.md must hold exactly one local-ray-cluster block"
    return [line for line in found[0].splitlines() if line.strip()]


def _is(line: str, *words: str) -> bool:
    return shlex.split(line, comments=True)[: len(words)] == list(words)


def test_readme_block_sets_up_token_auth_before_the_head():
    """Fast: the block's order is what makes `ray job submit` work (the mode and the token exist
    before `ray start`; submit and status run in the same shell)."""
    lines = readme_local_cluster_lines()
    start = next(i for i, line in enumerate(lines) if _is(line, "ray", "start", "--head"))
    before = lines[:start]
    assert any(_is(line, "export", "RAY_AUTH_MODE=token") for line in before)
    assert any("ray get-auth-token --generate > /dev/null" in line and "umask 077" in line for line in before)
    assert "--dashboard-host=127.0.0.1" in shlex.split(lines[start], comments=True)
    after = lines[start + 1 :]
    assert any(_is(line, "ray", "job", "submit") for line in after)
    assert any(_is(line, "ray", "job", "status") for line in after)


def _wait_for_token_mode(url: str, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the dashboard answers its public auth-mode endpoint, which must say "token"."""
    end = time.time() + timeout
    while time.time() < end:
        assert head.poll() is None, f"the head exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=2) as r:
                assert json.load(r) == {"authentication_mode": "token"}
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def default_model_cache(tmp_path: Path) -> Path:
    """A model cache holding the embedded default's model: the real one when the converted
    SmolLM2 is there, else a stand-in (a tiny random Llama under the same name, its window widened
    to the default's lengths) so that the README's lines still run offline on a fresh machine.
    The lines exercise the cluster path (auth, submission, status), not the model."""
    from linearard_ray.models.loading import COMPLETE_MARKER
    from linearard_ray.models.tiny import resolve_tiny

    if (MODEL_CACHE / "models" / "smollm2-135m" / COMPLETE_MARKER).exists():
        return MODEL_CACHE
    cache = tmp_path / "model_cache"
    stand_in = cache / "models" / "smollm2-135m"
    shutil.copytree(resolve_tiny("tiny:llama", cache), stand_in)
    config = json.loads((stand_in / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (stand_in / "config.json").write_text(json.dumps(config))
    (stand_in / COMPLETE_MARKER).write_text("stand-in\n")
    return cache


def _env(home: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no inherited auth mode
    env.update(
        HOME=str(home),
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        RAY_USAGE_STATS_ENABLED="0",
        LINEARARD_CACHE=str(cache),  # the default model at hand: no network in tests
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.mark.slow
def test_readme_local_cluster_runs_as_written(tmp_path):
    lines = readme_local_cluster_lines()
    start = next(i for i, line in enumerate(lines) if _is(line, "ray", "start", "--head"))
    ports = head_port_flags()
    temp = tempfile.mkdtemp(prefix="lrreadme", dir="/tmp")  # short: socket paths live under it
    isolation = [f"--{flag}={port}" for flag, port in ports.items()]
    isolation += [f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--block"]
    head_cmd = shlex.join(shlex.split(lines[start], comments=True) + isolation)
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, default_model_cache(tmp_path))
    head_log = tmp_path / "head.log"
    setup = "\n".join(["set -e", *lines[:start], f"exec {head_cmd}"])
    with open(head_log, "w") as log:
        head = subprocess.Popen(
            ["bash", "-c", setup], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        _wait_for_token_mode(dashboard, head, head_log)
        token = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
        rest = [line for line in lines if line != lines[start] and not _is(line, "ray", "stop")]
        client = {**env, "RAY_API_SERVER_ADDRESS": dashboard}
        r = subprocess.run(
            ["bash", "-c", "\n".join(["set -e", *rest])],
            cwd=ROOT,
            env=client,
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-5000:]
        assert out.count("Job 'try-1' succeeded") == 2, out[-5000:]  # once from submit, once from status
        assert "[distill] step 2/2" in out
        assert token.read_text().strip() not in out, "the token was printed"
        # The head really demands the token: the same status call without the README's export fails.
        bare = subprocess.run(
            ["ray", "job", "status", "try-1"], cwd=ROOT, env=client, capture_output=True, text=True, timeout=120
        )
        assert bare.returncode != 0 and "Missing authentication token" in bare.stdout + bare.stderr
    finally:
        stop_head(head, grace_s=60)
        shutil.rmtree(temp, ignore_errors=True)  # the job's copy of the checkout and its outputs
