"""The relation-KL op and the chunked logit KL / cross-entropy.

Read in this order, as flash-attention's Triton ops are laid out: ``relation_kl_torch`` (the
reference path: chunked PyTorch, same math, linear memory, any device), ``relation_kl_triton``
(the kernels, their launchers and the autograd Function), ``api`` (the public functions: input
checks, backend choice, reduction), then ``logit_kl``. The float64 dense reference the tests
compare against is ``tests/ops/reference.py``.
"""

from . import logit_kl
from .api import relation_kl, relation_kl_layer

__all__ = ["logit_kl", "relation_kl", "relation_kl_layer"]
