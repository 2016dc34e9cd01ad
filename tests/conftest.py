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
