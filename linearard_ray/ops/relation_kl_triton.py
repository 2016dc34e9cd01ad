"""Relation KL on the GPU: Triton kernels, their launchers and the autograd Function.

Reading order, as in flash-attention's Triton ops: the reference is the chunked PyTorch path
(``relation_kl_torch``, same math); this module then holds the kernels (jit helpers, forward,
backward, one-recompute backward), their launchers, and the autograd Function
``TritonRelationKL`` with the row functions (``relation_kl_rows``, ``relation_kl_layer_rows``) that
the public functions of ``api`` call.

One head: student rows a_i, columns b_j (b = a for a self-relation), teacher c_i, d_j,
s = a_s A Bᵀ, t = a_t C Dᵀ, KL_i = Σ_j p^t_ij (t_ij - s_ij) - LSE_t(i) + LSE_s(i) over the valid
columns of row i. Logits are kept in base 2 (log2(e) folded into the scales, exp2 on the chip).

Forward (``_fwd_kernel``): a program owns BLOCK_M rows and sweeps the column tiles once, keeping
online max/sum for the student and the teacher row plus Σ exp2(t - m_t)(t - s), rescaled when m_t
moves (FlashAttention-style). It writes only LSE_s, LSE_t and KL per row (fp32, [B, H, T]).
Invalid rows (padding) get LSE = +inf, which makes every recomputed probability of that row 0.

Backward (``_bwd_kernel``): ∂KL_i/∂s_ij = p^s_ij - p^t_ij = G_ij; dA = a_s G B, dB = a_s Gᵀ A,
both tiles recomputed from the saved LSEs. No atomics: a program owns one block I of *output*
rows and writes it once, so results are bitwise reproducible.
- Self-relation (B = A): grad_I = a_s Σ_J (G_IJ + G_JIᵀ) A_J. Since s and t are symmetric, one
  logit tile X_IJ gives both the row part (G_IJ, normalised by the LSEs of rows I) and the column
  part (G_JIᵀ, normalised by the LSEs of rows J), so a single sweep over J does dA + dB. With
  causal masking the row part lives on J < I, the column part on J > I, both on the diagonal
  tiles: every program sweeps all column tiles once, so the causal work is balanced.
- Cross-relation with GQA: the program for (key head g, block I) first writes dA of block I for
  each of the REP query heads of g (row sweeps over J <= I), then dB of block I, summing over
  those query heads in a fixed order (column sweeps over J >= I).
Causal tiles entirely above (row part) or below (column part) the diagonal are never visited.
That sweep computes every causal logit tile twice (once per part). ``set_backward_mode('atomic')``
runs the one-recompute backward for causal self-relations instead (``_bwd1_kernel``, below): each
tile once, the row part added through fp32 atomics, 6 products of T²D/2 per relation with the
forward instead of 8, not bitwise reproducible. The atomics and the register spills of the owned
accumulator make it slower than the sweep, so it is opt-in (measured: benchmarks/README.md,
'Relation-KL op').
``set_backward_mode('rowfwd')`` moves the row part into the forward instead: when a student grad
is wanted, the forward also accumulates, FlashAttention-style over the student's key tile it has
loaded anyway, O^s_i = Σ_j p^s_ij b_j and O^t_i = Σ_j p^t_ij b_j (two fp32 [BLOCK_M, D]
accumulators, rescaled as their maxima move) and stores R_i = O^s_i - O^t_i (fp32 [B, H, T, D]).
The backward is then the sweep kernel with the row part skipped: the column part only (tiles
J >= I when causal), plus R weighted by the row's upstream grad, times a_s. Per causal tile that
is 4 + 3 = 7 products and 2 + 2 exp2 instead of 8 and 6; it covers every case the sweep does (a
cross-relation's dA is all row part, so its backward is the dB sweep only) and is bitwise
reproducible. The cost is the R buffer, alive from the forward to the backward, and P rounded to
the input dtype in two products whose difference is R (the sweep rounds G = P_s - P_t once).
It is faster than the sweep at long T (fewer products and exponentials per tile), but it costs
the R buffer's memory and its bf16 grads are rounder near agreement, so it is opt-in (measured:
benchmarks/README.md, 'Relation-KL op').

``relation_kl_layer`` runs the Q/Q, K/K and V/V self-relations in the same launches: the grid's
head axis spans the heads of all three (NREL = 3) and a program reaches its relation's tensors by
element offsets from relation 0's (host-computed, with alignment hints), so there is one kernel
body and no extra register pressure. It saves launches and tail waves; the arithmetic is that of
three calls, so it gains most at short T, while one relation alone cannot fill the GPU (measured:
benchmarks/README.md, 'Relation-KL op').

Upstream gradients: a sum/mean reduction hands the backward one value for every row (a stride-0
tensor), which the kernel applies as a scalar; per-row gradients are divided by their max |.|
first and the factor is applied at the end, so G keeps its precision when rounded to fp16.

Memory: beyond the inputs and returned gradients only O(B·H·T) fp32 row statistics, except that a
teacher tensor whose strides differ from its student's (or inputs without unit stride on D) is
copied to a contiguous layout first, and that the rowfwd mode keeps R, 4·B·H·T·D bytes (twice a
bf16 student tensor), from the forward until the backward.

Precision: fp16/bf16 inputs go to the tensor cores with fp32 accumulation; G is rounded to the
input dtype for the second product (as FlashAttention does with dS). fp32 inputs use full-fp32
("ieee") dots and smaller tiles: accurate (≤ 1e-5 against float64) but slower than 16-bit inputs
(not tuned); there is no tf32 mode. Under TRITON_INTERPRET=1 (CPU tests) the tiles are upcast to
fp32 before each dot (numpy has no bf16): exact for the inputs, and G is still rounded to the
input dtype first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # used inside the kernels
# Element offsets between the relations of one layer call differ from call to call (they are
# distances between separate allocations). Triton would specialise (and recompile) on their
# divisibility and on whether they fit in 32 bits, so they are passed unspecialised and biased
# into one 64-bit range; the kernels subtract the bias. Without this a training loop recompiled
# the kernels on most calls, each recompilation a long stall of the host.
OFFSET_BIAS = 1 << 40
_BIAS = tl.constexpr(OFFSET_BIAS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_scalar_index() -> None:
    """Let Triton 3.6's CPU interpreter use tensor scalars as loop bounds under recent NumPy (2.4).

    The interpreter stores scalars as 1-element arrays and turns them into ints with int(array),
    which recent NumPy rejects, so ``range(lo, hi)`` on program-dependent bounds fails. Only the
    interpreter (tests) is touched, and only when NumPy has that behaviour.
    """
    import numpy as np

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter as it

    orig = getattr(it, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fixed = True
    it._patch_lang_tensor = patched


if _interpreting():
    _fix_interpreter_scalar_index()


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _load_tile(ptrs, rows, T, dmask, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=(rows < T)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < T)[:, None] & dmask[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_pair(
    A, TA, base, rows, st, offs_d, dmask, T, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr
):
    """The student's and the teacher's [rows, D] tiles: they share offsets (`_same_layout`)."""
    p = base + rows[:, None] * st + offs_d[None, :]
    return (
        _load_tile(A + p, rows, T, dmask, not EVEN_T, EVEN_D, UPCAST),
        _load_tile(TA + p, rows, T, dmask, not EVEN_T, EVEN_D, UPCAST),
    )


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _fwd_tile(
    qs, qt, SK, TK, k_base, sk_t, j0, offs_m, offs_d, dmask, T, Mask, mask_base, m_s, l_s, m_t, l_t, acc, o_s, o_t,
    sc_s, sc_t, BLOCK_N: tl.constexpr, CMASK: tl.constexpr, BMASK: tl.constexpr, HAS_MASK: tl.constexpr,
    EVEN_T: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ROWFWD: tl.constexpr
):
    offs_n = j0 + tl.arange(0, BLOCK_N)
    ks, kt = _load_pair(SK, TK, k_base, offs_n, sk_t, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
    x = _dot(qs, tl.trans(ks), IEEE)  # raw student logits (scale > 0 applied below)
    y = _dot(qt, tl.trans(kt), IEEE)
    dd = y * sc_t - x * sc_s
    if CMASK or BMASK or HAS_MASK:
        valid = offs_n[None, :] < T + 0 * offs_m[:, None]
        if CMASK:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if HAS_MASK:
            cm = tl.load(Mask + mask_base + offs_n, mask=offs_n < T, other=0)
            valid = valid & (cm != 0)[None, :]
        x = tl.where(valid, x, float("-inf"))
        y = tl.where(valid, y, float("-inf"))
    m_s_new = tl.maximum(m_s, tl.max(x, 1) * sc_s)
    alpha_s = tl.exp2(m_s - m_s_new)
    p_s = tl.exp2(x * sc_s - m_s_new[:, None])
    l_s = l_s * alpha_s + tl.sum(p_s, 1)
    m_t_new = tl.maximum(m_t, tl.max(y, 1) * sc_t)
    alpha_t = tl.exp2(m_t - m_t_new)
    p_t = tl.exp2(y * sc_t - m_t_new[:, None])
    l_t = l_t * alpha_t + tl.sum(p_t, 1)
    acc = acc * alpha_t + tl.sum(p_t * dd, 1)
    if ROWFWD:
        # The row part of the student grad, Σ_j (p^s_ij - p^t_ij) b_j, as two FlashAttention
        # outputs over the student's own key tile (already loaded): the two softmaxes have their
        # own running maxima, so they cannot share one accumulator before the LSEs are known.
        # P is rounded to the input dtype for the tensor cores, as FlashAttention does.
        ps = p_s.to(SK.dtype.element_ty)
        pt = p_t.to(SK.dtype.element_ty)
        if UPCAST:
            ps = ps.to(tl.float32)
            pt = pt.to(tl.float32)
        o_s = o_s * alpha_s[:, None] + _dot(ps, ks, IEEE)
        o_t = o_t * alpha_t[:, None] + _dot(pt, ks, IEEE)
    return m_s_new, l_s, m_t_new, l_t, acc, o_s, o_t


@triton.jit
def _fwd_body(
    S, SK, TS, TK, ss_b, ss_h, ss_t, sk_b, sk_h, sk_t, sc_s, sc_t, b, h, hh, pid_m, Mask, LseS, LseT, Kl, R, T, HTOT,
    REP, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ROWFWD: tl.constexpr
):
    """Rows of block pid_m of query head h (flat head hh over the relations) of batch b."""
    b64 = b.to(tl.int64)
    q_base = b64 * ss_b + h.to(tl.int64) * ss_h
    k_base = b64 * sk_b + (h // REP).to(tl.int64) * sk_h
    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    EVEN_D: tl.constexpr = D == BLOCK_D
    qs, qt = _load_pair(S, TS, q_base, offs_m, ss_t, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
    mask_base = b64 * T

    m_s = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: empty rows never make NaN
    m_t = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROWFWD:
        o_s = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        o_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:  # never updated or stored; one column keeps the plain forward's registers as they were
        o_s = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
        o_t = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    num_n = tl.cdiv(T, BLOCK_N)
    if CAUSAL:
        lo = i0 // BLOCK_N
        hi = tl.minimum(tl.cdiv(i0 + BLOCK_M, BLOCK_N), num_n)
        for j in range(0, lo):
            m_s, l_s, m_t, l_t, acc, o_s, o_t = _fwd_tile(
                qs, qt, SK, TK, k_base, sk_t, j * BLOCK_N, offs_m, offs_d, dmask, T, Mask, mask_base, m_s, l_s, m_t,
                l_t, acc, o_s, o_t, sc_s, sc_t, BLOCK_N, False, False, HAS_MASK, EVEN_T, EVEN_D, IEEE, UPCAST, ROWFWD
            )
        for j in range(lo, hi):
            m_s, l_s, m_t, l_t, acc, o_s, o_t = _fwd_tile(
                qs, qt, SK, TK, k_base, sk_t, j * BLOCK_N, offs_m, offs_d, dmask, T, Mask, mask_base, m_s, l_s, m_t,
                l_t, acc, o_s, o_t, sc_s, sc_t, BLOCK_N, True, False, HAS_MASK, EVEN_T, EVEN_D, IEEE, UPCAST, ROWFWD
            )
    else:
        n_full = T // BLOCK_N
        for j in range(0, n_full):
            m_s, l_s, m_t, l_t, acc, o_s, o_t = _fwd_tile(
                qs, qt, SK, TK, k_base, sk_t, j * BLOCK_N, offs_m, offs_d, dmask, T, Mask, mask_base, m_s, l_s, m_t,
                l_t, acc, o_s, o_t, sc_s, sc_t, BLOCK_N, False, False, HAS_MASK, EVEN_T, EVEN_D, IEEE, UPCAST, ROWFWD
            )
        for j in range(n_full, num_n):
            m_s, l_s, m_t, l_t, acc, o_s, o_t = _fwd_tile(
                qs, qt, SK, TK, k_base, sk_t, j * BLOCK_N, offs_m, offs_d, dmask, T, Mask, mask_base, m_s, l_s, m_t,
                l_t, acc, o_s, o_t, sc_s, sc_t, BLOCK_N, False, True, HAS_MASK, EVEN_T, EVEN_D, IEEE, UPCAST, ROWFWD
            )

    # l = 0 only on rows with nothing valid (padding, past T); they are overwritten below.
    l_s = tl.where(l_s > 0, l_s, 1.0)
    l_t = tl.where(l_t > 0, l_t, 1.0)
    lse_s = m_s + tl.log2(l_s)
    lse_t = m_t + tl.log2(l_t)
    kl = LN2 * (acc / l_t - lse_t + lse_s)
    row_ok = offs_m < T
    if HAS_MASK:
        rm = tl.load(Mask + mask_base + offs_m, mask=row_ok, other=0)
        row_ok = row_ok & (rm != 0)
    stat = (b64 * HTOT + hh) * T + offs_m
    tl.store(LseS + stat, tl.where(row_ok, lse_s, float("inf")), mask=offs_m < T)
    tl.store(LseT + stat, tl.where(row_ok, lse_t, float("inf")), mask=offs_m < T)
    tl.store(Kl + stat, tl.where(row_ok, kl, 0.0), mask=offs_m < T)
    if ROWFWD:
        # Unscaled, unweighted: the backward applies a_s, the upstream grad of the row and its
        # normalisation (see _bwd_body), exactly as it does to the sweep's row part. Rows that are
        # padding (mask 0) or see nothing get 0, like the LSE = +inf rows of the sweep.
        rpart = tl.where(row_ok[:, None], o_s / l_s[:, None] - o_t / l_t[:, None], 0.0)
        rp = R + stat[:, None] * D + offs_d[None, :]  # stat is int64
        if EVEN_T and EVEN_D:
            tl.store(rp, rpart)
        else:
            tl.store(rp, rpart, mask=(offs_m < T)[:, None] & dmask[None, :])


@triton.jit
def _hint(x, ALIGN: tl.constexpr):
    if ALIGN > 1:
        x = tl.multiple_of(x, ALIGN)
    return x


@triton.jit
def _sel(r, v0, v1, v2):
    return tl.where(r == 0, v0, tl.where(r == 1, v1, v2))


@triton.jit
def _relation(
    hh, H0, H1, S, TS, off_s1, off_t1, off_s2, off_t2, ss_b0, ss_h0, ss_t0, ss_b1, ss_h1, ss_t1, ss_b2, ss_h2, ss_t2,
    ALIGN: tl.constexpr
):
    """In a fused layer launch: the relation r of flat head hh, its student and teacher tensors
    (element offsets from S / TS) and row strides, with the 16-byte alignment facts as hints."""
    r = (hh >= H0).to(tl.int32) + (hh >= H0 + H1).to(tl.int32)
    Sr = S + _hint(_sel(r, 0, off_s1 - _BIAS, off_s2 - _BIAS), ALIGN)
    TSr = TS + _hint(_sel(r, 0, off_t1 - _BIAS, off_t2 - _BIAS), ALIGN)
    sb = _hint(_sel(r, ss_b0, ss_b1, ss_b2), ALIGN)
    sh = _hint(_sel(r, ss_h0, ss_h1, ss_h2), ALIGN)
    st = _hint(_sel(r, ss_t0, ss_t1, ss_t2), ALIGN)
    return r, Sr, TSr, sb, sh, st


@triton.jit(do_not_specialize=["off_s1", "off_t1", "off_s2", "off_t2"])
def _fwd_kernel(
    S, SK, TS, TK, Mask, LseS, LseT, Kl, R, off_s1, off_t1, off_s2, off_t2, ss_b0, ss_h0, ss_t0, ss_b1, ss_h1, ss_t1,
    ss_b2, ss_h2, ss_t2, sk_b, sk_h, sk_t, H0, H1, scs0, scs1, scs2, sct0, sct1, sct2, T, HTOT, REP, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NREL: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
    ROWFWD: tl.constexpr
):
    num_m = tl.cdiv(T, BLOCK_M)
    pid_m = num_m - 1 - tl.program_id(0)  # longest causal rows first
    pid_bh = tl.program_id(1)
    b = pid_bh // HTOT
    hh = pid_bh % HTOT
    if NREL == 1:
        _fwd_body(
            S, SK, TS, TK, ss_b0, ss_h0, ss_t0, sk_b, sk_h, sk_t, scs0, sct0, b, hh, hh, pid_m, Mask, LseS, LseT, Kl, R,
            T, HTOT, REP, D, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, EVEN_T, IEEE, UPCAST, ROWFWD
        )
    else:
        # Self-relations of one layer in one launch: one body, so no extra registers.
        r, Sr, TSr, sb, sh, st = _relation(
            hh, H0, H1, S, TS, off_s1, off_t1, off_s2, off_t2, ss_b0, ss_h0, ss_t0, ss_b1, ss_h1, ss_t1, ss_b2, ss_h2,
            ss_t2, ALIGN
        )
        _fwd_body(
            Sr, Sr, TSr, TSr, sb, sh, st, sb, sh, st, _sel(r, scs0, scs1, scs2), _sel(r, sct0, sct1, sct2), b,
            hh - _sel(r, 0, H0, H0 + H1), hh, pid_m, Mask, LseS, LseT, Kl, R, T, HTOT, REP, D, BLOCK_D, BLOCK_M,
            BLOCK_N, CAUSAL, HAS_MASK, EVEN_T, IEEE, UPCAST, ROWFWD
        )


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_tile(
    acc, rs, rt, C, TC, c_base, c_st, j0, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r, LseS, LseT, DKl, stat_base,
    Mask, mask_base, sc_s, sc_t, BLOCK_N: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr, CMASK: tl.constexpr,
    BMASK: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, UNI: tl.constexpr
):
    """acc += G~ @ C_J for one tile J; G~ holds the row part and/or the transposed column part."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    cs, ct = _load_pair(C, TC, c_base, offs_n, c_st, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
    x = _dot(rs, tl.trans(cs), IEEE) * sc_s
    y = _dot(rt, tl.trans(ct), IEEE) * sc_t
    g = tl.zeros_like(x)
    if ROW:  # entries (i in I, j in J), normalised over row i
        gr = tl.exp2(x - lse_s_r[:, None]) - tl.exp2(y - lse_t_r[:, None])
        if not UNI:
            gr = gr * dkl_r[:, None]
        if CMASK:
            gr = tl.where(offs_n[None, :] <= offs_m[:, None], gr, 0.0)
        if BMASK or HAS_MASK:
            cv = offs_n < T
            if HAS_MASK:
                cm = tl.load(Mask + mask_base + offs_n, mask=cv, other=0)
                cv = cv & (cm != 0)
            gr = tl.where(cv[None, :], gr, 0.0)
        g += gr
    if COL:  # entries (j in J, i in I) transposed, normalised over row j; lse = +inf past T
        ls, lt, dk = _row_stats(LseS, LseT, DKl, stat_base, offs_n, T, EVEN_T, UNI)
        if UNI:
            gc = tl.exp2(x - ls[None, :]) - tl.exp2(y - lt[None, :])
        else:
            gc = (tl.exp2(x - ls[None, :]) - tl.exp2(y - lt[None, :])) * dk[None, :]
        if CMASK:
            gc = tl.where(offs_m[:, None] <= offs_n[None, :], gc, 0.0)
        g += gc
    gd = g.to(C.dtype.element_ty)
    if UPCAST:
        gd = gd.to(tl.float32)
    acc += _dot(gd, cs, IEEE)
    return acc


@triton.jit
def _row_stats(LseS, LseT, DKl, stat_base, offs_m, T, EVEN_T: tl.constexpr, UNI: tl.constexpr):
    """LSEs (+inf past T) and normalised upstream grads of some rows (1 when they are uniform)."""
    if EVEN_T:
        ls = tl.load(LseS + stat_base + offs_m)
        lt = tl.load(LseT + stat_base + offs_m)
    else:
        ls = tl.load(LseS + stat_base + offs_m, mask=offs_m < T, other=float("inf"))
        lt = tl.load(LseT + stat_base + offs_m, mask=offs_m < T, other=float("inf"))
    if UNI:
        dk = tl.full(ls.shape, 1.0, tl.float32)
    elif EVEN_T:
        dk = tl.load(DKl + stat_base + offs_m)
    else:
        dk = tl.load(DKl + stat_base + offs_m, mask=offs_m < T, other=0.0)
    return ls, lt, dk


@triton.jit
def _sweep(
    acc, rs, rt, C, TC, c_base, c_st, i0, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r, LseS, LseT, DKl, stat_base,
    Mask, mask_base, sc_s, sc_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW: tl.constexpr, COL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, UNI: tl.constexpr
):
    """All column tiles of one block I that hold valid entries of the requested part(s)."""
    num_n = tl.cdiv(T, BLOCK_N)
    if CAUSAL:
        lo = i0 // BLOCK_N  # tiles < lo: row part only, fully below the diagonal
        hi = tl.minimum(tl.cdiv(i0 + BLOCK_M, BLOCK_N), num_n)  # tiles >= hi: column part only
        if ROW:
            for j in range(0, lo):
                acc = _bwd_tile(
                    acc, rs, rt, C, TC, c_base, c_st, j * BLOCK_N, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r,
                    LseS, LseT, DKl, stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_N, True, False, False, False,
                    HAS_MASK, EVEN_T, EVEN_D, IEEE, UPCAST, UNI
                )
        for j in range(lo, hi):
            acc = _bwd_tile(
                acc, rs, rt, C, TC, c_base, c_st, j * BLOCK_N, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r, LseS,
                LseT, DKl, stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_N, ROW, COL, True, False, HAS_MASK, EVEN_T,
                EVEN_D, IEEE, UPCAST, UNI
            )
        if COL:
            for j in range(hi, num_n):
                acc = _bwd_tile(
                    acc, rs, rt, C, TC, c_base, c_st, j * BLOCK_N, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r,
                    LseS, LseT, DKl, stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_N, False, True, False, False,
                    HAS_MASK, EVEN_T, EVEN_D, IEEE, UPCAST, UNI
                )
    else:
        n_full = T // BLOCK_N
        for j in range(0, n_full):
            acc = _bwd_tile(
                acc, rs, rt, C, TC, c_base, c_st, j * BLOCK_N, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r, LseS,
                LseT, DKl, stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_N, ROW, COL, False, False, HAS_MASK, EVEN_T,
                EVEN_D, IEEE, UPCAST, UNI
            )
        for j in range(n_full, num_n):
            acc = _bwd_tile(
                acc, rs, rt, C, TC, c_base, c_st, j * BLOCK_N, offs_m, offs_d, dmask, T, lse_s_r, lse_t_r, dkl_r, LseS,
                LseT, DKl, stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_N, ROW, COL, False, True, HAS_MASK, EVEN_T,
                EVEN_D, IEEE, UPCAST, UNI
            )
    return acc


@triton.jit
def _store_rows(
    G, g_base, offs_m, offs_d, dmask, T, acc, Mask, mask_base, HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr, D: tl.constexpr
):
    if HAS_MASK:  # a padded position is neither a valid row nor a valid column: its grad is 0
        rm = tl.load(Mask + mask_base + offs_m, mask=offs_m < T, other=0)
        acc = tl.where((rm != 0)[:, None], acc, 0.0)
    ptrs = G + g_base + offs_m[:, None] * D + offs_d[None, :]
    out = acc.to(G.dtype.element_ty)
    if EVEN_T:
        if EVEN_D:
            tl.store(ptrs, out)
        else:
            tl.store(ptrs, out, mask=dmask[None, :])
    else:
        tl.store(ptrs, out, mask=(offs_m < T)[:, None] & dmask[None, :])


@triton.jit
def _row_part(
    R, r_base, offs_m, offs_d, dmask, T, dk, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr, D: tl.constexpr,
    UNI: tl.constexpr
):
    """The row part the forward stored (rowfwd mode), weighted like the sweep's: times the row's
    normalised upstream grad (1 when uniform); a_s and the grad scale come with alpha."""
    ptrs = R + r_base + offs_m[:, None] * D + offs_d[None, :]
    if EVEN_T and EVEN_D:
        rp = tl.load(ptrs)
    else:
        rp = tl.load(ptrs, mask=(offs_m < T)[:, None] & dmask[None, :], other=0.0)
    if not UNI:
        rp = rp * dk[:, None]
    return rp


@triton.jit
def _bwd_body(
    S, SK, TS, TK, GS, GK, ss_b, ss_h, ss_t, sk_b, sk_h, sk_t, H, sc_s, sc_t, alpha, b, g, hoff, pid_m, Mask, LseS,
    LseT, DKl, R, T, HTOT, REP, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SELF: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, UNI: tl.constexpr, ROWFWD: tl.constexpr
):
    """Output block pid_m of key head g (its H/REP query heads when not SELF) of batch b.

    ROWFWD: the forward already stored the row part (R, [B, HTOT, T, D] fp32), so only the column
    part is recomputed here (tiles J >= I when causal, the other half of the sweep's work)."""
    b64 = b.to(tl.int64)
    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mask_base = b64 * T
    EVEN_D: tl.constexpr = D == BLOCK_D

    if SELF:
        base = b64 * ss_b + g.to(tl.int64) * ss_h
        rs, rt = _load_pair(S, TS, base, offs_m, ss_t, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
        stat_base = (b64 * HTOT + hoff + g) * T
        ls, lt, dk = _row_stats(LseS, LseT, DKl, stat_base, offs_m, T, EVEN_T, UNI)
        if ROWFWD:
            acc = _row_part(R, stat_base * D, offs_m, offs_d, dmask, T, dk, EVEN_T, EVEN_D, D, UNI)
            acc = _sweep(
                acc, rs, rt, S, TS, base, ss_t, i0, offs_m, offs_d, dmask, T, ls, lt, dk, LseS, LseT, DKl, stat_base,
                Mask, mask_base, sc_s, sc_t, BLOCK_M, BLOCK_N, False, True, CAUSAL, HAS_MASK, EVEN_T, EVEN_D, IEEE,
                UPCAST, UNI
            )
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            acc = _sweep(
                acc, rs, rt, S, TS, base, ss_t, i0, offs_m, offs_d, dmask, T, ls, lt, dk, LseS, LseT, DKl, stat_base,
                Mask, mask_base, sc_s, sc_t, BLOCK_M, BLOCK_N, True, True, CAUSAL, HAS_MASK, EVEN_T, EVEN_D, IEEE,
                UPCAST, UNI
            )
        _store_rows(
            GS, ((b64 * H + g) * T) * D, offs_m, offs_d, dmask, T, acc * alpha, Mask, mask_base, HAS_MASK, EVEN_T,
            EVEN_D, D
        )
    else:
        k_base = b64 * sk_b + g.to(tl.int64) * sk_h
        # dA of block I for each query head of this key head: rows I against key tiles J <= I
        # (all of dA is the row part, so in rowfwd mode it is the stored R, weighted).
        for rr in range(0, REP):
            h = g * REP + rr
            stat_base = (b64 * HTOT + hoff + h) * T
            ls, lt, dk = _row_stats(LseS, LseT, DKl, stat_base, offs_m, T, EVEN_T, UNI)
            if ROWFWD:
                acc = _row_part(R, stat_base * D, offs_m, offs_d, dmask, T, dk, EVEN_T, EVEN_D, D, UNI)
            else:
                base = b64 * ss_b + h.to(tl.int64) * ss_h
                rs, rt = _load_pair(S, TS, base, offs_m, ss_t, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
                acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                acc = _sweep(
                    acc, rs, rt, SK, TK, k_base, sk_t, i0, offs_m, offs_d, dmask, T, ls, lt, dk, LseS, LseT, DKl,
                    stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_M, BLOCK_N, True, False, CAUSAL, HAS_MASK, EVEN_T,
                    EVEN_D, IEEE, UPCAST, UNI
                )
            _store_rows(
                GS, ((b64 * H + h) * T) * D, offs_m, offs_d, dmask, T, acc * alpha, Mask, mask_base, False, EVEN_T,
                EVEN_D, D
            )
        # dB of key block I: summed over the group's query heads in a fixed order.
        rs, rt = _load_pair(SK, TK, k_base, offs_m, sk_t, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        for rr in range(0, REP):
            h = g * REP + rr
            base = b64 * ss_b + h.to(tl.int64) * ss_h
            stat_base = (b64 * HTOT + hoff + h) * T
            acc = _sweep(
                acc, rs, rt, S, TS, base, ss_t, i0, offs_m, offs_d, dmask, T, zero, zero, zero, LseS, LseT, DKl,
                stat_base, Mask, mask_base, sc_s, sc_t, BLOCK_M, BLOCK_N, False, True, CAUSAL, HAS_MASK, EVEN_T, EVEN_D,
                IEEE, UPCAST, UNI
            )
        _store_rows(
            GK, ((b64 * (H // REP) + g) * T) * D, offs_m, offs_d, dmask, T, acc * alpha, Mask, mask_base, HAS_MASK,
            EVEN_T, EVEN_D, D
        )


@triton.jit(do_not_specialize=["off_s1", "off_t1", "off_g1", "off_s2", "off_t2", "off_g2"])
def _bwd_kernel(
    S, SK, TS, TK, GS, GK, Mask, LseS, LseT, DKl, GScale, R, off_s1, off_t1, off_g1, off_s2, off_t2, off_g2, ss_b0,
    ss_h0, ss_t0, ss_b1, ss_h1, ss_t1, ss_b2, ss_h2, ss_t2, sk_b, sk_h, sk_t, H0, H1, H2, scs0, scs1, scs2, sct0, sct1,
    sct2, al0, al1, al2, T, HTOT, HKTOT, REP, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NREL: tl.constexpr, SELF: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    EVEN_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr, UNIFORM_DKL: tl.constexpr,
    ROWFWD: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKTOT
    kk = pid_bh % HKTOT  # flat *key* head over the relations (= query head when SELF)
    gs = tl.load(GScale)
    if NREL == 1:
        _bwd_body(
            S, SK, TS, TK, GS, GK, ss_b0, ss_h0, ss_t0, sk_b, sk_h, sk_t, H0, scs0, sct0, al0 * gs, b, kk, 0, pid_m,
            Mask, LseS, LseT, DKl, R, T, HTOT, REP, D, BLOCK_D, BLOCK_M, BLOCK_N, SELF, CAUSAL, HAS_MASK, EVEN_T, IEEE,
            UPCAST, UNIFORM_DKL, ROWFWD
        )
    else:  # self-relations only (REP = 1); see _fwd_kernel
        r, Sr, TSr, sb, sh, st = _relation(
            kk, H0, H1, S, TS, off_s1, off_t1, off_s2, off_t2, ss_b0, ss_h0, ss_t0, ss_b1, ss_h1, ss_t1, ss_b2, ss_h2,
            ss_t2, ALIGN
        )
        Gr = GS + _hint(_sel(r, 0, off_g1 - _BIAS, off_g2 - _BIAS), ALIGN)
        hoff = _sel(r, 0, H0, H0 + H1)
        _bwd_body(
            Sr, Sr, TSr, TSr, Gr, Gr, sb, sh, st, sb, sh, st, _sel(r, H0, H1, H2), _sel(r, scs0, scs1, scs2),
            _sel(r, sct0, sct1, sct2), _sel(r, al0, al1, al2) * gs, b, kk - hoff, hoff, pid_m, Mask, LseS, LseT, DKl, R,
            T, HTOT, REP, D, BLOCK_D, BLOCK_M, BLOCK_N, SELF, CAUSAL, HAS_MASK, EVEN_T, IEEE, UPCAST, UNIFORM_DKL,
            ROWFWD
        )


# ----------------------------------------------------------------------------- backward, one recompute
# Causal self-relations only. The sweep backward above computes every logit tile twice (as row part
# in its row block's program, as column part in its column block's), 8 products of T²D/2 per
# relation with the forward; this one computes each tile once (6, the floor): the program owns
# column block J, sweeps the row blocks I >= J, keeps dA_J's column part Σ_I G_IJᵀ A_I in
# registers and adds the row part G_IJ A_J into an fp32 buffer with relaxed atomics. The order of
# those additions varies from run to run, so results are not bitwise reproducible; opt-in
# (set_backward_mode('atomic')) because it is slower than the sweep (measured: benchmarks/README.md,
# 'Relation-KL op').
@triton.jit
def _add_rows(Buf, buf_base, offs, offs_d, dmask, T, vals, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr, D: tl.constexpr):
    """Buf[rows offs] += vals (fp32, relaxed atomics; rows past T and padded D columns skipped)."""
    bp = Buf + buf_base + offs[:, None] * D + offs_d[None, :]
    if EVEN_T and EVEN_D:
        tl.atomic_add(bp, vals, sem="relaxed")
    else:
        tl.atomic_add(bp, vals, mask=(offs < T)[:, None] & dmask[None, :], sem="relaxed")


@triton.jit
def _bwd1_tile(
    acc, cs, ct, S, TS, base, st, i0, offs_n, offs_d, dmask, T, cvalid, ls_base, LseS, LseT, DKl, Buf, buf_base, sc_s,
    sc_t, BLOCK_M: tl.constexpr, DIAG: tl.constexpr, COLMASK: tl.constexpr, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, UNI: tl.constexpr
):
    offs_m = i0 + tl.arange(0, BLOCK_M)
    rs, rt = _load_pair(S, TS, base, offs_m, st, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
    ls, lt, dk = _row_stats(LseS, LseT, DKl, ls_base, offs_m, T, EVEN_T, UNI)
    x = _dot(rs, tl.trans(cs), IEEE) * sc_s
    y = _dot(rt, tl.trans(ct), IEEE) * sc_t
    g = tl.exp2(x - ls[:, None]) - tl.exp2(y - lt[:, None])  # rows past T / masked: lse = +inf -> 0
    if not UNI:
        g = g * dk[:, None]
    if DIAG:
        g = tl.where(offs_n[None, :] <= offs_m[:, None], g, 0.0)
    if COLMASK:  # columns past T or padded
        g = tl.where(cvalid[None, :], g, 0.0)
    gd = g.to(S.dtype.element_ty)
    if UPCAST:
        gd = gd.to(tl.float32)
    acc += _dot(tl.trans(gd), rs, IEEE)
    _add_rows(Buf, buf_base, offs_m, offs_d, dmask, T, _dot(gd, cs, IEEE), EVEN_T, EVEN_D, D)
    return acc


@triton.jit
def _bwd1_body(
    S, TS, Buf, ss_b, ss_h, ss_t, sc_s, sc_t, b, h, hh, pid_n, Mask, LseS, LseT, DKl, T, HTOT, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, UNI: tl.constexpr
):
    b64 = b.to(tl.int64)
    base = b64 * ss_b + h.to(tl.int64) * ss_h
    j0 = pid_n * BLOCK_N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    EVEN_D: tl.constexpr = D == BLOCK_D
    cs, ct = _load_pair(S, TS, base, offs_n, ss_t, offs_d, dmask, T, EVEN_T, EVEN_D, UPCAST)
    cvalid = offs_n < T
    if HAS_MASK:
        cm = tl.load(Mask + b64 * T + offs_n, mask=cvalid, other=0)
        cvalid = cvalid & (cm != 0)
    COLMASK: tl.constexpr = HAS_MASK or not EVEN_T
    ls_base = (b64 * HTOT + hh) * T
    buf_base = ls_base * D
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    num_m = tl.cdiv(T, BLOCK_M)
    lo = j0 // BLOCK_M
    hi = tl.minimum(tl.cdiv(j0 + BLOCK_N, BLOCK_M), num_m)  # row blocks from hi on lie below J
    for i in range(lo, hi):
        acc = _bwd1_tile(
            acc, cs, ct, S, TS, base, ss_t, i * BLOCK_M, offs_n, offs_d, dmask, T, cvalid, ls_base, LseS, LseT, DKl,
            Buf, buf_base, sc_s, sc_t, BLOCK_M, True, COLMASK, EVEN_T, EVEN_D, D, IEEE, UPCAST, UNI
        )
    for i in range(hi, num_m):
        acc = _bwd1_tile(
            acc, cs, ct, S, TS, base, ss_t, i * BLOCK_M, offs_n, offs_d, dmask, T, cvalid, ls_base, LseS, LseT, DKl,
            Buf, buf_base, sc_s, sc_t, BLOCK_M, False, COLMASK, EVEN_T, EVEN_D, D, IEEE, UPCAST, UNI
        )
    _add_rows(Buf, buf_base, offs_n, offs_d, dmask, T, acc, EVEN_T, EVEN_D, D)


@triton.jit(do_not_specialize=["off_s1", "off_t1", "off_s2", "off_t2"])
def _bwd1_kernel(
    S, TS, Buf, Mask, LseS, LseT, DKl, off_s1, off_t1, off_s2, off_t2, ss_b0, ss_h0, ss_t0, ss_b1, ss_h1, ss_t1, ss_b2,
    ss_h2, ss_t2, H0, H1, scs0, scs1, scs2, sct0, sct1, sct2, T, HTOT, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NREL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_T: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr, UNIFORM_DKL: tl.constexpr
):
    pid_n = tl.program_id(0)  # column block 0 has the most row blocks below it: first
    pid_bh = tl.program_id(1)
    b = pid_bh // HTOT
    hh = pid_bh % HTOT
    if NREL == 1:
        _bwd1_body(
            S, TS, Buf, ss_b0, ss_h0, ss_t0, scs0, sct0, b, hh, hh, pid_n, Mask, LseS, LseT, DKl, T, HTOT, D, BLOCK_D,
            BLOCK_M, BLOCK_N, HAS_MASK, EVEN_T, IEEE, UPCAST, UNIFORM_DKL
        )
    else:  # see _fwd_kernel
        r, Sr, TSr, sb, sh, st = _relation(
            hh, H0, H1, S, TS, off_s1, off_t1, off_s2, off_t2, ss_b0, ss_h0, ss_t0, ss_b1, ss_h1, ss_t1, ss_b2, ss_h2,
            ss_t2, ALIGN
        )
        _bwd1_body(
            Sr, TSr, Buf, sb, sh, st, _sel(r, scs0, scs1, scs2), _sel(r, sct0, sct1, sct2), b,
            hh - _sel(r, 0, H0, H0 + H1), hh, pid_n, Mask, LseS, LseT, DKl, T, HTOT, D, BLOCK_D, BLOCK_M, BLOCK_N,
            HAS_MASK, EVEN_T, IEEE, UPCAST, UNIFORM_DKL
        )


# ----------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# BLOCK_M must be a multiple of BLOCK_N. D=64 and D=128: the fastest tiles of the sweep in
# benchmarks/bench_relation_kl.py (T=8K, B=1, H=32, bf16, causal; measured: benchmarks/README.md,
# 'Relation-KL op'); D=256 is hand-picked to fit shared memory and was only checked for correctness.
_FWD_CFG = {64: TileConfig(128, 64, 4, 3), 128: TileConfig(128, 128, 8, 3), 256: TileConfig(64, 32, 4, 2)}
_BWD_CFG = {64: TileConfig(64, 64, 4, 3), 128: TileConfig(64, 64, 4, 2), 256: TileConfig(64, 32, 8, 1)}
# One-recompute backward: block_n = owned column block (its fp32 accumulator stays in registers),
# block_m = swept row tile. Best of a small sweep (bench_relation_kl.py --backward).
_BWD1_CFG = {64: TileConfig(64, 64, 4, 2), 128: TileConfig(128, 128, 8, 2), 256: TileConfig(32, 64, 8, 1)}
# rowfwd mode. 'fwdr' is the forward that also keeps two fp32 [BLOCK_M, D] output accumulators,
# so it wants smaller tiles than the plain forward: larger ones spill registers and lose. Best of
# the sweep in bench_relation_kl.py --backward at T=8192, H=32 (measured: benchmarks/README.md,
# 'Relation-KL op'). D=256 is a guess, only checked for correctness.
# 'bwdc' is the column-only backward (the sweep kernel with the row part skipped); the sweep's own
# tiles measured best for it too.
_FWDR_CFG = {64: TileConfig(64, 64, 4, 3), 128: TileConfig(64, 64, 4, 2), 256: TileConfig(64, 32, 8, 1)}
_BWDC_CFG = dict(_BWD_CFG)
_KINDS = ("fwd", "bwd", "bwd1", "fwdr", "bwdc")
_bwd_mode: str | None = None
_INTERP_CFG = TileConfig(32, 16, 1, 1)
_overrides: dict = {}


def set_tile_config(kind: str, cfg: TileConfig | None) -> None:
    """Force the tiles of 'fwd', 'bwd', 'bwd1', 'fwdr' or 'bwdc' (benchmarks and tests); None
    restores the defaults.

    For 'bwd1' block_n is the column block a program owns and block_m the row tile it sweeps.
    'fwdr' and 'bwdc' are the forward and the backward of the rowfwd mode."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if cfg is None:
        _overrides.pop(kind, None)
    else:
        if kind != "bwd1" and cfg.block_m % cfg.block_n:
            raise ValueError(f"block_m {cfg.block_m} must be a multiple of block_n {cfg.block_n}")
        _overrides[kind] = cfg


# fp32 tiles take twice the shared memory (and run full-fp32 dots): smaller tiles.
_FP32_CFG = {64: TileConfig(64, 32, 4, 2), 128: TileConfig(64, 32, 4, 2), 256: TileConfig(32, 16, 4, 1)}
last_compiled: dict = {}  # kind -> the kernel object of the last launch (registers/spills, benchmarks)
_working: dict = {}  # (kind, (block_d, dtype, flags), wanted config) -> config that fit the device


def _config(kind: str, block_d: int, dtype: torch.dtype) -> TileConfig:
    if kind in _overrides:
        return _overrides[kind]
    if _interpreting():
        return _INTERP_CFG
    if dtype == torch.float32:
        return _FP32_CFG[max(64, block_d)]
    table = {"fwd": _FWD_CFG, "bwd": _BWD_CFG, "bwd1": _BWD1_CFG, "fwdr": _FWDR_CFG, "bwdc": _BWDC_CFG}[kind]
    return table[max(64, block_d)]


BACKWARD_MODES = ("sweep", "atomic", "rowfwd")


def set_backward_mode(mode: str | None) -> None:
    """'sweep' (two recomputes, no atomics, bitwise reproducible; the default, None), 'atomic'
    (one recompute, causal self-relations only; slower than the sweep, see benchmarks/README.md,
    'Relation-KL op') or
    'rowfwd' (the forward also stores the row part, the backward recomputes only the column part;
    every case, bitwise reproducible, one fp32 [B, H, T, D] buffer per call kept for the backward).

    The mode is read when the forward runs: a forward in rowfwd mode is always finished by its
    column-only backward, whatever the mode is by then."""
    global _bwd_mode
    if mode is not None and mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES} or None, got {mode!r}")
    _bwd_mode = mode


def current_backward_mode() -> str | None:
    """The mode the next forward reads (None: the default, 'sweep')."""
    return _bwd_mode


@contextlib.contextmanager
def backward_mode(mode: str | None):
    """``set_backward_mode(mode)`` for the forwards run inside, then the mode from before."""
    prev = _bwd_mode
    set_backward_mode(mode)
    try:
        yield
    finally:
        set_backward_mode(prev)


def _use_atomic(self_rel: bool, causal: bool) -> bool:
    # Opt-in only: slower than the sweep because of the atomics and the register pressure of the
    # owned [BLOCK_N, D] accumulator (measured: benchmarks/README.md, 'Relation-KL op'). Never
    # under deterministic torch.
    return _bwd_mode == "atomic" and self_rel and causal and not torch.are_deterministic_algorithms_enabled()


def _use_rowfwd(needs_grad: bool) -> bool:
    # Every case the sweep handles (self/cross, GQA, masks, non-causal, fp32, any D, the fused
    # layer call) has a rowfwd path, so the only condition is that a student grad is wanted:
    # without one the row part would be computed for nothing.
    return _bwd_mode == "rowfwd" and needs_grad


def _launch(kernel, kind: str, cfg: TileConfig, key, T: int, grid_rows: int, args, consts) -> None:
    """Launch with cfg; on a shared-memory/register overflow retry with smaller tiles (other GPUs
    have less shared memory than an H100) and remember what fit."""
    wanted = cfg
    cfg = _working.get((kind, key, wanted), cfg)
    for attempt in range(5):
        owned = cfg.block_n if kind == "bwd1" else cfg.block_m  # the block a program owns
        try:
            last_compiled[kind] = kernel[(triton.cdiv(T, owned), grid_rows)](
                *args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                EVEN_T=T % cfg.block_m == 0 and T % cfg.block_n == 0, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages
            )
            _working[(kind, key, wanted)] = cfg
            return
        except triton.runtime.errors.OutOfResources:
            if attempt == 4 or (cfg.block_n <= 16 and cfg.num_stages <= 1):
                raise
            if cfg.num_stages > 1:
                cfg = TileConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
            else:
                cfg = TileConfig(max(16, cfg.block_m // 2), max(16, cfg.block_n // 2), cfg.num_warps, 1)


@dataclass
class _Rel:
    s: torch.Tensor
    sk: torch.Tensor  # == s for a self-relation
    ts: torch.Tensor
    tk: torch.Tensor
    sc_s: float  # natural-log scale a_s
    sc_t: float


def _same_layout(a: torch.Tensor, b: torch.Tensor):
    """Unit stride on D and identical strides for student and teacher (they share offsets)."""
    if a.stride(-1) != 1 or b.stride() != a.stride():
        a, b = a.contiguous(), b.contiguous()
        if b.stride() != a.stride():  # size-1 dims can leave odd strides even when contiguous
            a, b = a.clone(memory_format=torch.contiguous_format), b.clone(memory_format=torch.contiguous_format)
    return a, b


def _prep(rel: _Rel, self_rel: bool) -> _Rel:
    s, ts = _same_layout(rel.s, rel.ts)
    if self_rel:
        return _Rel(s, s, ts, ts, rel.sc_s, rel.sc_t)
    sk, tk = _same_layout(rel.sk, rel.tk)
    return _Rel(s, sk, ts, tk, rel.sc_s, rel.sc_t)


def _flags(x: torch.Tensor):
    D = x.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    upcast = _interpreting() and x.dtype != torch.float32
    ieee = upcast or x.dtype == torch.float32
    return D, block_d, ieee, upcast


def _offset(x: torch.Tensor, base: torch.Tensor) -> int:
    """Element offset of x's data from base's (same dtype): the kernels reach relation r by it."""
    return (x.data_ptr() - base.data_ptr()) // x.element_size() + OFFSET_BIAS


def _common_args(rels: Sequence[_Rel], grads: Sequence[torch.Tensor] | None):
    """Offsets of relations 1, 2 from relation 0, row strides of all three, key strides of 0,
    and the alignment (in elements) that all of them share, for the kernels' hints."""
    r0 = rels[0]
    offs = []
    for i in (1, 2):
        rel = rels[i] if i < len(rels) else r0
        offs += [_offset(rel.s, r0.s), _offset(rel.ts, r0.ts)]
        if grads is not None:
            offs.append(_offset(grads[min(i, len(rels) - 1)], grads[0]))
    strides = []
    for i in range(3):
        strides += list(rels[min(i, len(rels) - 1)].s.stride()[:3])
    strides += list(r0.sk.stride()[:3])
    vec = max(1, 16 // r0.s.element_size())
    ptrs = [r.s.data_ptr() for r in rels] + [r.ts.data_ptr() for r in rels]
    if grads is not None:
        ptrs += [g.data_ptr() for g in grads]
    aligned = all(p % 16 == 0 for p in ptrs) and all(v % vec == 0 for v in offs + strides)
    return offs, strides, (vec if aligned else 1)


def _heads(rels):
    hs = [r.s.shape[1] for r in rels] + [0, 0]
    return hs[:3]


def _log2_scales(rels):
    """Student and teacher logit scales in base 2, padded to the kernels' three relations."""
    pad = [1.0] * (3 - len(rels))
    return [r.sc_s * LOG2E for r in rels] + pad, [r.sc_t * LOG2E for r in rels] + pad


def _forward(rels: Sequence[_Rel], mask: torch.Tensor | None, causal: bool, rep: int, rowfwd: bool = False):
    """Per-row LSEs and KL [B, sum of heads, T]; with rowfwd also the unscaled row part of the
    student grad, R_i = Σ_j (p^s_ij - p^t_ij) b_j, fp32 [B, sum of heads, T, D] (else None)."""
    B, _, T, _ = rels[0].s.shape
    htot = sum(r.s.shape[1] for r in rels)
    dev = rels[0].s.device
    lse_s = torch.empty(B, htot, T, dtype=torch.float32, device=dev)
    lse_t = torch.empty_like(lse_s)
    kl = torch.empty_like(lse_s)
    D, block_d, ieee, upcast = _flags(rels[0].s)
    rpart = torch.empty(B, htot, T, D, dtype=torch.float32, device=dev) if rowfwd else None
    dtype = rels[0].s.dtype
    m = mask if mask is not None else lse_s  # unused when HAS_MASK is False
    offs, strides, align = _common_args(rels, None)
    H = _heads(rels)
    sc, st = _log2_scales(rels)
    r0 = rels[0]
    args = [
        r0.s,
        r0.sk,
        r0.ts,
        r0.tk,
        m,
        lse_s,
        lse_t,
        kl,
        lse_s if rpart is None else rpart,
        *offs,
        *strides,
        H[0],
        H[1],
        *sc,
        *st,
        T,
        htot,
        rep,
    ]
    consts = dict(
        D=D, BLOCK_D=block_d, NREL=len(rels), CAUSAL=causal, HAS_MASK=mask is not None, IEEE=ieee, UPCAST=upcast,
        ALIGN=align, ROWFWD=rowfwd
    )
    kind = "fwdr" if rowfwd else "fwd"
    _launch(
        _fwd_kernel, kind, _config(kind, block_d, dtype), (block_d, dtype, causal, len(rels)), T, B * htot, args, consts
    )
    return lse_s, lse_t, kl, rpart


def _upstream_grads(dkl: torch.Tensor):
    """(upstream grads as the kernels read them, their scale, whether one value serves every row)."""
    uniform = dkl.dim() == 3 and dkl.stride() == (0, 0, 0)
    if uniform:  # sum / mean reductions: one upstream value for every row, no per-row loads
        gscale = dkl.reshape(-1)[:1].float()
        dkl = gscale
    else:
        dkl = dkl.float().contiguous()
        # Normalise the upstream grads so that G = dkl * (P_s - P_t) keeps its precision when
        # rounded to fp16 (per-row weights of 1e-6 would underflow); the scale comes back at the end.
        amax = dkl.abs().amax()
        gscale = torch.where(amax > 0, amax, torch.ones_like(amax)).reshape(1)
        dkl = dkl / gscale
    return dkl, gscale, uniform


def _grad_buffers(rels: Sequence[_Rel], self_rel: bool):
    """Empty student grads (rows, keys); the keys' are the rows' for self-relations."""
    if self_rel and len(rels) > 1:  # one buffer, so the kernels reach each relation by offset
        sizes = [r.s.numel() for r in rels]
        flat = torch.empty(sum(sizes), dtype=rels[0].s.dtype, device=rels[0].s.device)
        grads_s = [c.view(r.s.shape) for c, r in zip(flat.split(sizes), rels, strict=False)]
    else:
        grads_s = [torch.empty(r.s.shape, dtype=r.s.dtype, device=r.s.device) for r in rels]
    grads_k = grads_s if self_rel else [torch.empty(r.sk.shape, dtype=r.sk.dtype, device=r.sk.device) for r in rels]
    return grads_s, grads_k


def _backward(
    rels: Sequence[_Rel], mask, causal: bool, rep: int, self_rel: bool, lse_s, lse_t, dkl,
    rpart: torch.Tensor | None = None
):
    """Student grads; rpart (the forward's row part, rowfwd mode) leaves only the column part to
    recompute."""
    B, _, T, _ = rels[0].s.shape
    htot = sum(r.s.shape[1] for r in rels)
    hktot = htot // rep
    dkl, gscale, uniform = _upstream_grads(dkl)
    if rpart is None and _use_atomic(self_rel, causal):
        return _backward_atomic(rels, mask, lse_s, lse_t, dkl, gscale, uniform), None
    grads_s, grads_k = _grad_buffers(rels, self_rel)
    D, block_d, ieee, upcast = _flags(rels[0].s)
    dtype = rels[0].s.dtype
    m = mask if mask is not None else lse_s
    offs, strides, align = _common_args(rels, grads_s)
    H = _heads(rels)
    sc, st = _log2_scales(rels)
    al = [r.sc_s for r in rels] + [1.0, 1.0]
    r0 = rels[0]
    rowfwd = rpart is not None
    args = [
        r0.s,
        r0.sk,
        r0.ts,
        r0.tk,
        grads_s[0],
        grads_k[0],
        m,
        lse_s,
        lse_t,
        dkl,
        gscale,
        rpart if rowfwd else lse_s,
        *offs,
        *strides,
        *H,
        *sc,
        *st,
        *al[:3],
        T,
        htot,
        hktot,
        rep,
    ]
    consts = dict(
        D=D, BLOCK_D=block_d, NREL=len(rels), SELF=self_rel, CAUSAL=causal, HAS_MASK=mask is not None, IEEE=ieee,
        UPCAST=upcast, ALIGN=align, UNIFORM_DKL=uniform, ROWFWD=rowfwd
    )
    kind = "bwdc" if rowfwd else "bwd"
    _launch(
        _bwd_kernel, kind, _config(kind, block_d, dtype), (block_d, dtype, causal, len(rels), self_rel), T, B * hktot,
        args, consts
    )
    return grads_s, (None if self_rel else grads_k)


def _backward_atomic(rels: Sequence[_Rel], mask, lse_s, lse_t, dkl, gscale, uniform: bool):
    """Student grads of causal self-relations by the one-recompute kernel (fp32 accumulation)."""
    B, _, T, D = rels[0].s.shape
    H = _heads(rels)
    htot = sum(H)
    buf = torch.zeros(B, htot, T, D, dtype=torch.float32, device=rels[0].s.device)
    _, block_d, ieee, upcast = _flags(rels[0].s)
    dtype = rels[0].s.dtype
    m = mask if mask is not None else lse_s
    offs, strides, align = _common_args(rels, None)
    sc, st = _log2_scales(rels)
    r0 = rels[0]
    args = [r0.s, r0.ts, buf, m, lse_s, lse_t, dkl, *offs, *strides[:9], H[0], H[1], *sc, *st, T, htot]
    consts = dict(
        D=D, BLOCK_D=block_d, NREL=len(rels), HAS_MASK=mask is not None, IEEE=ieee, UPCAST=upcast, ALIGN=align,
        UNIFORM_DKL=uniform
    )
    _launch(
        _bwd1_kernel, "bwd1", _config("bwd1", block_d, dtype), (block_d, dtype, len(rels)), T, B * htot, args, consts
    )
    grads, h0 = [], 0
    for r, h in zip(rels, H, strict=False):
        grads.append((buf[:, h0 : h0 + h] * (gscale * r.sc_s)).to(dtype))
        h0 += h
    return grads


class TritonRelationKL(torch.autograd.Function):
    """Per-row KL [B, sum of heads, T] of 1 cross- or 1..3 self-relations; student-only grads.

    Inputs: (meta, mask, *students, *teachers) with meta = (self_rel, causal, scales_s, scales_t,
    grad_wanted) and for a cross-relation students = (sq, sk), teachers = (tq, tk). grad_wanted
    (grad mode on and a student requiring grad, see `_grad_wanted`) is decided by the caller: inside
    forward grad mode is always off and needs_input_grad ignores torch.no_grad().
    """

    @staticmethod
    def forward(ctx, meta, mask, *tensors):
        self_rel, causal, scales_s, scales_t, grad_wanted = meta
        n = len(tensors) // 2
        students, teachers = tensors[:n], tensors[n:]
        if self_rel:
            rels = [
                _prep(_Rel(s, None, t, None, a, b), True)
                for s, t, a, b in zip(students, teachers, scales_s, scales_t, strict=False)
            ]
            rep = 1
        else:
            rels = [_prep(_Rel(students[0], students[1], teachers[0], teachers[1], scales_s[0], scales_t[0]), False)]
            rep = students[0].shape[1] // students[1].shape[1]
        mask_i8 = None if mask is None else mask.to(torch.int8).contiguous()
        rowfwd = _use_rowfwd(grad_wanted)
        lse_s, lse_t, kl, rpart = _forward(rels, mask_i8, causal, rep, rowfwd)
        ctx.rels, ctx.rep, ctx.meta = rels, rep, meta
        ctx.save_for_backward(mask_i8, lse_s, lse_t, rpart)
        return kl

    @staticmethod
    def backward(ctx, dkl):
        mask_i8, lse_s, lse_t, rpart = ctx.saved_tensors
        self_rel, causal = ctx.meta[:2]
        n_in = len(ctx.needs_input_grad) - 2
        if not any(ctx.needs_input_grad[2 : 2 + n_in // 2]):
            return (None,) * (2 + n_in)
        gs, gk = _backward(ctx.rels, mask_i8, causal, ctx.rep, self_rel, lse_s, lse_t, dkl, rpart)
        grads = gs if self_rel else [gs[0], gk[0]]
        return (None, None, *grads, *([None] * (n_in // 2)))


def _grad_wanted(students) -> bool:
    return torch.is_grad_enabled() and any(s is not None and s.requires_grad for s in students)


def relation_kl_rows(sq, sk, tq, tk, mask, causal: bool, scale_s: float, scale_t: float) -> torch.Tensor:
    """Per-row KL [B, H, T] fp32 of one relation (sk = tk = None: self-relation)."""
    self_rel = sk is None
    meta = (self_rel, causal, (scale_s,), (scale_t,), _grad_wanted((sq, sk)))
    if self_rel:
        return TritonRelationKL.apply(meta, mask, sq, tq.detach())
    return TritonRelationKL.apply(meta, mask, sq, sk, tq.detach(), tk.detach())


def relation_kl_layer_rows(students, teachers, mask, causal: bool, scales_s, scales_t):
    """Per-row KL of the q/q, k/k, v/v self-relations of one layer, one launch per pass."""
    meta = (True, causal, tuple(scales_s), tuple(scales_t), _grad_wanted(students))
    kl = TritonRelationKL.apply(meta, mask, *students, *(t.detach() for t in teachers))
    return tuple(kl.split([s.shape[1] for s in students], dim=1))
