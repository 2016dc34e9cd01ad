"""Ops of linearard_ray: the linear-memory relation KL (Triton kernels in ``relation_kl.py``, the
chunked PyTorch path in ``relation_kl_torch.py``, checks and dispatch in ``relation_kl_api.py``)
and the chunked logit KL / cross-entropy (``ops.logit_kl``).

Note: the package attribute ``relation_kl`` is the *function*. The Triton module shares that name;
reach it with ``importlib.import_module("linearard_ray.ops.relation_kl")`` (``import ... as`` would
return the function).
"""

from __future__ import annotations

import importlib

try:  # load the Triton module first so that the function binding below wins the name
    importlib.import_module(f"{__name__}.relation_kl")
except Exception:  # Triton missing or unusable: the torch path still works
    pass

from .relation_kl_api import relation_kl, relation_kl_layer  # noqa: E402

__all__ = ["relation_kl", "relation_kl_layer"]

try:  # owned by another module; present once it lands
    from . import logit_kl  # noqa: F401

    __all__.append("logit_kl")
except ImportError:  # pragma: no cover - only while logit_kl.py does not exist yet
    pass
