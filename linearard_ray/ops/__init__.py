"""Relation-KL ops. PLACEHOLDER: dense implementation so other modules can be built against the
stable entry points; the ops work replaces it with the Triton kernels and the chunked torch path."""

from __future__ import annotations

import math

import torch


def relation_kl(student_q, student_k=None, teacher_q=None, teacher_k=None, *, attention_mask=None, causal=True,
                student_scale=None, teacher_scale=None, reduction="sum", backend="auto"):
    sk = student_q if student_k is None else student_k
    tk = teacher_q if teacher_k is None else teacher_k
    B, H, T, D = student_q.shape
    rep = H // sk.shape[1]
    sk = sk.repeat_interleave(rep, dim=1)
    tk = tk.repeat_interleave(rep, dim=1)
    a_s = student_scale if student_scale is not None else 1 / math.sqrt(D)
    a_t = teacher_scale if teacher_scale is not None else 1 / math.sqrt(teacher_q.shape[-1])
    s = (student_q.float() @ sk.float().transpose(-1, -2)) * a_s
    t = (teacher_q.float() @ tk.float().transpose(-1, -2)) * a_t
    valid = torch.ones(T, T, dtype=torch.bool, device=s.device)
    if causal:
        valid = torch.tril(valid)
    valid = valid.expand(B, 1, T, T)
    if attention_mask is not None:
        m = attention_mask.bool()
        valid = valid & m[:, None, None, :] & m[:, None, :, None]
    neg = torch.finfo(torch.float32).min
    ls = torch.log_softmax(s.masked_fill(~valid, neg), -1)
    lt = torch.log_softmax(t.masked_fill(~valid, neg), -1)
    kl = (lt.exp() * (lt - ls)).masked_fill(~valid, 0).sum(-1)
    if reduction == "none":
        return kl
    if reduction == "mean":
        rows = valid.any(-1).expand(B, H, T).sum().clamp_min(1)
        return kl.sum() / rows
    return kl.sum()


def relation_kl_layer(student_q, student_k, student_v, teacher_q, teacher_k, teacher_v, *, attention_mask=None,
                      causal=True, student_scales=(None, None, None), teacher_scales=(None, None, None),
                      reduction="sum", backend="auto"):
    out = []
    for s, t, a_s, a_t in zip((student_q, student_k, student_v), (teacher_q, teacher_k, teacher_v), student_scales, teacher_scales):
        out.append(relation_kl(s, None, t, None, attention_mask=attention_mask, causal=causal,
                               student_scale=a_s, teacher_scale=a_t, reduction=reduction, backend=backend))
    return tuple(out)
