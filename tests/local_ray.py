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
