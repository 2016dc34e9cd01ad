#!/usr/bin/env python
"""Experiment: where the one-recompute backward's time goes, and whether TMA bulk
reductions pay for the 6-product floor.

Not part of the product. ncu on an H200 (research/LOG.md#kernel-profile) puts the op's
sweep backward at 52% tensor-pipe use: its 6 products per causal logit (two recomputes and two
gradient products) are already about half its time, so only a backward with 4 products (each
tile once, the row part added across programs) can be much faster. The op's version of that
(`set_backward_mode('atomic')`) is slower than the sweep. This probe times the same kernel with
the row part

- ``atomic``: added with per-element fp32 atomics, as the op does;
- ``store``: written with plain stores (wrong values: how much the atomics themselves cost);
- ``none``: reduced to a register sink (wrong values: the cost of the products alone);
- ``tma``: added by TMA bulk reductions (``cp.reduce.async.bulk.tensor``, a host tensor
  descriptor), which is how FlashAttention-3 adds its dQ;

and checks ``atomic`` and ``tma`` against the op's own atomic backward (values must agree).

Measured on an H200 (research/LOG.md#kernel-profile): at T=4096, D=128, best tiles, 1.111 /
1.056 / 1.136 / 1.082 ms against the op's sweep backward at 0.855 ms. Writing the row part costs
5-15%, TMA reductions save 3% of that, and the kernel is slower than the sweep even with nothing
written: the atomics are not what holds it back.

    python research/experimental/atomic_backward_probe.py --T 4096,8192

Scope: one causal self-relation, bf16 [B, H, T, D] contiguous, T a multiple of the tiles, sum
reduction (one upstream value for every row). Triton's interpreter cannot run TMA reductions, so
this runs on a GPU only.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from linearard_ray.ops import relation_kl as _entry

rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")
VARIANTS = ("atomic", "store", "none", "tma")


@triton.jit
def _row_out(Buf, BufDesc, buf_base, row0, offs, offs_d, vals, sink, D: tl.constexpr, ROW: tl.constexpr):
    if ROW == 0:  # the op's own row-part add
        rk._add_rows(Buf, buf_base, offs, offs_d, offs_d < D, 0, vals, True, True, D)
    elif ROW == 1:
        tl.store(Buf + buf_base + offs[:, None] * D + offs_d[None, :], vals)
    elif ROW == 2:
        sink += tl.sum(vals, 0)
    else:
        BufDesc.atomic_add([row0.to(tl.int32), 0], vals)
    return sink


@triton.jit
def _tile(
    acc, sink, cs, ct, S, TS, base, st, i0, offs_n, offs_d, dmask, T, ls_base, LseS, LseT, Buf, BufDesc, buf_base, sc_s,
    sc_t, BLOCK_M: tl.constexpr, DIAG: tl.constexpr, D: tl.constexpr, ROW: tl.constexpr, UPCAST: tl.constexpr
):
    offs_m = i0 + tl.arange(0, BLOCK_M)
    rs, rt = rk._load_pair(S, TS, base, offs_m, st, offs_d, dmask, T, True, True, UPCAST)
    ls, lt, _ = rk._row_stats(LseS, LseT, LseS, ls_base, offs_m, T, True, True)
    x = tl.dot(rs, tl.trans(cs)) * sc_s
    y = tl.dot(rt, tl.trans(ct)) * sc_t
    g = tl.exp2(x - ls[:, None]) - tl.exp2(y - lt[:, None])
    if DIAG:
        g = tl.where(offs_n[None, :] <= offs_m[:, None], g, 0.0)
    gd = g.to(S.dtype.element_ty)
    if UPCAST:  # the interpreter has no bf16 arithmetic (CPU check of the probe itself)
        gd = gd.to(tl.float32)
    acc += tl.dot(tl.trans(gd), rs)
    sink = _row_out(Buf, BufDesc, buf_base, ls_base + i0, offs_m, offs_d, tl.dot(gd, cs), sink, D, ROW)
    return acc, sink


@triton.jit
def _probe_kernel(
    S, TS, Buf, BufDesc, LseS, LseT, ss_b, ss_h, ss_t, sc_s, sc_t, T, H, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ROW: tl.constexpr, UPCAST: tl.constexpr
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    base = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h
    j0 = pid_n * BLOCK_N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    dmask = offs_d < D
    cs, ct = rk._load_pair(S, TS, base, offs_n, ss_t, offs_d, dmask, T, True, True, UPCAST)
    ls_base = pid_bh.to(tl.int64) * T
    buf_base = ls_base * D
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    sink = tl.zeros([D], dtype=tl.float32)
    num_m = T // BLOCK_M
    lo = j0 // BLOCK_M
    hi = tl.minimum(tl.cdiv(j0 + BLOCK_N, BLOCK_M), num_m)
    for i in range(lo, hi):
        acc, sink = _tile(
            acc, sink, cs, ct, S, TS, base, ss_t, i * BLOCK_M, offs_n, offs_d, dmask, T, ls_base, LseS, LseT, Buf,
            BufDesc, buf_base, sc_s, sc_t, BLOCK_M, True, D, ROW, UPCAST
        )
    for i in range(hi, num_m):
        acc, sink = _tile(
            acc, sink, cs, ct, S, TS, base, ss_t, i * BLOCK_M, offs_n, offs_d, dmask, T, ls_base, LseS, LseT, Buf,
            BufDesc, buf_base, sc_s, sc_t, BLOCK_M, False, D, ROW, UPCAST
        )
    if ROW == 2:
        acc += sink[None, :]
    rk._add_rows(Buf, buf_base, offs_n, offs_d, dmask, T, acc, True, True, D)


def row_lses(s, t):
    """The op's forward LSEs (base 2) of the causal self-relation, default scales."""
    a = s.shape[-1] ** -0.5
    lse_s, lse_t, _, _ = rk._forward([rk._prep(rk._Rel(s, None, t, None, a, a), True)], None, True, 1)
    return lse_s, lse_t


def probe(s, t, lses, variant: str, block_m: int, block_n: int, warps: int, stages: int):
    """Buf (fp32 [B, H, T, D]) of one launch, and a closure that relaunches it for timing."""
    B, H, T, D = s.shape
    a = D**-0.5
    lse_s, lse_t = lses
    buf = torch.zeros(B, H, T, D, dtype=torch.float32, device=s.device)
    desc = TensorDescriptor.from_tensor(buf.view(B * H * T, D), [block_m, D]) if variant == "tma" else buf
    sc = a * rk.LOG2E

    def launch():
        _probe_kernel[(T // block_n, B * H)](
            s, t, buf, desc, lse_s, lse_t, *s.stride()[:3], sc, sc, T, H, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
            ROW=VARIANTS.index(variant), UPCAST=rk._interpreting(), num_warps=warps, num_stages=stages
        )

    launch()
    if s.is_cuda:
        torch.cuda.synchronize()
    return buf.clone(), launch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,8192")
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument(
        "--configs",
        default="128x128x8x1,64x128x8x2,64x128x4x2,64x64x4x2,128x64x8x2,128x64x8x1",
        help="block_m x block_n x warps x stages (block_n: the owned column block)",
    )
    args = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    for T in (int(x) for x in args.T.split(",")):
        shape = (1, args.H, T, args.D)
        s = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
        t = (s.float() + 0.5 * torch.randn(shape, device="cuda", generator=gen)).to(torch.bfloat16)
        # the op's sweep backward and its atomic one, same inputs, for reference and for timing
        leaf = s.detach().requires_grad_()
        kl = _entry(leaf, teacher_q=t, reduction="sum")
        t_sweep = triton.testing.do_bench(lambda kl=kl: kl.backward(retain_graph=True), grad_to_none=[leaf], rep=200)
        rk.set_backward_mode("atomic")
        try:
            leaf.grad = None
            kl = _entry(leaf, teacher_q=t, reduction="sum")
            kl.backward(retain_graph=True)
            ref = leaf.grad.float().clone()
            t_atomic_op = triton.testing.do_bench(
                lambda kl=kl: kl.backward(retain_graph=True), grad_to_none=[leaf], rep=200
            )
        finally:
            rk.set_backward_mode(None)
        print(
            f"T={T}: op sweep bwd {t_sweep:.3f} ms, op atomic bwd {t_atomic_op:.3f} ms (whole backward "
            "incl. buffer zeroing and cast)",
            flush=True,
        )
        lses = row_lses(s, t)  # one forward for every variant and tile
        for cfg in args.configs.split(","):
            bm, bn, w, st = (int(v) for v in cfg.split("x"))
            cells = []
            for variant in VARIANTS:
                try:
                    buf, launch = probe(s, t, lses, variant, bm, bn, w, st)
                    ms = triton.testing.do_bench(launch, rep=200)
                    note = ""
                    if variant in ("atomic", "tma"):
                        grad = buf * (args.D**-0.5)
                        err = ((grad - ref).abs().max() / ref.abs().max()).item()
                        note = f" (err {err:.1e})"
                    cells.append(f"{variant} {ms:.3f}{note}")
                except Exception as e:  # out of shared memory etc.
                    cells.append(f"{variant} failed: {type(e).__name__} {str(e)[:80]}")
            print(f"T={T} {cfg}: " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
