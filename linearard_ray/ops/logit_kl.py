"""Output-logit KL and next-token cross-entropy computed from hidden states, chunk by chunk.

With a 32K-150K vocabulary, the fp32 logits of a long block are larger than the model itself
(T = 32K, V = 49K: 6.4 GB per sequence, twice for teacher and student). Both functions here take
final hidden states and LM-head weights instead of logits, and compute the loss over chunks of
positions with a custom autograd Function that keeps only per-position log-sum-exp values
(O(T) floats) and recomputes each chunk's logits in the backward pass. Peak extra memory is one
chunk of logits ([chunk_size, V]), whatever T is.

Precision: each chunk's logits come from a matmul in the inputs' dtype (as the model's own LM
head does) and are then upcast to at least fp32 for softmax, log-sum-exp and the reductions
(float64 inputs stay float64, which the tests use against float64 references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("sum", "mean", "none")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _logits(h: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return F.linear(h, w.to(h.dtype)).to(acc)


def _no_autocast(t: torch.Tensor):
    # Dtypes are managed explicitly here; an enclosing autocast region (the training loop's bf16
    # autocast) would otherwise recast the matmuls in forward but not in backward.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _outside_autocast(backward_impl):
    """An autograd Function's backward, run with autocast off as its forward is (see _no_autocast)."""

    def backward(ctx, g):
        with _no_autocast(g):
            return backward_impl(ctx, g)

    return staticmethod(backward)


class _ChunkedLogitKL(torch.autograd.Function):
    """Per-position τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) for rows of hidden states."""

    @staticmethod
    def forward(ctx, hs, ht, ws, wt, tau: float, chunk: int):
        with _no_autocast(hs):
            return _ChunkedLogitKL._forward(ctx, hs, ht, ws, wt, tau, chunk)

    @staticmethod
    def _forward(ctx, hs, ht, ws, wt, tau, chunk):
        acc = _acc_dtype(hs)
        n = hs.shape[0]
        kl = torch.empty(n, dtype=acc, device=hs.device)
        lse_s = torch.empty(n, dtype=acc, device=hs.device)
        lse_t = torch.empty(n, dtype=acc, device=hs.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            s = _logits(hs[a:b], ws, acc) / tau
            t = _logits(ht[a:b], wt, acc) / tau
            ls = torch.logsumexp(s, -1)
            lt = torch.logsumexp(t, -1)
            # KL_i = Σ_j p_t (t - s) - LSE_t + LSE_s  (no [C, V] log-prob tensors kept)
            kl[a:b] = ((t - lt[:, None]).exp() * (t - s)).sum(-1) - lt + ls
            lse_s[a:b], lse_t[a:b] = ls, lt
            del s, t
        ctx.save_for_backward(hs, ht, ws, wt, lse_s, lse_t)
        ctx.tau, ctx.chunk = tau, chunk
        return kl * (tau * tau)

    @staticmethod
    def _backward(ctx, g):
        hs, ht, ws, wt, lse_s, lse_t = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        acc = lse_s.dtype
        need_h, _, need_w = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(hs) if need_h else None
        gw = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_w else None
        g = g.to(acc)
        for a in range(0, hs.shape[0], chunk):
            b = min(hs.shape[0], a + chunk)
            s = _logits(hs[a:b], ws, acc) / tau
            t = _logits(ht[a:b], wt, acc) / tau
            # d(τ²·KL)/d(raw student logit) = τ² · (p_s − p_t) / τ = τ (p_s − p_t)
            d = ((s - lse_s[a:b, None]).exp() - (t - lse_t[a:b, None]).exp()) * (g[a:b, None] * tau)
            del s, t
            if need_h:
                gh[a:b] = (d.to(hs.dtype) @ ws.to(hs.dtype)).to(gh.dtype)
            if need_w:
                gw += d.transpose(0, 1) @ hs[a:b].to(acc)
        return gh, None, (gw.to(ws.dtype) if need_w else None), None, None, None

    backward = _outside_autocast(_backward.__func__)


class _ChunkedCE(torch.autograd.Function):
    """Per-position −log softmax(h·Wᵀ)[y]."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int):
        with _no_autocast(h):
            return _ChunkedCE._forward(ctx, h, w, y, chunk)

    @staticmethod
    def _forward(ctx, h, w, y, chunk):
        acc = _acc_dtype(h)
        n = h.shape[0]
        nll = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty(n, dtype=acc, device=h.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = _logits(h[a:b], w, acc)
            chunk_lse = torch.logsumexp(z, -1)
            nll[a:b] = chunk_lse - z.gather(1, y[a:b, None]).squeeze(1)
            lse[a:b] = chunk_lse
            del z
        ctx.save_for_backward(h, w, y, lse)
        ctx.chunk = chunk
        return nll

    @staticmethod
    def _backward(ctx, g):
        h, w, y, lse = ctx.saved_tensors
        acc = lse.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        g = g.to(acc)
        for a in range(0, h.shape[0], ctx.chunk):
            b = min(h.shape[0], a + ctx.chunk)
            p = (_logits(h[a:b], w, acc) - lse[a:b, None]).exp()
            p.scatter_add_(1, y[a:b, None], torch.full((b - a, 1), -1.0, dtype=acc, device=p.device))
            d = p * g[a:b, None]
            del p
            if need_h:
                gh[a:b] = (d.to(h.dtype) @ w.to(h.dtype)).to(gh.dtype)
            if need_w:
                gw += d.transpose(0, 1) @ h[a:b].to(acc)
        return gh, (gw.to(w.dtype) if need_w else None), None, None

    backward = _outside_autocast(_backward.__func__)


def _rows(hidden: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = hidden.reshape(-1, hidden.shape[-1])
    idx = valid.reshape(-1).nonzero().squeeze(1)
    return flat.index_select(0, idx), idx


def _valid_mask(hidden: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    lead = hidden.shape[:-1]
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=hidden.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match hidden states {tuple(lead)}")
    return mask.to(device=hidden.device).bool()


def _check_common(chunk_size: int, reduction: str) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_logit_kl_args(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    temperature: float,
    top_k_positions: int | None,
    chunk_size: int,
    reduction: str,
) -> None:
    _check_common(chunk_size, reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k_positions is not None and top_k_positions < 1:
        raise ValueError(f"top_k_positions must be >= 1, got {top_k_positions}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
            "cover different positions"
        )
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {student_head_weight.shape[0]} != teacher vocabulary {teacher_head_weight.shape[0]}"
        )
    for name, h, w in (
        ("student", student_hidden, student_head_weight),
        ("teacher", teacher_hidden, teacher_head_weight),
    ):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"{name} hidden size {h.shape[-1]} != head weight input size {w.shape[1]}")


def _top_k_positions(per_position: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of the ``k`` valid positions with the largest values, per sequence (the last axis;
    per call for 1-D input); chosen on the values, so it carries no gradient."""
    scores = per_position.detach().masked_fill(~valid, float("-inf"))
    flat = scores.reshape(1, -1) if scores.dim() == 1 else scores.reshape(-1, scores.shape[-1])
    top = flat.topk(min(k, flat.shape[-1]), dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view(valid.shape) & valid


def chunked_logit_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k_positions: int | None = None,
    chunk_size: int = 1024,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ over valid positions of τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), t = teacher_hidden·W_tᵀ,
    s = student_hidden·W_sᵀ, computed chunk by chunk (never a full [T, V] logit matrix).

    The τ² factor (Hinton et al., 2015) keeps the gradient magnitude independent of the
    temperature: the soft-target gradient w.r.t. the logits scales as 1/τ, and the KL itself
    as 1/τ² for large τ.

    hidden states are ``[B, T, H]`` (or ``[N, H]``), head weights ``[V, H]`` (no bias);
    ``attention_mask`` ``[B, T]`` (or ``[N]``) marks valid positions. ``top_k_positions=k`` keeps,
    per sequence (per call for 2-D input), only the k valid positions with the largest KL; the
    selection is made on the values and carries no gradient. ``reduction``: "sum", "mean" (over
    the contributing positions) or "none" (per position, the shape of the mask, 0 where a
    position does not contribute). Only the student side gets gradients; the teacher side is
    treated as a constant.
    """
    _check_logit_kl_args(
        student_hidden,
        teacher_hidden,
        student_head_weight,
        teacher_head_weight,
        temperature,
        top_k_positions,
        chunk_size,
        reduction,
    )
    valid = _valid_mask(student_hidden, attention_mask, "attention_mask")
    hs, idx = _rows(student_hidden, valid)
    ht, _ = _rows(teacher_hidden.detach(), valid)
    per = _ChunkedLogitKL.apply(
        hs,
        ht.to(hs.dtype) if ht.dtype != hs.dtype else ht,
        student_head_weight,
        teacher_head_weight.detach(),
        float(temperature),
        int(chunk_size),
    )
    full = torch.zeros(valid.numel(), dtype=per.dtype, device=per.device).index_put((idx,), per).view(valid.shape)
    used = valid
    if top_k_positions is not None:
        used = _top_k_positions(full, valid, int(top_k_positions))
        full = full * used
    if reduction == "none":
        return full
    total = full.sum()
    if reduction == "mean":
        return total / used.sum().clamp_min(1)
    return total


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """Σ over positions with mask = 1 of −log softmax(hidden·Wᵀ)[target], chunk by chunk.

    ``hidden`` ``[B, T, H]`` (or ``[N, H]``) is aligned with ``targets`` ``[B, T]``: the caller
    shifts (hidden[:, :-1] predicts input_ids[:, 1:]). Targets < 0 (e.g. -100) count as masked.
    ``reduction``: "sum", "mean" (over counted positions) or "none" (the shape of targets).
    """
    _check_common(chunk_size, reduction)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match hidden states {tuple(hidden.shape[:-1])}"
        )
    if hidden.shape[-1] != head_weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != head weight input size {head_weight.shape[1]}")
    targets = targets.to(hidden.device).long()
    valid = _valid_mask(hidden, mask, "mask") & (targets >= 0)
    V = head_weight.shape[0]
    if bool((targets[valid] >= V).any()):
        raise ValueError(f"a target id is >= the vocabulary size {V}")
    h, idx = _rows(hidden, valid)
    y = targets.reshape(-1).index_select(0, idx)
    per = _ChunkedCE.apply(h, head_weight, y, int(chunk_size))
    if reduction == "none":
        return torch.zeros(valid.numel(), dtype=per.dtype, device=per.device).index_put((idx,), per).view(valid.shape)
    total = per.sum()
    if reduction == "mean":
        return total / valid.sum().clamp_min(1)
    return total
