"""The relation-KL op and the chunked logit KL / cross-entropy.

Read in this order: ``relation_kl_torch`` (the chunked PyTorch path: same math, linear memory,
any device), ``relation_kl_triton`` (the CUDA kernels and their autograd Function), ``api`` (the
public functions: input checks, backend choice, reduction), ``logit_kl``.
"""

from . import logit_kl
from .api import relation_kl, relation_kl_layer

__all__ = ["logit_kl", "relation_kl", "relation_kl_layer"]
