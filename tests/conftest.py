import os

# The Triton kernels run in the interpreter on machines without CUDA; this must be set before
# triton is imported anywhere.
try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for built tiny models, shared by Ray workers through the env var."""
    d = tmp_path_factory.mktemp("linearard_cache")
    os.environ["LINEARARD_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir):
    from linearard_ray.models.tiny import resolve_tiny

    def make(family: str = "llama"):
        return resolve_tiny(f"tiny:{family}", cache_dir)

    return make


@pytest.fixture(autouse=True)
def _package_log_level_restored():
    """Each test leaves the package's log level as it found it. A test that runs a command in-process
    with --quiet or --verbose (``setup_logging``) sets the level for the whole pytest process, and
    LINEARARD_LOG_LEVEL, which every Ray worker started later reads: the later tests that assert on
    ``[distill]`` INFO lines (the driver's and the workers') then find none. That showed only when no
    test that happens to reset the level ran in between, as in the slow tier alone, where
    tests/data/test_preprocess.py's ``--quiet`` command precedes tests/training."""
    from linearard_ray import logs

    pkg = logs.get_logger(logs.LOGGER_NAME)
    level, env = pkg.level, os.environ.get(logs.LEVEL_ENV)
    yield
    if pkg.level == level and os.environ.get(logs.LEVEL_ENV) == env:
        return
    logs.setup_logging(logs.NORMAL)  # also gives Ray's and MLflow's loggers back the levels --quiet raised
    pkg.setLevel(level)
    if env is None:
        os.environ.pop(logs.LEVEL_ENV, None)
    else:
        os.environ[logs.LEVEL_ENV] = env
