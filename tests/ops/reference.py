"""Dense float64 references for the ops tests (materialise everything; tiny shapes only)."""

from __future__ import annotations

import math

import torch


def relation_kl_reference(sq, sk, tq, tk, mask=None, causal=True, scale_s=None, scale_t=None):
    """Per-row KL(teacher || student) [B, H, T] in float64, straight from the definition.

    Differentiable w.r.t. the student inputs (autograd of the dense map gives the reference grads).
    """
    B, H, T, D = sq.shape
    sk = sq if sk is None else sk
    tk = tq if tk is None else tk
    rep = H // sk.shape[1]
    scale_s = 1 / math.sqrt(D) if scale_s is None else scale_s
    scale_t = 1 / math.sqrt(D) if scale_t is None else scale_t
    s = scale_s * sq.double() @ sk.double().repeat_interleave(rep, 1).transpose(-1, -2)
    t = scale_t * tq.double() @ tk.double().repeat_interleave(rep, 1).transpose(-1, -2)
    i = torch.arange(T)
    valid = (i[None, :] <= i[:, None]) if causal else torch.ones(T, T, dtype=torch.bool)
    valid = valid[None, None].expand(B, 1, T, T)
    if mask is not None:
        m = mask.bool()
        valid = valid & m[:, None, :, None] & m[:, None, None, :]
    kl = torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for r in range(T):
                cols = valid[b, 0, r].nonzero().flatten()
                if len(cols) == 0:
                    continue
                ls = torch.log_softmax(s[b, h, r, cols], -1)
                lt = torch.log_softmax(t[b, h, r, cols], -1)
                kl[b, h, r] = (lt.exp() * (lt - ls)).sum()
    return kl
