"""Relation KL in plain PyTorch, chunked over rows so memory stays linear in T.

The op's reference path, read first: the Triton kernels (``relation_kl_triton``) compute the same
math, and the public functions in ``api`` choose between the two. Per row i of one head,
KL_i = KL(softmax(t_i) || softmax(s_i)) over the valid columns, with s = a_s * A Bᵀ (student)
and t = a_t * C Dᵀ (teacher). Only a block of ``chunk`` rows of the logits exists at any time;
the backward pass recomputes the block from the saved per-row log-sum-exps (fp32, [B, H, T]).

Inputs arrive validated (see ``api``): [B, H, T, D] tensors, the key side with
H_k heads dividing H (GQA: query head h uses key head h // (H / H_k)), an optional bool [B, T]
mask. All arithmetic is fp32 whatever the input dtype; gradients come back in the input dtype.
"""

from __future__ import annotations

import torch

# Elements of one [B, H, rows, cols] logit block. A handful of such blocks are alive at once.
_BLOCK_ELEMS_CPU = 1 << 21
_BLOCK_ELEMS_CUDA = 1 << 25


def _chunk_rows(B: int, H: int, T: int, device: torch.device, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, min(int(chunk), T))
    budget = _BLOCK_ELEMS_CUDA if device.type == "cuda" else _BLOCK_ELEMS_CPU
    return max(1, min(T, budget // max(1, B * H * T)))


def _logits(rows: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """rows [B, H, C, D] x keys [B, Hk, N, D] -> [B, H, C, N] fp32, without repeating key heads."""
    B, H, C, D = rows.shape
    Hk, N = keys.shape[1], keys.shape[2]
    out = torch.matmul(rows.view(B, Hk, H // Hk, C, D), keys.unsqueeze(2).transpose(-1, -2))
    return out.view(B, H, C, N).mul_(scale)


def _valid(
    mask: torch.Tensor | None, r0: int, r1: int, ncols: int, causal: bool, B: int, device: torch.device
) -> torch.Tensor:
    """Bool [B or 1, 1, r1-r0, ncols]: column j is visible from row i."""
    rows = torch.arange(r0, r1, device=device)
    cols = torch.arange(ncols, device=device)
    if causal:
        v = (cols[None, :] <= rows[:, None])[None, None]
    else:
        v = torch.ones(1, 1, r1 - r0, ncols, dtype=torch.bool, device=device)
    if mask is not None:
        v = v & mask[:, None, r0:r1, None] & mask[:, None, None, :ncols]
    return v


def _cols_for(r1: int, T: int, causal: bool) -> int:
    # Causal rows [r0, r1) see only columns < r1: the block above the diagonal is never built.
    return r1 if causal else T


def _masked_rows(a, b, c, d, mask, r0: int, r1: int, n: int, causal: bool, scale_s: float, scale_t: float):
    """Student and teacher logits of rows r0:r1 against columns :n (-inf where not valid) and the
    validity map: the tile that the forward and the backward both build."""
    valid = _valid(mask, r0, r1, n, causal, a.shape[0], a.device)
    s = _logits(a[:, :, r0:r1], b[:, :, :n], scale_s).masked_fill_(~valid, float("-inf"))
    t = _logits(c[:, :, r0:r1], d[:, :, :n], scale_t).masked_fill_(~valid, float("-inf"))
    return s, t, valid


def relation_kl_rows_forward(
    sq, sk, tq, tk, mask, causal: bool, scale_s: float, scale_t: float, chunk: int | None = None
):
    """Per-row KL [B, H, T] (fp32) plus the saved LSEs (fp32, +inf on rows with nothing valid)."""
    B, H, T, _ = sq.shape
    a, b = sq.float(), (sq if sk is None else sk).float()
    c, d = tq.float(), (tq if tk is None else tk).float()
    kl = torch.zeros(B, H, T, dtype=torch.float32, device=sq.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    step = _chunk_rows(B, H, T, sq.device, chunk)
    inf = torch.tensor(float("inf"), device=sq.device)
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        n = _cols_for(r1, T, causal)
        s, t, valid = _masked_rows(a, b, c, d, mask, r0, r1, n, causal, scale_s, scale_t)
        row_ok = valid.any(-1)
        ls = torch.where(row_ok, torch.logsumexp(s, -1), inf)
        lt = torch.where(row_ok, torch.logsumexp(t, -1), inf)
        log_pt = t - lt[..., None]
        terms = log_pt.exp() * (log_pt - (s - ls[..., None]))
        kl[:, :, r0:r1] = torch.where(valid, terms, 0.0).sum(-1)
        lse_s[:, :, r0:r1] = ls
        lse_t[:, :, r0:r1] = lt
    return kl, lse_s, lse_t


def relation_kl_rows_backward(
    dkl, sq, sk, tq, tk, mask, causal: bool, scale_s: float, scale_t: float, lse_s, lse_t, chunk: int | None = None
):
    """Gradients of Σ dkl·KL w.r.t. the student rows (and keys, None for a self-relation)."""
    B, H, T, D = sq.shape
    a, b = sq.float(), (sq if sk is None else sk).float()
    c, d = tq.float(), (tq if tk is None else tk).float()
    Hk = b.shape[1]
    rep = H // Hk
    da = torch.zeros(B, H, T, D, dtype=torch.float32, device=sq.device)
    db = torch.zeros(B, Hk, T, D, dtype=torch.float32, device=sq.device)
    step = _chunk_rows(B, H, T, sq.device, chunk)
    dkl = dkl.float()
    for r0 in range(0, T, step):
        r1 = min(T, r0 + step)
        n = _cols_for(r1, T, causal)
        s, t, valid = _masked_rows(a, b, c, d, mask, r0, r1, n, causal, scale_s, scale_t)
        # lse = +inf on empty rows, -inf logits on hidden columns: both give probability 0.
        g = s.sub_(lse_s[:, :, r0:r1, None]).exp_() - t.sub_(lse_t[:, :, r0:r1, None]).exp_()
        g.mul_(dkl[:, :, r0:r1, None])
        g5 = g.view(B, Hk, rep, r1 - r0, n)
        da[:, :, r0:r1] = torch.matmul(g5, b[:, :, None, :n]).view(B, H, r1 - r0, D)
        db[:, :, :n] += torch.einsum("bgrcn,bgrcd->bgnd", g5, a[:, :, r0:r1].view(B, Hk, rep, r1 - r0, D))
    da.mul_(scale_s)
    db.mul_(scale_s)
    if sk is None:
        return (da + db).to(sq.dtype), None
    return da.to(sq.dtype), db.to(sk.dtype)


class TorchRelationKL(torch.autograd.Function):
    """Per-row relation KL [B, H, T] with a recomputing backward; only the student gets grads."""

    @staticmethod
    def forward(ctx, sq, sk, tq, tk, mask, causal, scale_s, scale_t, chunk):
        kl, lse_s, lse_t = relation_kl_rows_forward(sq, sk, tq, tk, mask, causal, scale_s, scale_t, chunk)
        ctx.save_for_backward(sq, sk, tq, tk, mask, lse_s, lse_t)
        ctx.cfg = (causal, scale_s, scale_t, chunk)
        return kl

    @staticmethod
    def backward(ctx, dkl):
        sq, sk, tq, tk, mask, lse_s, lse_t = ctx.saved_tensors
        causal, scale_s, scale_t, chunk = ctx.cfg
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 9
        gq, gk = relation_kl_rows_backward(dkl, sq, sk, tq, tk, mask, causal, scale_s, scale_t, lse_s, lse_t, chunk)
        return gq, gk, None, None, None, None, None, None, None


def relation_kl_rows(
    sq, sk, tq, tk, mask, causal: bool, scale_s: float, scale_t: float, chunk: int | None = None
) -> torch.Tensor:
    """Differentiable per-row KL [B, H, T] fp32 (teacher inputs are treated as constants)."""
    tq = tq.detach()
    tk = None if tk is None else tk.detach()
    return TorchRelationKL.apply(sq, sk, tq, tk, mask, causal, float(scale_s), float(scale_t), chunk)
