"""Two jobs with one run name, as two users would start them: real ``pipelines/distill.py``
processes, each with its own local Ray on loopback. The second refuses at once naming the first;
when the first is killed, its workers stop, and the run name is taken over and finished with one
MLflow point per step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.scripts import ROOT, load_script

pytestmark = pytest.mark.slow

STEPS = 40


@pytest.fixture(scope="module")
def faults():
    return load_script("benchmarks/bench_faults.py")


def test_second_job_refuses_then_takes_over_a_killed_one(tmp_path, cache_dir, tiny_model_dir, faults):
    tiny_model_dir("llama")
    cfg = faults.job_config(tmp_path, "run", STEPS, checkpoint_every=4, max_failures=0)
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    first = faults.Job(cfg, tmp_path / "first.log")
    try:
        assert first.wait_for_step(3, timeout=300) >= 3, "".join(first.lines)[-3000:]
        started = time.time()
        second = subprocess.run(
            [sys.executable, str(ROOT / "pipelines" / "distill.py"), "--config", str(cfg)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"PID {first.proc.pid}" in second.stderr and "in use by another job" in second.stderr
        assert time.time() - started < 60  # refused before Ray or any worker started
        assert first.proc.poll() is None  # the first job is untouched

        at_kill = first.step
        os.kill(first.proc.pid, signal.SIGKILL)
        time.sleep(8)  # an orphaned worker would train ~30 more steps in this time
        assert max(faults.logged_steps(uri)) <= at_kill + 2  # printed lines lag the worker by a step
    finally:
        first.cleanup()

    third = faults.Job(cfg, tmp_path / "third.log")
    assert third.finish() == 0, "".join(third.lines)[-3000:]
    out = "".join(third.lines)
    assert f"from host {os.uname().nodename}, PID {first.proc.pid}" in out and "has exited" in out
    steps = faults.logged_steps(uri)
    assert sorted(steps) == list(range(1, STEPS + 1))  # one point per step, none missing
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.data.tags["linearard.resumed_from_kill"] == "true" and run.data.tags["linearard.attempts"] == "2"
    assert run.info.status == "FINISHED"
    assert not (tmp_path / "run" / "ray" / faults.RUN_NAME / "linearard_run.lock").exists()
