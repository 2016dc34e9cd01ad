"""The run-name lock, in-process: real lock files and real processes (a live one holds, an exited
one is gone), and the driver refusing a held run name before Ray starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from linearard_ray.config import build_config
from linearard_ray.training import run_lock
from linearard_ray.training.run_lock import LockOwner, LockWatch, RunLockError


@pytest.fixture
def other_process():
    """A live process on this host that is not the test: the holder of a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(0.2)  # its create_time must come before the lock's start time
    yield proc
    proc.kill()
    proc.wait()


def _plant(storage_dir, *, pid, host=None, heartbeat_age=0.0, started=None) -> LockOwner:
    now = time.time()
    owner = LockOwner(uuid.uuid4().hex, "run", host or socket.gethostname(), pid, started or now, now - heartbeat_age)
    storage_dir.mkdir(parents=True, exist_ok=True)
    (storage_dir / run_lock.LOCK_FILE).write_text(owner.to_json())
    return owner


def test_first_job_takes_the_lock_and_a_second_refuses_naming_the_holder(tmp_path, other_process):
    held = _plant(tmp_path / "run", pid=other_process.pid)
    with pytest.raises(RunLockError) as e:
        run_lock.acquire(str(tmp_path / "run"), "run")
    msg = str(e.value)
    assert f"PID {other_process.pid}" in msg and f"host {held.host}" in msg and "started 20" in msg
    assert "--force" in msg
    assert run_lock.read_owner(str(tmp_path / "run")).token == held.token  # untouched


def test_a_fresh_lock_records_this_process_and_release_removes_only_its_own(tmp_path):
    d = str(tmp_path / "run")
    got = run_lock.acquire(d, "run")
    assert got.replaced is None
    rec = json.loads((tmp_path / "run" / run_lock.LOCK_FILE).read_text())
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["run_name"] == "run"
    other = LockOwner("x" * 32, "run", "elsewhere", 1, time.time(), time.time())
    run_lock.release(d, other)
    assert run_lock.read_owner(d).token == got.owner.token
    run_lock.release(d, got.owner)
    assert run_lock.read_owner(d) is None


def test_a_lock_whose_process_has_exited_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    held = _plant(tmp_path / "run", pid=proc.pid)
    got = run_lock.acquire(str(tmp_path / "run"), "run")
    assert got.replaced == held and "has exited" in got.replaced_because
    assert run_lock.read_owner(str(tmp_path / "run")).token == got.owner.token


def test_a_pid_reused_by_a_later_process_does_not_keep_the_lock(tmp_path, other_process):
    _plant(tmp_path / "run", pid=other_process.pid, started=time.time() - 3600)
    got = run_lock.acquire(str(tmp_path / "run"), "run")
    assert "has exited" in got.replaced_because


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh_and_is_taken_over_when_stale(tmp_path):
    _plant(tmp_path / "run", pid=1, host="gpu-node-7")
    with pytest.raises(RunLockError, match="host gpu-node-7"):
        run_lock.acquire(str(tmp_path / "run"), "run")
    _plant(tmp_path / "run", pid=1, host="gpu-node-7", heartbeat_age=run_lock.STALE_AFTER_S + 5)
    got = run_lock.acquire(str(tmp_path / "run"), "run")
    assert "heartbeat" in got.replaced_because


def test_takeover_takes_a_lock_that_looks_held(tmp_path, other_process):
    _plant(tmp_path / "run", pid=other_process.pid)
    got = run_lock.acquire(str(tmp_path / "run"), "run", takeover=True)
    assert got.replaced.pid == other_process.pid and got.replaced_because == "train.takeover is set"


def test_heartbeat_refreshes_the_lock_and_notices_a_takeover(tmp_path):
    d = str(tmp_path / "run")
    got = run_lock.acquire(d, "run")
    with run_lock.Heartbeat(d, got.owner, interval=0.05) as hb:
        time.sleep(0.3)
        assert run_lock.read_owner(d).heartbeat > got.owner.heartbeat
        thief = _plant(tmp_path / "run", pid=os.getpid())
        time.sleep(0.3)
        assert hb.lost_to == thief
    assert run_lock.read_owner(d).token == thief.token  # the heartbeat did not write over the new owner


def test_watch_passes_while_the_owner_lives_and_stops_when_it_is_gone_or_replaced(tmp_path, other_process):
    d = str(tmp_path / "run")
    owner = _plant(tmp_path / "run", pid=other_process.pid)
    watch = LockWatch(d, owner.token)
    watch.check()
    other_process.kill()
    other_process.wait()
    with pytest.raises(RunLockError, match="driver of this run is gone"):
        watch.check()
    _plant(tmp_path / "run", pid=os.getpid())
    with pytest.raises(RunLockError, match="another job took the run over"):
        watch.check()
    (tmp_path / "run" / run_lock.LOCK_FILE).unlink()
    with pytest.raises(RunLockError, match="is gone"):
        watch.check()


def test_the_driver_refuses_a_held_run_name_before_ray_starts(tmp_path, other_process):
    import ray

    from linearard_ray.training.driver import run_distill

    cfg = build_config(
        {
            "model": {"teacher": "tiny:llama"},
            "data": {"ctx_len": 64},  # within the tiny model's 256-token window
            "train": {"run_name": "busy", "storage_path": str(tmp_path / "ray"), "max_steps": 1},
            "tracking": {"enabled": False},
        }
    )
    _plant(tmp_path / "ray" / "busy", pid=other_process.pid)
    assert not ray.is_initialized()
    with pytest.raises(RunLockError, match=f"PID {other_process.pid}"):
        run_distill(cfg)
    assert not ray.is_initialized()
