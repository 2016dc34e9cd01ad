"""The one place that starts or joins Ray, and the environment every Ray worker gets.

Under ``ray job submit`` (``RAY_ADDRESS`` set) the driver joins that cluster. Otherwise it starts a
private local instance (``address="local"``), never a stray cluster left running on the machine.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from linearard_ray.logs import LEVEL_ENV

# Variables a worker needs to see as the driver sees them: the model cache, the base of relative
# output paths (linearard_ray.paths), offline hub settings, the Triton interpreter on CPU, the
# token-auth mode of the cluster, the log level the command line chose (linearard_ray.logs).
FORWARDED_ENV = (
    "LINEARARD_CACHE",
    "LINEARARD_HOME",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TRITON_INTERPRET",
    "TOKENIZERS_PARALLELISM",
    "RAY_AUTH_MODE",
    "CUDA_LAUNCH_BLOCKING",
    LEVEL_ENV,
)

# Ray >= 2.59 turns token authentication on for a local instance when RAY_AUTH_MODE is unset, and
# says so with a warning on every start. For the private instance started here (loopback, gone
# with the process) the notice asks nothing of the user, so that one message is dropped; the
# cluster still uses token authentication, and every other message of the module shows.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_ON_BY_DEFAULT = "Token authentication is enabled for this Ray cluster"


class _DropAuthDefaultNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_AUTH_ON_BY_DEFAULT)


def worker_env(tracking_uri: str | None = None) -> dict[str, str]:
    """Environment variables for every Ray worker: the forwarded ones and MLflow's one URI."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_logging_config():
    """Under ``--quiet`` (the package's level above INFO), Ray's own Python loggers in every Ray
    process (the Train controller's resume notices, Ray Data's progress) at the same level; else
    Ray's default."""
    import ray

    from linearard_ray.logs import env_level

    level = env_level()
    if level <= logging.INFO:
        return None
    return ray.LoggingConfig(log_level=logging.getLevelName(level))


def ensure_ray(env: dict[str, str] | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one; a no-op once Ray is up."""
    import ray

    if ray.is_initialized():
        return
    logging_config = _ray_logging_config()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_config=logging_config)
        return
    # A local cluster started here: workers must import this package even from a checkout that
    # is not installed and a driver started outside the repo root.
    import linearard_ray

    root = str(Path(linearard_ray.__file__).resolve().parent.parent)
    local_env = dict(worker_env() if env is None else env)
    local_env["PYTHONPATH"] = os.pathsep.join(
        [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    )
    # Ray's State API, asked without an address (as Ray Train's placement-group cleaner asks it from
    # inside the cluster), looks for the Ray instances on the host and gives up when it finds more
    # than this one. The cleaner then dies, and every Tune trial stopped early keeps its CPU and GPU
    # share. Naming this instance's dashboard to its workers keeps the lookup to this instance.
    dashboard_port = _free_loopback_port()
    local_env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    notice = _DropAuthDefaultNotice()
    auth_logger = logging.getLogger(_AUTH_LOGGER)
    auth_logger.addFilter(notice)
    try:
        context = ray.init(
            address="local",
            dashboard_port=dashboard_port,
            runtime_env={"env_vars": local_env},
            log_to_driver=True,
            logging_config=logging_config,
        )
    finally:
        auth_logger.removeFilter(notice)
    if not str(context.dashboard_url or "").endswith(f":{dashboard_port}"):  # taken meanwhile, or no dashboard
        logging.getLogger(__name__).warning(
            "Ray's dashboard is not on port %d (%s): beside another Ray instance on this machine, "
            "Tune trials stopped early may keep their CPU/GPU share",
            dashboard_port,
            context.dashboard_url or "not started",
        )
