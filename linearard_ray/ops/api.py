"""Public entry points of the relation-KL op: input checks, backend choice, reduction.

The last module to read of the op, as in flash-attention's Triton ops: ``relation_kl_torch`` is
the reference path, ``relation_kl_triton`` the kernels and their autograd Function; this module
holds the public functions ``relation_kl`` and ``relation_kl_layer`` that choose between them.

Semantics (one head; student rows a_i, columns b_j, teacher c_i, d_j; b = a for a self-relation):
s_ij = a_s <a_i, b_j>, t_ij = a_t <c_i, d_j>, valid set J_i = {j : j <= i if causal, mask_j = 1};
KL_i = sum_{j in J_i} p^t_ij (log p^t_ij - log p^s_ij) with p = softmax over J_i; rows with
mask_i = 0 give 0 (loss and gradient). Scales default to 1/sqrt(D). Only the student side gets
gradients; teacher tensors are treated as constants.

Reductions: "none" -> per-row [B, H, T] fp32 (0 on masked rows); "sum" -> sum over every row and
head; "mean" -> that sum divided by the number of valid (row, query head) pairs, i.e.
H * (number of positions with mask = 1) (H * B * T without a mask); 0 when there are none.
The result is always fp32.

Backends: "torch" (chunked PyTorch, linear memory, any device, fp16/bf16/fp32), "triton"
(CUDA kernels; on CPU only under TRITON_INTERPRET=1), "auto" (triton for CUDA tensors when Triton
imports and the case is supported, else torch).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

from . import relation_kl_torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The fused Triton launch of a layer's three relations pays off while one relation alone cannot
# fill the GPU (it saves launches and the tail wave); once each relation fills it (a LLaMA-2-7B
# layer at T=4096) the fused launch is slower than three. Above this many rows (B * heads * T over
# the three relations) the layer call runs them as separate launches (measured:
# benchmarks/README.md, 'Relation-KL op').
FUSED_LAYER_MAX_ROWS = 2048 * 48
_REDUCTIONS = ("sum", "mean", "none")
_BACKENDS = ("auto", "triton", "torch")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def triton_module():
    """The Triton implementation, or None when Triton (or a usable build of it) is missing."""
    try:
        from . import relation_kl_triton
    except Exception:  # ImportError, or a broken Triton install
        return None
    return relation_kl_triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- validation
def _check_4d(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, H, T, D], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [B, H, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} has unsupported dtype {x.dtype}; use float16, bfloat16 or float32")
    B, H, T, D = x.shape
    if B < 1 or H < 1 or T < 1:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)} (B, H and T must be >= 1)")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name} has unsupported head dim {D}; supported: {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")


def _same_bt_d(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    for dim, what in ((0, "batch size B"), (2, "sequence length T"), (3, "head dim D")):
        if x.shape[dim] != ref.shape[dim]:
            raise ValueError(
                f"{name} has {what} {x.shape[dim]} but {ref_name} has {ref.shape[dim]} "
                f"(shapes {tuple(x.shape)} vs {tuple(ref.shape)})"
            )
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _same_bt_d(name, x, ref_name, ref)
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"{name} has {x.shape[1]} heads but {ref_name} has {ref.shape[1]}")


def _check_scale(name: str, v, D: int) -> float:
    if v is None:
        return 1.0 / math.sqrt(D)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number or None, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v}")
    return v


def _check_mask(mask, B: int, T: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor [B, T], got {type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"attention_mask is on {mask.device} but the inputs are on {device}")
    if mask.is_floating_point() or mask.is_complex():
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("attention_mask must hold only 0 and 1")
    return mask != 0


def _check_choice(name: str, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def _check_finite(named: Sequence) -> None:
    for name, x in named:
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def _check_pair(prefix: str, q, k, tq, tk):
    """Validate one relation; returns (sk, tk) with None meaning a self-relation."""
    names = {k2: f"{prefix}{k2}" for k2 in ("student_q", "student_k", "teacher_q", "teacher_k")}
    _check_4d(names["student_q"], q)
    if tq is None:
        raise ValueError(f"{names['teacher_q']} is required")
    _check_4d(names["teacher_q"], tq)
    _same_shape(names["teacher_q"], tq, names["student_q"], q)
    if (k is None) != (tk is None):
        raise ValueError(
            f"{names['student_k']} and {names['teacher_k']} must both be given (cross-relation) "
            "or both be None (self-relation)"
        )
    if k is not None:
        _check_4d(names["student_k"], k)
        _check_4d(names["teacher_k"], tk)
        _same_bt_d(names["student_k"], k, names["student_q"], q)
        if q.shape[1] % k.shape[1] != 0:
            raise ValueError(
                f"{names['student_k']} has {k.shape[1]} heads, which does not divide the "
                f"{q.shape[1]} heads of {names['student_q']}"
            )
        _same_shape(names["teacher_k"], tk, names["student_k"], k)
        if k.dtype != q.dtype:
            raise ValueError(f"{names['student_k']} dtype {k.dtype} differs from {names['student_q']} {q.dtype}")
        if tk.dtype != tq.dtype:
            raise ValueError(f"{names['teacher_k']} dtype {tk.dtype} differs from {names['teacher_q']} {tq.dtype}")
    return k, tk


def _resolve_backend(backend: str, tensors, triton_reason) -> str:
    dev = tensors[0].device
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if triton_module() is None:
            raise ValueError("backend='triton' but Triton is not importable; use backend='torch' or 'auto'")
        if dev.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {dev}) or TRITON_INTERPRET=1; use backend='torch' or 'auto'"
            )
        reason = triton_reason(tensors)
        if reason:
            raise ValueError(f"backend='triton' cannot run this case: {reason}")
        return "triton"
    if dev.type == "cuda" and triton_module() is not None and not triton_reason(tensors):
        return "triton"
    return "torch"


def _triton_supports(tensors) -> str:
    dtypes = {x.dtype for x in tensors if x is not None}
    if len(dtypes) != 1:
        return f"student and teacher tensors must share one dtype, got {sorted(map(str, dtypes))}"
    for x in tensors:  # the kernels address rows within one head with 32-bit offsets
        if x is not None and x.shape[2] * max(x.stride(2), x.shape[3]) >= 2**31:
            return f"T={x.shape[2]} with row stride {x.stride(2)} overflows the kernels' 32-bit row offsets"
    return ""


def _reduce(kl: torch.Tensor, reduction: str, mask: torch.Tensor | None) -> torch.Tensor:
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    B, H, T = kl.shape
    rows = H * (int(mask.sum()) if mask is not None else B * T)
    return total / rows if rows > 0 else total * 0.0


def _check_layer(students: tuple, teachers: tuple, student_scales, teacher_scales) -> None:
    """Validate the six tensors of one layer call and its two triples of scales."""
    names = ("q", "k", "v")
    student_q, student_k, student_v = students
    teacher_q = teachers[0]
    for n, s, t in zip(names, students, teachers, strict=False):
        _check_4d(f"student_{n}", s)
        if t is None:
            raise ValueError(f"teacher_{n} is required")
        _check_4d(f"teacher_{n}", t)
        _same_shape(f"teacher_{n}", t, f"student_{n}", s)
    for n, s in zip(names[1:], students[1:], strict=False):
        _same_bt_d(f"student_{n}", s, "student_q", student_q)
        if s.dtype != student_q.dtype:
            raise ValueError(f"student_{n} dtype {s.dtype} differs from student_q {student_q.dtype}")
    if student_v.shape[1] != student_k.shape[1]:
        raise ValueError(f"student_v has {student_v.shape[1]} heads but student_k has {student_k.shape[1]}")
    for n, t in zip(names[1:], teachers[1:], strict=False):
        if t.dtype != teacher_q.dtype:
            raise ValueError(f"teacher_{n} dtype {t.dtype} differs from teacher_q {teacher_q.dtype}")
    for arg, vals in (("student_scales", student_scales), ("teacher_scales", teacher_scales)):
        if not isinstance(vals, (tuple, list)) or len(vals) != 3:
            raise ValueError(f"{arg} must be a sequence of three scales (q, k, v; None = 1/sqrt(D)), got {vals!r}")


# ----------------------------------------------------------------------------- entry points
def relation_kl(
    student_q: torch.Tensor,
    student_k: torch.Tensor | None = None,
    teacher_q: torch.Tensor | None = None,
    teacher_k: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    student_scale: float | None = None,
    teacher_scale: float | None = None,
    reduction: str = "sum",
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """KL(teacher || student) of the row-softmaxed relation maps, linear memory in T.

    ``student_k = teacher_k = None`` is the self-relation (A·Aᵀ). See the module docstring for the
    exact semantics of masks, reductions and backends.
    """
    sk, tk = _check_pair("", student_q, student_k, teacher_q, teacher_k)
    B, H, T, D = student_q.shape
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    a_s = _check_scale("student_scale", student_scale, D)
    a_t = _check_scale("teacher_scale", teacher_scale, D)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("backend", backend, _BACKENDS)
    mask = _check_mask(attention_mask, B, T, student_q.device)
    tensors = [student_q, sk, teacher_q, tk]
    if check_finite:
        _check_finite(zip(("student_q", "student_k", "teacher_q", "teacher_k"), tensors, strict=False))
    which = _resolve_backend(backend, tensors, _triton_supports)
    if which == "triton":
        kl = triton_module().relation_kl_rows(student_q, sk, teacher_q, tk, mask, causal, a_s, a_t)
    else:
        kl = relation_kl_torch.relation_kl_rows(student_q, sk, teacher_q, tk, mask, causal, a_s, a_t)
    if check_finite:
        _check_finite([("relation_kl result", kl)])
    return _reduce(kl, reduction, mask)


def relation_kl_layer(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    teacher_v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    student_scales: Sequence[float | None] = (None, None, None),
    teacher_scales: Sequence[float | None] = (None, None, None),
    reduction: str = "sum",
    backend: str = "auto",
    check_finite: bool = False,
):
    """The Q/Q, K/K and V/V self-relations of one layer -> (kl_qq, kl_kk, kl_vv).

    On the Triton backend the three relations share one kernel launch per pass when the layer is
    small (B * heads * T <= FUSED_LAYER_MAX_ROWS), else each gets its own. q may have more heads
    than k and v (GQA); k and v must have the same head count, and all six tensors one B, T, D.
    """
    names = ("q", "k", "v")
    students = (student_q, student_k, student_v)
    teachers = (teacher_q, teacher_k, teacher_v)
    _check_layer(students, teachers, student_scales, teacher_scales)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    B, H, T, D = student_q.shape
    a_s = [_check_scale(f"student_scales[{i}]", v, D) for i, v in enumerate(student_scales)]
    a_t = [_check_scale(f"teacher_scales[{i}]", v, D) for i, v in enumerate(teacher_scales)]
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("backend", backend, _BACKENDS)
    mask = _check_mask(attention_mask, B, T, student_q.device)
    if check_finite:
        _check_finite(
            zip(
                ("student_q", "student_k", "student_v", "teacher_q", "teacher_k", "teacher_v"),
                students + teachers,
                strict=False,
            )
        )
    which = _resolve_backend(backend, list(students + teachers), _triton_supports)
    rows = B * T * sum(s.shape[1] for s in students)
    if which == "triton" and rows <= FUSED_LAYER_MAX_ROWS:
        kls = triton_module().relation_kl_layer_rows(students, teachers, mask, causal, a_s, a_t)
    else:
        impl = triton_module() if which == "triton" else relation_kl_torch
        kls = tuple(
            impl.relation_kl_rows(s, None, t, None, mask, causal, x, y)
            for s, t, x, y in zip(students, teachers, a_s, a_t, strict=False)
        )
    if check_finite:
        _check_finite([(f"relation_kl_layer result ({n})", k) for n, k in zip(names, kls, strict=False)])
    return tuple(_reduce(k, reduction, mask) for k in kls)
