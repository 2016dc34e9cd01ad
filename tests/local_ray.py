"""One way for tests to start Ray: a private local instance, never a cluster already running on
the machine (``address="local"``), with the tests' model cache visible to every worker."""

from __future__ import annotations

import contextlib


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
