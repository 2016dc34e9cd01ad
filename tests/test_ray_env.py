"""The private Ray instance that ensure_ray starts, beside another Ray instance on the same machine
(another user's, a study's head): Ray's State API asked from inside it, without an address, as Ray
Train's placement-group cleaner asks it, must find this instance and not give up on finding two."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from tests.local_ray import head_port_flags, stop_head, wait_head_started
from tests.scripts import ROOT

pytestmark = pytest.mark.slow

ASK_STATE_FROM_A_WORKER = """
from linearard_ray.ray_env import ensure_ray
ensure_ray()
import ray

@ray.remote(num_cpus=0)
class Cleaner:  # like Ray Train's placement-group cleaner: detached, started from inside the job
    def actors_seen(self):
        from ray.util.state import list_actors  # no address: the lookup the cleaner makes
        return len(list_actors())

@ray.remote(num_cpus=0)
def start_a_cleaner():
    cleaner = Cleaner.options(lifetime="detached").remote()
    try:
        return ray.get(cleaner.actors_seen.remote())
    finally:
        ray.kill(cleaner)

print("actors:", ray.get(start_a_cleaner.remote()))
"""


def _start_other_instance(log_path) -> subprocess.Popen:
    temp = tempfile.mkdtemp(prefix="lrother", dir="/tmp")  # short: socket paths live under it
    head = subprocess.Popen(
        [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}",
            "--include-dashboard=false", "--disable-usage-stats",
            *(f"--{flag}={p}" for flag, p in head_port_flags().items()),
        ],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    assert wait_head_started(head, log_path, timeout=120), log_path.read_text()[-2000:]
    return head


def test_state_api_from_a_worker_finds_its_own_instance_beside_another(tmp_path):
    other = _start_other_instance(tmp_path / "other.log")
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        done = subprocess.run(
            [sys.executable, "-c", ASK_STATE_FROM_A_WORKER],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        stop_head(other, grace_s=10)  # Ray drains a node for up to 30 s; nothing here to drain
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Found multiple active Ray instances" not in done.stderr
    assert "actors:" in done.stdout
