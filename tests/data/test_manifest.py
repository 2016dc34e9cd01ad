"""output_dir_lock between real processes: a second run waits while the first holds the lock, takes
it as soon as the first lets go, and is not blocked by a holder that was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from linearard_ray.data.manifest import output_dir_lock

# Holds the lock on argv[1] until a line arrives on stdin (or the process is killed).
_HOLDER = """
import sys
from pathlib import Path
from linearard_ray.data.manifest import output_dir_lock
with output_dir_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _start_holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _take_in_thread(out: Path) -> tuple[threading.Thread, threading.Event]:
    taken = threading.Event()

    def take():
        with output_dir_lock(out):
            taken.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    return t, taken


def test_second_run_waits_until_the_holder_lets_go(tmp_path):
    out = tmp_path / "nested" / "blocks"
    holder = _start_holder(out)
    try:
        assert (out.parent / ".blocks.lock").exists() and not out.exists()
        t, taken = _take_in_thread(out)
        assert not taken.wait(1.0), "took a lock another process holds"
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert taken.wait(30), "never took the lock after the holder let go"
        t.join(5)
    finally:
        holder.kill()
        holder.wait()
    # released again: taken at once
    with output_dir_lock(out):
        pass


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "blocks"
    holder = _start_holder(out)
    t, taken = _take_in_thread(out)
    assert not taken.wait(0.5)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert taken.wait(30), "a dead process's lock blocked the next run"
    t.join(5)


def test_threads_of_one_process_take_turns(tmp_path):
    out = tmp_path / "blocks"
    inside, overlaps = [0], []

    def build():
        with output_dir_lock(out):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.05)
            inside[0] -= 1

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps == [1, 1, 1, 1]
