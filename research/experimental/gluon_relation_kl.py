#!/usr/bin/env python
"""Experiment: the relation-KL forward and backward as Gluon kernels (TMA, async wgmma).

Not part of the product. It compiles for sm_90 on a CPU machine (``--compile``: registers,
spills, and whether ptxas serialised the async wgmma); values and speed need the GPU host
(``--check``, ``--bench``). The question it was written for is the ≤ 10% target of the 7B
distillation step (research/LOG.md, distillation step): whether Hopper-specific code gets
the relation tiles past the Triton ``tl.dot`` kernels of ``linearard_ray/ops/relation_kl.py``,
and whether a backward that computes each causal tile once (6 products per relation with the
forward; the op's sweep does 8) pays for its atomics.

Measured on an H200 (research/LOG.md#gluon-kernels-gpu): both kernels are correct.
The forward matches the Triton one (1.00-1.05x at D=128, 0.91-0.98x at D=64), not faster. The
backward is slower than the op's sweep at every shape measured.

Scope: causal self-relation (student X_s·X_sᵀ, teacher X_t·X_tᵀ) of bf16 [B, H, T, D] tensors,
contiguous or the [B, T, H, D] view a model hands over, D in {64, 128}, T a multiple of 128, no
mask. Same math and outputs as ``_fwd_kernel``: base-2 logits, per row the student's and the
teacher's LSE (base 2) and KL_i = Σ_j p^t_ij (t_ij - s_ij) - LSE_t + LSE_s (natural log).

Forward (two warpgroups per 128-row block, FlashAttention-3's intra-warpgroup overlap): the two
key tiles of column block j+2 are copied by TMA while block j is in use (two buffers, one mbarrier
each), and the two wgmma products of block j+1 are issued asynchronously before the softmax
statistics of block j are computed, so the tensor cores and the exp2 units work at once.
Backward (``_relation_bwd_kernel``, one warpgroup per 64-column block): FlashAttention-2's scheme,
the column part kept in registers and the row part added with fp32 atomics, so each tile is
computed once; not bitwise reproducible.

    python research/experimental/gluon_relation_kl.py --compile        # CPU: registers, spills
    python research/experimental/gluon_relation_kl.py --check --bench  # GPU: values, speed

``install()`` routes the op's eligible relation calls to these kernels (``GluonRelationKL``). That
is how the 7B distillation step was timed with them: ``benchmarks/bench_distill_step.py`` then had
``--relation-impl gluon-experimental`` (Gluon forward and backward), ``gluon-fwd-experimental``
(Gluon forward, the op's backward) and ``gluon-ws-fwd-experimental`` (gluon_ws_forward.py's
forward); the product benchmark no longer routes to research code (the last version that did:
``git show e7b1ee0:benchmarks/bench_distill_step.py``; its figures are in research/LOG.md).
``GLUON_Q_IN_REGS=1`` makes that forward read its row tiles from registers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
BLOCK_M, BLOCK_N, NUM_WARPS = 128, 64, 8


@gluon.jit
def _stats_step(
    x, y, m_s, l_s, m_t, l_t, acc, sc_s, sc_t, offs_m, j0, BLOCK_N: gl.constexpr, col_l: gl.constexpr,
    MASKED: gl.constexpr
):
    """Online-softmax statistics of one [BLOCK_M, BLOCK_N] pair of logit tiles (raw products)."""
    dd = y * sc_t - x * sc_s
    if MASKED:  # the tile crosses the causal diagonal
        offs_n = j0 + gl.arange(0, BLOCK_N, layout=col_l)
        valid = offs_n[None, :] <= offs_m[:, None]
        x = gl.where(valid, x, float("-inf"))
        y = gl.where(valid, y, float("-inf"))
    m_s_new = gl.maximum(m_s, gl.max(x, 1) * sc_s)
    p_s = gl.exp2(x * sc_s - m_s_new[:, None])
    l_s = l_s * gl.exp2(m_s - m_s_new) + gl.sum(p_s, 1)
    m_t_new = gl.maximum(m_t, gl.max(y, 1) * sc_t)
    alpha_t = gl.exp2(m_t - m_t_new)
    p_t = gl.exp2(y * sc_t - m_t_new[:, None])
    l_t = l_t * alpha_t + gl.sum(p_t, 1)
    acc = acc * alpha_t + gl.sum(p_t * dd, 1)
    return m_s_new, l_s, m_t_new, l_t, acc


@gluon.jit
def _load_pair(a_desc, b_desc, row, col, bar, a_buf, b_buf):
    """TMA copies of the tiles at [row, col] of two tensors, completing on one mbarrier."""
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row, col], bar, a_buf)
    tma.async_copy_global_to_shared(b_desc, [row, col], bar, b_buf)


@gluon.jit
def _logit_pair(rows_s, rows_t, keys_s, keys_t, zero):
    """The student's and the teacher's raw logit tiles rows·keysᵀ, issued asynchronously (the
    caller waits for both with warpgroup_mma_wait)."""
    x = warpgroup_mma(rows_s, keys_s.permute((1, 0)), zero, use_acc=False, is_async=True)
    y = warpgroup_mma(rows_t, keys_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    return x, y


@gluon.jit
def _buffers(fixed_a, fixed_b, ring_a, ring_b, row, col):
    """Shared memory for a pair of tiles a program keeps (loaded here, by TMA, at [row, col]) and a
    two-slot ring of the pairs it sweeps, with one mbarrier for the kept pair and one per slot."""
    fa = gl.allocate_shared_memory(fixed_a.dtype, fixed_a.block_type.shape, fixed_a.layout)
    fb = gl.allocate_shared_memory(fixed_b.dtype, fixed_b.block_type.shape, fixed_b.layout)
    ra = gl.allocate_shared_memory(ring_a.dtype, [2] + ring_a.block_type.shape, ring_a.layout)
    rb = gl.allocate_shared_memory(ring_b.dtype, [2] + ring_b.block_type.shape, ring_b.layout)
    f_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    r_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(f_bar, count=1)
    mbarrier.init(r_bar.index(0), count=1)
    mbarrier.init(r_bar.index(1), count=1)
    _load_pair(fixed_a, fixed_b, row, col, f_bar, fa, fb)
    return fa, fb, ra, rb, f_bar, r_bar


@gluon.jit
def _release(f_bar, r_bar):
    mbarrier.invalidate(f_bar)
    mbarrier.invalidate(r_bar.index(0))
    mbarrier.invalidate(r_bar.index(1))


@gluon.jit
def _relation_fwd_kernel(
    qs_desc, ks_desc, qt_desc, kt_desc, LseS, LseT, Kl, sc_s, sc_t, T, H, rows_per_b, rows_per_h, cols_per_h,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr,
    Q_IN_REGS: gl.constexpr = False
):
    pid_m = gl.cdiv(T, BLOCK_M) - 1 - gl.program_id(0)  # longest causal rows first
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = b * rows_per_b + h * rows_per_h  # the head's first row in the 2-D view of the tensor
    col0 = h * cols_per_h
    i0 = pid_m * BLOCK_M

    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    col_l: gl.constexpr = gl.SliceLayout(0, mma)

    qs, qt, ks, kt, q_bar, k_bar = _buffers(qs_desc, qt_desc, ks_desc, kt_desc, row0 + i0, col0)
    # Causal: column blocks 0 .. n-1 with n >= 2 (BLOCK_M = 2 * BLOCK_N); the last two cross the diagonal.
    n = (i0 + BLOCK_M) // BLOCK_N
    _load_pair(ks_desc, kt_desc, row0, col0, k_bar.index(0), ks.index(0), kt.index(0))
    _load_pair(ks_desc, kt_desc, row0 + BLOCK_N, col0, k_bar.index(1), ks.index(1), kt.index(1))

    offs_m = i0 + gl.arange(0, BLOCK_M, layout=row_l)
    m_s = gl.full([BLOCK_M], -1.0e30, gl.float32, row_l)
    m_t = gl.full([BLOCK_M], -1.0e30, gl.float32, row_l)
    l_s = gl.zeros([BLOCK_M], gl.float32, row_l)
    l_t = gl.zeros([BLOCK_M], gl.float32, row_l)
    acc = gl.zeros([BLOCK_M], gl.float32, row_l)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)

    mbarrier.wait(q_bar, phase=0)
    if Q_IN_REGS:  # the row tiles as register operands: each wgmma then reads only its key tile from shared memory
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        qs = qs.load(a_l)
        qt = qt.load(a_l)
    mbarrier.wait(k_bar.index(0), phase=0)
    x, y = _logit_pair(qs, qt, ks.index(0), kt.index(0), zero)
    x, y = warpgroup_mma_wait(num_outstanding=0, deps=(x, y))
    # Block m sits in buffer m % 2, in that buffer's load number m // 2. Each pass waits for the
    # products it issued before it ends: a loop-carried value still being written by a wgmma
    # makes ptxas serialise every wgmma of the kernel (C7514).
    for j in range(0, n - 2):  # the blocks before the diagonal: no mask
        buf = j % 2
        _load_pair(ks_desc, kt_desc, row0 + (j + 2) * BLOCK_N, col0, k_bar.index(buf), ks.index(buf), kt.index(buf))
        mbarrier.wait(k_bar.index(1 - buf), phase=((j + 1) // 2) & 1)
        # Block j+1's products run on the tensor cores while block j's statistics are computed.
        xn, yn = _logit_pair(qs, qt, ks.index(1 - buf), kt.index(1 - buf), zero)
        m_s, l_s, m_t, l_t, acc = _stats_step(
            x, y, m_s, l_s, m_t, l_t, acc, sc_s, sc_t, offs_m, j * BLOCK_N, BLOCK_N, col_l, False
        )
        x, y = warpgroup_mma_wait(num_outstanding=0, deps=(xn, yn))
    # The two blocks that cross the diagonal (BLOCK_M = 2 * BLOCK_N), both already loaded.
    last = (n - 1) % 2
    mbarrier.wait(k_bar.index(last), phase=((n - 1) // 2) & 1)
    xn, yn = _logit_pair(qs, qt, ks.index(last), kt.index(last), zero)
    m_s, l_s, m_t, l_t, acc = _stats_step(
        x, y, m_s, l_s, m_t, l_t, acc, sc_s, sc_t, offs_m, (n - 2) * BLOCK_N, BLOCK_N, col_l, True
    )
    x, y = warpgroup_mma_wait(num_outstanding=0, deps=(xn, yn))
    m_s, l_s, m_t, l_t, acc = _stats_step(
        x, y, m_s, l_s, m_t, l_t, acc, sc_s, sc_t, offs_m, (n - 1) * BLOCK_N, BLOCK_N, col_l, True
    )
    _release(q_bar, k_bar)

    lse_s = m_s + gl.log2(l_s)
    lse_t = m_t + gl.log2(l_t)
    stat = (b * H + h).to(gl.int64) * T + offs_m
    gl.store(LseS + stat, lse_s)
    gl.store(LseT + stat, lse_t)
    gl.store(Kl + stat, 0.6931471805599453 * (acc / l_t - lse_t + lse_s))


@gluon.jit
def _grad_tile(
    x, y, dk, g_smem, q_i, k_j, LseS, LseT, Dkl, stat_i, cols, sc_s, sc_t, zero_d, BLOCK: gl.constexpr,
    row_l: gl.constexpr, DIAG
):
    """One causal tile's gradient from its raw logit pair: G = dkl_i (p^s - p^t), rounded to bf16
    in shared memory, then the column part dk += Gᵀ X_I (kept) and the row part G X_J (returned)."""
    offs_m = stat_i + gl.arange(0, BLOCK, layout=row_l)
    lse_s = gl.load(LseS + offs_m)
    lse_t = gl.load(LseT + offs_m)
    dkl = gl.load(Dkl + offs_m)
    g = gl.exp2(x * sc_s - lse_s[:, None]) - gl.exp2(y * sc_t - lse_t[:, None])
    if DIAG:  # the diagonal tile: columns past the row are not seen
        g = gl.where(cols[None, :] <= gl.arange(0, BLOCK, layout=row_l)[:, None], g, 0.0)
    g_smem.store((g * dkl[:, None]).to(gl.bfloat16))
    fence_async_shared()
    dk = warpgroup_mma(g_smem.permute((1, 0)), q_i, dk, is_async=True)
    dq = warpgroup_mma(g_smem, k_j, zero_d, use_acc=False, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(dk, dq))


BWD_BLOCK, BWD_WARPS = 64, 4


@gluon.jit
def _relation_bwd_kernel(
    qs_desc, qt_desc, LseS, LseT, Dkl, DX, sc_s, sc_t, T, H, rows_per_b, rows_per_h, cols_per_h, BLOCK: gl.constexpr,
    D: gl.constexpr, num_warps: gl.constexpr
):
    """One recompute per causal tile. A program owns column block J: its key pair stays in shared
    memory while it sweeps the row blocks I >= J (their pairs TMA double-buffered), keeps the
    column part Σ_I G_IJᵀ X_I in registers and adds each tile's row part G_IJ X_J to the fp32
    buffer DX with atomics (FlashAttention-2's dQ scheme). G_IJ = dkl_i (p^s_ij - p^t_ij) is
    rounded to bf16 in shared memory, where both of its products read it. DX is unscaled: the
    caller multiplies by the student's scale."""
    nb = T // BLOCK
    jb = gl.program_id(0)  # column block 0 has the most row blocks: launched first
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row0 = b * rows_per_b + h * rows_per_h
    col0 = h * cols_per_h
    j0 = jb * BLOCK

    mma_s: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK, 16]
    )
    mma_d: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16]
    )
    row_l: gl.constexpr = gl.SliceLayout(1, mma_s)
    col_l: gl.constexpr = gl.SliceLayout(0, mma_s)
    g_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], gl.bfloat16)

    ks, kt, qs, qt, k_bar, q_bar = _buffers(qs_desc, qt_desc, qs_desc, qt_desc, row0 + j0, col0)
    g_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK, BLOCK], g_layout)
    n = nb - jb  # row blocks jb .. nb-1
    _load_pair(qs_desc, qt_desc, row0 + j0, col0, q_bar.index(0), qs.index(0), qt.index(0))
    if n > 1:
        _load_pair(qs_desc, qt_desc, row0 + j0 + BLOCK, col0, q_bar.index(1), qs.index(1), qt.index(1))

    cols = gl.arange(0, BLOCK, layout=col_l)  # of the diagonal tile, which starts at row j0 too
    offs_r = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, mma_d))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, mma_d))
    zero_s = gl.zeros([BLOCK, BLOCK], gl.float32, mma_s)
    zero_d = gl.zeros([BLOCK, D], gl.float32, mma_d)
    dk = gl.zeros([BLOCK, D], gl.float32, mma_d)
    stat0 = (b * H + h).to(gl.int64) * T
    mbarrier.wait(k_bar, phase=0)
    mbarrier.wait(q_bar.index(0), phase=0)
    x, y = _logit_pair(qs.index(0), qt.index(0), ks, kt, zero_s)
    x, y = warpgroup_mma_wait(num_outstanding=0, deps=(x, y))
    # Row block it sits in buffer it % 2, load number it // 2. The next block's logit products are
    # issued before this block's row part goes out by atomics, and waited for before the pass ends
    # (an accumulator in flight across the loop's back edge makes ptxas serialise every wgmma).
    for it in range(0, n - 1):
        buf = it % 2
        dk, dq = _grad_tile(
            x, y, dk, g_smem, qs.index(buf), ks, LseS, LseT, Dkl, stat0 + j0 + it * BLOCK, cols, sc_s, sc_t, zero_d,
            BLOCK, row_l, it == 0
        )
        if it + 2 < n:  # both gradient products have read buffer buf
            _load_pair(
                qs_desc, qt_desc, row0 + j0 + (it + 2) * BLOCK, col0, q_bar.index(buf), qs.index(buf), qt.index(buf)
            )
        mbarrier.wait(q_bar.index(1 - buf), phase=((it + 1) // 2) & 1)
        xn, yn = _logit_pair(qs.index(1 - buf), qt.index(1 - buf), ks, kt, zero_s)
        rows = (stat0 + j0 + it * BLOCK + offs_r) * D
        gl.atomic_add(DX + rows[:, None] + offs_d[None, :], dq, sem="relaxed")
        x, y = warpgroup_mma_wait(num_outstanding=0, deps=(xn, yn))
    dk, dq = _grad_tile(
        x, y, dk, g_smem, qs.index((n - 1) % 2), ks, LseS, LseT, Dkl, stat0 + j0 + (n - 1) * BLOCK, cols, sc_s, sc_t,
        zero_d, BLOCK, row_l, n == 1
    )
    rows = (stat0 + j0 + (n - 1) * BLOCK + offs_r) * D
    gl.atomic_add(DX + rows[:, None] + offs_d[None, :], dq, sem="relaxed")
    rows = (stat0 + j0 + offs_r) * D
    gl.atomic_add(DX + rows[:, None] + offs_d[None, :], dk, sem="relaxed")
    _release(k_bar, q_bar)


def relation_kl_grad_gluon(
    student: torch.Tensor, teacher: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, dkl: torch.Tensor,
    scale_s: float | None = None, scale_t: float | None = None
) -> torch.Tensor:
    """∂(Σ_i dkl_i KL_i)/∂student for the causal self-relation, from the forward's base-2 LSEs."""
    B, H, T, D = student.shape
    s2, t2, (rb, rh, ch) = _checked_views(student, teacher, BWD_BLOCK)
    a_s, a_t = _scales(D, scale_s, scale_t)
    sc_t = a_t * LOG2E
    dx = torch.zeros(B, H, T, D, device=student.device, dtype=torch.float32)
    _relation_bwd_kernel[(T // BWD_BLOCK, B * H)](
        _desc(s2, [BWD_BLOCK, D]), _desc(t2, [BWD_BLOCK, D]), lse_s, lse_t, dkl.float().expand(B, H, T).contiguous(),
        dx, a_s * LOG2E, sc_t, T, H, rb, rh, ch, BWD_BLOCK, D, num_warps=BWD_WARPS
    )
    return (dx * a_s).to(student.dtype)


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x [B, H, T, D] (contiguous, or the transpose of a contiguous [B, T, H, D]) as the 2-D tensor
    the TMA descriptor reads, with the row offset of a batch and of a head and the column offset
    of a head in it."""
    B, H, T, D = x.shape
    if x.is_contiguous():
        return x.view(B * H * T, D), H * T, T, 0
    if x.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2).reshape(B * T, H * D), T, 0, D
    raise ValueError("gluon_relation_kl: x must be contiguous [B, H, T, D] or a [B, T, H, D] transpose view")


def _checked_views(student: torch.Tensor, teacher: torch.Tensor, multiple: int):
    """What the kernels cover, or a ValueError naming what is not; then both 2-D views and the
    shared row/column offsets of a batch and a head."""
    B, H, T, D = student.shape
    if teacher.shape != student.shape or student.dtype != torch.bfloat16 or teacher.dtype != torch.bfloat16:
        raise ValueError(
            f"gluon_relation_kl: bf16 student and teacher of one shape, got {student.dtype} "
            f"{tuple(student.shape)} and {teacher.dtype} {tuple(teacher.shape)}"
        )
    if D not in (64, 128) or T % multiple:
        raise ValueError(f"gluon_relation_kl: D in (64, 128) and T a multiple of {multiple}, got D={D}, T={T}")
    s2, *offsets = _rows_view(student)
    t2, *t_offsets = _rows_view(teacher)
    if offsets != t_offsets:
        raise ValueError("gluon_relation_kl: the student and the teacher must have the same layout")
    return s2, t2, tuple(offsets)


def _scales(D: int, scale_s: float | None, scale_t: float | None) -> tuple[float, float]:
    """The student's and the teacher's logit scales, checked and defaulted (1/sqrt(D)) as the op does."""
    from linearard_ray.ops.api import _check_scale

    return _check_scale("scale_s", scale_s, D), _check_scale("scale_t", scale_t, D)


def _desc(x2: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), block, layout)


def relation_kl_rows_gluon(
    student: torch.Tensor, teacher: torch.Tensor, scale_s: float | None = None, scale_t: float | None = None,
    q_in_regs: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL rows [B, H, T] (natural log) and the base-2 LSEs of the causal self-relations."""
    B, H, T, D = student.shape
    s2, t2, (rb, rh, ch) = _checked_views(student, teacher, BLOCK_M)
    sc_s, sc_t = (a * LOG2E for a in _scales(D, scale_s, scale_t))
    lse_s, lse_t, kl = (torch.empty(B, H, T, device=student.device, dtype=torch.float32) for _ in range(3))
    grid = (T // BLOCK_M, B * H)
    _relation_fwd_kernel[grid](
        _desc(s2, [BLOCK_M, D]), _desc(s2, [BLOCK_N, D]), _desc(t2, [BLOCK_M, D]), _desc(t2, [BLOCK_N, D]), lse_s,
        lse_t, kl, sc_s, sc_t, T, H, rb, rh, ch, BLOCK_M, BLOCK_N, D, num_warps=NUM_WARPS, Q_IN_REGS=q_in_regs
    )
    return kl, lse_s, lse_t


class GluonRelationKL(torch.autograd.Function):
    """Per-row KL [B, H, T] of one causal self-relation with student grads, by the two kernels."""

    @staticmethod
    def forward(ctx, student, teacher, scale_s, scale_t, q_in_regs=False, backward="gluon", forward=None):
        if forward is not None:  # another forward with the same outputs (gluon_ws_forward.py)
            kl, lse_s, lse_t = forward(student, teacher, scale_s, scale_t)
        else:
            kl, lse_s, lse_t = relation_kl_rows_gluon(student, teacher, scale_s, scale_t, q_in_regs)
        ctx.save_for_backward(student, teacher, lse_s, lse_t)
        ctx.scales = (scale_s, scale_t)
        ctx.backward_impl = backward  # fixed when the forward runs, as the op fixes its backward mode
        return kl

    @staticmethod
    def backward(ctx, dkl):
        student, teacher, lse_s, lse_t = ctx.saved_tensors
        if ctx.backward_impl == "op":  # the op's default Triton sweep, from these LSEs (the same base-2 convention)
            import importlib

            rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")
            a_s, a_t = _scales(student.shape[-1], *ctx.scales)
            rel = rk._prep(rk._Rel(student, None, teacher, None, a_s, a_t), True)
            (grad,), _ = rk._backward([rel], None, True, 1, True, lse_s, lse_t, dkl)
            return grad, None, None, None, None, None, None
        return (
            relation_kl_grad_gluon(student, teacher, lse_s, lse_t, dkl, *ctx.scales), None, None, None, None, None,
            None
        )


routed = {"gluon": 0, "op": 0}  # calls of the op's relation_kl_rows since install(), by where they went


def install(backward: str = "gluon", forward: str = "gluon"):
    """Route the op's eligible relation calls (causal self-relations, no mask, what the kernels
    cover) to the Gluon kernels, for benchmarks; the rest go to the op as before. backward="op"
    keeps the Gluon forward but finishes with the op's sweep backward; forward="ws" takes the
    warp-specialised forward of gluon_ws_forward.py. Returns the undo."""
    import importlib
    import os

    if forward not in ("gluon", "ws"):
        raise ValueError(f"forward must be 'gluon' or 'ws', got {forward!r}")
    fwd_fn = None
    if forward == "ws":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        fwd_fn = importlib.import_module("gluon_ws_forward").relation_kl_rows_ws

    q_in_regs = os.environ.get("GLUON_Q_IN_REGS", "0") == "1"  # the forward variant, for the step benchmark
    if backward not in ("gluon", "op"):
        raise ValueError(f"backward must be 'gluon' or 'op', got {backward!r}")

    rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")
    original = rk.relation_kl_rows

    def relation_kl_rows(sq, sk, tq, tk, mask, causal, scale_s, scale_t):
        ok = sk is None and tk is None and mask is None and causal
        if ok:
            try:
                _checked_views(sq, tq, BLOCK_M)
            except ValueError:
                ok = False
        routed["gluon" if ok else "op"] += 1
        if ok:
            return GluonRelationKL.apply(sq, tq.detach(), scale_s, scale_t, q_in_regs, backward, fwd_fn)
        return original(sq, sk, tq, tk, mask, causal, scale_s, scale_t)

    rk.relation_kl_rows = relation_kl_rows
    return lambda: setattr(rk, "relation_kl_rows", original)


def _resources(k) -> dict:
    """Registers, spilled bytes, shared memory and wgmma counts of a kernel compiled for sm_90."""
    import re
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(local.group(1)) if local else None,
        "shared_bytes": k.metadata.shared,
        "wgmma": k.asm["ptx"].count("wgmma.mma_async"),
        "product_waits_in_loop_body": _waits_in_loops(k.asm["ttgir"]),
        "wgmma_serialized": _wgmma_serialized(k.asm["ptx"]),
    }


def _wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas turns the kernel's async wgmma into wait-after-each (its info C7514), which
    undoes every overlap the kernel is written for. The session-13 forward had this: its loop
    carried a product still in flight across the back edge, and ran 0.78x the Triton kernel."""
    import subprocess
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [str(tool), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True
        )
    return "C7514" in out.stdout + out.stderr


def _waits_in_loops(ttgir: str) -> int:
    """How many wgmma waits one pass of the first loop makes (its body up to the matching brace):
    the Triton forward waits after each of its two products, before any softmax work; the Gluon
    forward waits once per column tile, the backward once for its logit pair and once for its two
    gradient products."""
    head = ttgir.find("scf.for")
    start = ttgir.rfind("{", head, ttgir.find("\n", head))  # the region opens at the end of the loop's line
    depth, end = 0, start
    for end in range(start, len(ttgir)):
        depth += {"{": 1, "}": -1}.get(ttgir[end], 0)
        if depth == 0:
            break
    return ttgir[start:end].count("warp_group_dot_wait")


def compile_for_hopper(D: int, kernel: str = "fwd", q_in_regs: bool = False) -> dict:
    """Compile the forward ("fwd") or backward ("bwd") kernel for sm_90 without a GPU (Triton 3.6
    ships ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    x2 = torch.empty(1024, D, dtype=torch.bfloat16)
    ints = {n: "i32" for n in ("T", "H", "rows_per_b", "rows_per_h", "cols_per_h")}
    if kernel == "fwd":
        fn, warps = _relation_fwd_kernel, NUM_WARPS
        descs = {
            n: mangle_type(_desc(x2, [BLOCK_M if n[0] == "q" else BLOCK_N, D]))
            for n in ("qs_desc", "ks_desc", "qt_desc", "kt_desc")
        }
        ptrs = {"LseS": "*fp32", "LseT": "*fp32", "Kl": "*fp32"}
        consts = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "D": D, "num_warps": warps, "Q_IN_REGS": q_in_regs}
    else:
        fn, warps = _relation_bwd_kernel, BWD_WARPS
        descs = {n: mangle_type(_desc(x2, [BWD_BLOCK, D])) for n in ("qs_desc", "qt_desc")}
        ptrs = {"LseS": "*fp32", "LseT": "*fp32", "Dkl": "*fp32", "DX": "*fp32"}
        consts = {"BLOCK": BWD_BLOCK, "D": D, "num_warps": warps}
    sig = {**descs, **ptrs, "sc_s": "fp32", "sc_t": "fp32", **ints, **{c: "constexpr" for c in consts}}
    k = triton.compile(
        GluonASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 128), options={"num_warps": warps}
    )
    return {"kernel": f"gluon {kernel}" + (" q-in-registers" if q_in_regs else ""), "D": D, **_resources(k)}


def compile_triton_fwd(D: int) -> dict:
    """The op's own Triton forward (``_fwd_kernel``, causal self-relation, its default tiles) compiled
    the same way, with the 16-divisibility the JIT gives aligned pointers and sizes (without it the
    loads are not pipelined), for comparison."""
    import importlib

    from triton.backends.compiler import GPUTarget

    rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")
    cfg = rk._FWD_CFG[D]
    consts = dict(
        D=D, BLOCK_D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NREL=1, CAUSAL=True, HAS_MASK=False, EVEN_T=True,
        IEEE=False, UPCAST=False, ALIGN=16, ROWFWD=False
    )
    ptrs = {
        "S": "*bf16",
        "SK": "*bf16",
        "TS": "*bf16",
        "TK": "*bf16",
        "Mask": "*i8",
        "LseS": "*fp32",
        "LseT": "*fp32",
        "Kl": "*fp32",
        "R": "*fp32",
    }
    names = rk._fwd_kernel.arg_names
    sig = {
        n: ptrs.get(n)
        or ("constexpr" if n in consts else "fp32" if n.startswith("sc") else "i64" if n.startswith("off") else "i32")
        for n in names
    }
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if sig[n].startswith("*") or (sig[n] == "i32" and n != "REP")
    }
    src = triton.compiler.ASTSource(fn=rk._fwd_kernel, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(
        src, target=GPUTarget("cuda", 90, 128), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    )
    return {
        "kernel": f"triton {cfg.block_m}x{cfg.block_n}/{cfg.num_warps} warps",
        "D": D,
        **_resources(k),
        "cp_async": k.asm["ptx"].count("cp.async.ca") + k.asm["ptx"].count("cp.async.cg"),
    }


def _dense_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Float64 dense reference: KL(softmax(t tᵀ/√D) || softmax(s sᵀ/√D)) per causal row."""
    s, t = s.double(), t.double()
    D, T = s.shape[-1], s.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
    ls = (s @ s.transpose(-1, -2) * D**-0.5).masked_fill(~causal, float("-inf")).log_softmax(-1)
    lt = (t @ t.transpose(-1, -2) * D**-0.5).masked_fill(~causal, float("-inf")).log_softmax(-1)
    return torch.where(causal, lt.exp() * (lt - ls), 0.0).sum(-1)


def _check_inputs():
    """Fresh random bf16 student/teacher pairs (B=2, H=3, T=640; the teacher is the student plus
    noise 0.7) for D 64 and 128, contiguous and as the [B, T, H, D] view a model hands over:
    yields (D, view, student, teacher)."""
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for D in (64, 128):
        for view in (False, True):
            B, H, T = 2, 3, 640
            shape = (B, T, H, D) if view else (B, H, T, D)
            s = torch.randn(shape, device="cuda", generator=gen)
            t = s + 0.7 * torch.randn(shape, device="cuda", generator=gen)
            s, t = (x.to(torch.bfloat16) for x in (s, t))
            if view:
                s, t = s.transpose(1, 2), t.transpose(1, 2)
            yield D, view, s, t


def _check() -> bool:
    """Against the float64 dense reference on fresh random inputs, both layouts, D 64 and 128."""
    from linearard_ray.ops import relation_kl

    ok = True
    for D, view, s, t in _check_inputs():
        B, H, T = s.shape[0], s.shape[1], s.shape[2]
        kl, _, _ = relation_kl_rows_gluon(s, t)
        leaf = s.detach().double().requires_grad_()
        ref = _dense_kl(leaf, t)
        err = ((kl.double() - ref).abs() / (ref.abs() + 1e-2)).max().item()
        kl_r, _, _ = relation_kl_rows_gluon(s, t, q_in_regs=True)
        err_r = ((kl_r.double() - ref.detach()).abs() / (ref.detach().abs() + 1e-2)).max().item()
        dkl = torch.rand(B, H, T, device="cuda") + 0.5
        (ref * dkl).sum().backward()
        gerrs = {}
        for bwd in ("gluon", "op"):
            sg = s.detach().requires_grad_()
            # through the op's entry point, with install()'s routing, as the distillation step calls it
            before = routed["gluon"]
            undo = install(backward=bwd)
            try:
                (relation_kl(sg, teacher_q=t, reduction="none") * dkl).sum().backward()
            finally:
                undo()
            assert routed["gluon"] == before + 1, routed
            gerrs[bwd] = ((sg.grad.double() - leaf.grad).abs().max() / leaf.grad.abs().max()).item()
        print(
            f"check D={D} view={view}: KL max rel err {err:.2e} ({err_r:.2e} q-in-registers; mean KL "
            f"{ref.mean().item():.4f}); "
            "grad max err / max |grad| " + ", ".join(f"{v:.2e} ({k} backward)" for k, v in gerrs.items())
        )
        ok &= max(err, err_r) < 2e-2 and max(gerrs.values()) < 2e-2
    return ok


def _bench(Ts: list[int]) -> None:
    """Forward, backward and fwd+bwd ms against the op's Triton path and SDPA, same shapes, same
    process (B=1, H=32, bf16)."""
    import importlib

    import torch.nn.functional as F

    rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")  # the package's relation_kl is the function

    for D in (128, 64):
        for T in Ts:
            s = torch.randn(1, 32, T, D, device="cuda", dtype=torch.bfloat16)
            t = s + 0.5 * torch.randn_like(s)
            ms = {
                "gluon": triton.testing.do_bench(lambda s=s, t=t: relation_kl_rows_gluon(s, t)),
                "gluon q-in-registers": triton.testing.do_bench(
                    lambda s=s, t=t: relation_kl_rows_gluon(s, t, q_in_regs=True)
                ),
                "triton": triton.testing.do_bench(
                    lambda s=s, t=t, D=D: rk.relation_kl_rows(s, None, t, None, None, True, D**-0.5, D**-0.5)
                ),
                "sdpa": triton.testing.do_bench(lambda s=s: F.scaled_dot_product_attention(s, s, s, is_causal=True)),
            }
            kl, lse_s, lse_t = relation_kl_rows_gluon(s, t)
            ones = torch.ones_like(kl)
            sg = s.detach().requires_grad_()
            ms["gluon bwd"] = triton.testing.do_bench(
                lambda s=s, t=t, lse_s=lse_s, lse_t=lse_t, ones=ones: relation_kl_grad_gluon(s, t, lse_s, lse_t, ones)
            )
            ms["triton fwd+bwd"] = triton.testing.do_bench(
                lambda sg=sg, t=t, D=D: (
                    rk.relation_kl_rows(sg, None, t, None, None, True, D**-0.5, D**-0.5).sum().backward()
                )
            )
            ms["sdpa fwd+bwd"] = triton.testing.do_bench(
                lambda sg=sg: F.scaled_dot_product_attention(sg, sg, sg, is_causal=True).sum().backward()
            )
            # two products (student, teacher) over the causal half of the T x T logits, per head
            flops = 2 * 2 * 32 * (T * T / 2) * D
            print(
                f"D={D} T={T}: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                + f"; gluon/triton {ms['triton'] / ms['gluon']:.2f}x speed, "
                f"gluon/sdpa {ms['gluon'] / ms['sdpa']:.2f}x time"
                + f"; products at {flops / ms['gluon'] / 1e9:.0f} (gluon) / "
                f"{flops / ms['triton'] / 1e9:.0f} (triton) TFLOP/s"
                + f"; fwd+bwd gluon {ms['gluon'] + ms['gluon bwd']:.3f} ms, "
                f"{ms['triton fwd+bwd'] / (ms['gluon'] + ms['gluon bwd']):.2f}x the op's speed"
                + f"; gluon fwd + op bwd {ms['gluon'] + ms['triton fwd+bwd'] - ms['triton']:.3f} ms"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true", help="compile for sm_90 (no GPU needed) and print resource use")
    p.add_argument("--check", action="store_true", help="GPU: values against the float64 reference")
    p.add_argument("--bench", action="store_true", help="GPU: forward time against the Triton op and SDPA")
    p.add_argument("--T", default="2048,4096,8192,16384")
    a = p.parse_args()
    return run_cli(
        a,
        lambda: (
            r
            for D in (64, 128)
            for r in (
                compile_for_hopper(D), compile_for_hopper(D, q_in_regs=True), compile_triton_fwd(D),
                compile_for_hopper(D, "bwd")
            )
        ),
        _check,
        _bench,
    )


def run_cli(a, compiled_rows, check, bench) -> int:
    """--compile (one JSON line per kernel that compiled_rows() yields), then --check, then --bench
    (on the --T list); the exit status says whether the check passed."""
    if a.compile:
        import json
        import os

        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            # Under TRITON_INTERPRET=1 (the CPU test setting) Triton's own jit helpers (gl.max, ...)
            # were made interpreted functions at import, which no compiled kernel can call.
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "0"})
        for r in compiled_rows():
            print(json.dumps(r))
    ok = check() if a.check else True
    if a.bench:
        bench([int(x) for x in a.T.split(",")])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
