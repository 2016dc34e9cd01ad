"""One way for tests to start Ray: a private local instance, never a cluster already running on
the machine (``address="local"``), with the tests' model cache visible to every worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


@contextlib.contextmanager
def local_ray(num_cpus: int, cache_dir=None, log_to_driver: bool = True):
    import ray

    env = {"env_vars": {"LINEARARD_CACHE": str(cache_dir)}} if cache_dir is not None else None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, runtime_env=env)
    try:
        yield
    finally:
        ray.shutdown()


# Every port a `ray start --head` binds: tests pick each one free, because other Ray clusters on
# the machine already hold the defaults (the dashboard agent's 52365, the client server's 10001, ...).
HEAD_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_port_flags() -> dict[str, int]:
    """A free port for every flag in ``HEAD_PORT_FLAGS``."""
    return {flag: free_port() for flag in HEAD_PORT_FLAGS}


def wait_head_started(head: subprocess.Popen, log_path: Path, timeout: float) -> bool:
    """Whether `ray start --head --block` (logging to ``log_path``) logged that its node runs
    ("Ray runtime started.", once the raylet has registered) before it exited or ``timeout`` passed."""
    end = time.monotonic() + timeout
    while head.poll() is None and time.monotonic() < end:
        if "Ray runtime started" in log_path.read_text():
            return True
        time.sleep(0.5)
    return head.poll() is None and "Ray runtime started" in log_path.read_text()


def stop_head(head: subprocess.Popen, grace_s: float) -> None:
    """Stop a `ray start --block` head started in a session of its own: SIGTERM (it stops its own
    cluster, and only it), then after ``grace_s`` SIGKILL to that session, so nothing is left."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
