"""Time and measure linearard_ray.ops.relation_kl_triton on a GPU against PyTorch SDPA (flash and cuDNN).

    PYTHONPATH=$PWD python benchmarks/bench_relation_kl.py [--check] [--sweep] [--quick]

--check  GPU correctness against a dense float64 reference (values, grads, determinism) first,
         in each backward mode (sweep, atomic, rowfwd).
--sweep  time a few tile configurations at T=8K and use the fastest for the tables.
--backward  only the backward modes of a causal self-relation (sweep, atomic, rowfwd), each with a
         small tile sweep first, fwd and bwd apart and fwd+bwd end to end against the fastest SDPA:

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/bench_relation_kl.py --check --backward
Prints markdown tables: median times (triton.testing.do_bench), peak memory beyond inputs and
returned tensors, and ratios to the faster of SDPA flash and cuDNN of the same shape in the same
process (the backend named beside each ratio).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from linearard_ray.ops import relation_kl, relation_kl_layer
from linearard_ray.ops.api import FUSED_LAYER_MAX_ROWS as FUSED_DEFAULT

rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")
DEV = "cuda"


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- reference
def dense_reference(sq, sk, tq, tk, mask, causal, a_s, a_t):
    """Float64 per-row KL, materialised (vectorised; finite -1e300 fill keeps grads NaN-free)."""
    B, H, T, D = sq.shape
    sk = sq if sk is None else sk
    tk = tq if tk is None else tk
    rep = H // sk.shape[1]
    s = a_s * sq.double() @ sk.double().repeat_interleave(rep, 1).transpose(-1, -2)
    t = a_t * tq.double() @ tk.double().repeat_interleave(rep, 1).transpose(-1, -2)
    i = torch.arange(T, device=sq.device)
    valid = (i[None] <= i[:, None]) if causal else torch.ones(T, T, dtype=torch.bool, device=sq.device)
    valid = valid[None, None]
    if mask is not None:
        valid = valid & mask[:, None, :, None].bool() & mask[:, None, None, :].bool()
    row_ok = valid.any(-1, keepdim=True)
    valid_rows = valid | ~row_ok  # empty rows: any finite map, zeroed below
    ls = torch.log_softmax(s.masked_fill(~valid_rows, -1e300), -1)
    lt = torch.log_softmax(t.masked_fill(~valid_rows, -1e300), -1)
    kl = (lt.exp() * (lt - ls)).masked_fill(~valid, 0).sum(-1)
    return kl * row_ok[..., 0]


def rel(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(mode: str) -> bool:
    """Values and grads against a float64 dense reference under backward mode 'sweep', 'atomic' or
    'rowfwd'. Bitwise reproducibility is required except where the atomic backward runs (causal self)."""
    rk.set_backward_mode(mode)
    try:
        return _check(mode)
    finally:
        rk.set_backward_mode(None)


def _check(mode: str) -> bool:
    ok = True
    log(f"check, backward mode {mode}")
    g = torch.Generator(device=DEV).manual_seed(1)
    cases = [  # B, H, Hk, T, D, dtype, self, causal, masked, scales
        (2, 4, 4, 1000, 128, torch.bfloat16, True, True, True, (None, None)),
        (1, 8, 2, 777, 64, torch.float16, False, True, True, (None, 0.1)),
        (1, 4, 4, 513, 256, torch.bfloat16, True, False, False, (0.05, None)),
        (2, 4, 4, 300, 80, torch.float32, True, True, True, (None, None)),
        (1, 4, 1, 259, 32, torch.float32, False, False, True, (0.2, 0.3)),
        (1, 32, 8, 2048, 128, torch.bfloat16, False, True, False, (None, None)),
    ]
    for B, H, Hk, T, D, dt, self_rel, causal, masked, (a_s, a_t) in cases:
        sq = torch.randn(B, H, T, D, device=DEV, generator=g)
        sk = torch.randn(B, Hk, T, D, device=DEV, generator=g)
        tq, tk = sq + 0.7 * torch.randn_like(sq), sk + 0.7 * torch.randn_like(sk)
        sq, sk, tq, tk = (x.to(dt) for x in (sq, sk, tq, tk))
        if self_rel:
            sk = tk = None
        mask = None
        if masked:
            mask = torch.ones(B, T, dtype=torch.long, device=DEV)
            mask[0, : T // 5] = 0
            mask[-1, T - 7 :] = 0
        runs = []
        for _ in range(2):
            a = sq.clone().requires_grad_(True)
            b = None if self_rel else sk.clone().requires_grad_(True)
            kl = relation_kl(
                a,
                b,
                tq,
                tk,
                attention_mask=mask,
                causal=causal,
                student_scale=a_s,
                teacher_scale=a_t,
                reduction="none",
                backend="triton",
            )
            w = torch.rand(kl.shape, device=DEV, generator=g) if not runs else runs[0][3]
            (kl * w).sum().backward()
            runs.append((kl.detach(), a.grad, None if b is None else b.grad, w))
        kl, ga, gb, w = runs[0]
        det = all(torch.equal(x, y) for x, y in zip(runs[0][:3], runs[1][:3], strict=False) if x is not None)
        ra = sq.double().requires_grad_(True)
        rb = None if self_rel else sk.double().requires_grad_(True)
        ref = dense_reference(ra, rb, tq, tk, mask, causal, a_s or 1 / math.sqrt(D), a_t or 1 / math.sqrt(D))
        (ref * w.double()).sum().backward()
        tol = 1e-5 if dt == torch.float32 else 1e-2
        errs = [rel(kl, ref), rel(ga, ra.grad)] + ([] if self_rel else [rel(gb, rb.grad)])
        good = (det or (mode == "atomic" and self_rel and causal)) and all(e <= tol for e in errs)
        ok &= good
        log(
            f"check B{B} H{H}/{Hk} T{T} D{D} {str(dt)[6:]} {'self' if self_rel else 'cross'} "
            f"{'causal' if causal else 'full'} {'mask' if masked else ''}: errs "
            + " ".join(f"{e:.2e}" for e in errs)
            + f" deterministic={det} -> {'OK' if good else 'FAIL'}"
        )
        del ra, rb, ref
    # the fused layer call against three single calls
    q = torch.randn(2, 8, 600, 64, device=DEV, dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 2, 600, 64, device=DEV, dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 2, 600, 64, device=DEV, dtype=torch.bfloat16, generator=g)
    tq, tk, tv = (x + 0.5 * torch.randn_like(x) for x in (q, k, v))
    mask = torch.ones(2, 600, dtype=torch.long, device=DEV)
    mask[1, :50] = 0
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    outs = relation_kl_layer(
        *leaves, tq, tk, tv, attention_mask=mask, student_scales=(None, 0.1, 0.2), reduction="mean", backend="triton"
    )
    sum(outs).backward()
    for i, (s, t, sc) in enumerate(zip((q, k, v), (tq, tk, tv), (1 / 8, 0.1, 0.2), strict=False)):
        x = s.clone().requires_grad_(True)
        one = relation_kl(x, None, t, None, attention_mask=mask, student_scale=sc, reduction="mean", backend="triton")
        one.backward()
        e = (rel(outs[i], one), rel(leaves[i].grad, x.grad))
        # The atomic backward sums the fp32 grads in another order in the two calls (bf16 ulp flips);
        # the others do the same arithmetic in the fused and the single launch.
        good = all(v_ <= (1e-3 if mode == "atomic" else 1e-6) for v_ in e)
        ok &= good
        log(f"check layer relation {i}: vs single call {e[0]:.1e} {e[1]:.1e} -> {'OK' if good else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------- timing helpers
def bench(fn, grad_to_none=None, rep=200):
    return do_bench(fn, warmup=50, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def peak_extra(fn, keep_bytes=0):
    """Peak bytes allocated while fn runs, beyond what was allocated before and what it returns."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - keep_bytes
    del out
    return peak


def nbytes(*xs):
    return sum(x.numel() * x.element_size() for x in xs)


def inputs(B, H, Hk, T, D, dtype=torch.bfloat16):
    q = torch.randn(B, H, T, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hk, T, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hk, T, D, device=DEV, dtype=dtype)
    return q, k, v


def ours_fns(q, tq, k=None, tk=None):
    def fwd():
        return relation_kl(q, k, tq, tk)

    qg = q.detach().clone().requires_grad_(True)
    kg = None if k is None else k.detach().clone().requires_grad_(True)
    leaves = [qg] + ([] if kg is None else [kg])

    def fb():
        relation_kl(qg, kg, tq, tk).backward()
        return None

    return fwd, fb, leaves


def naive_fns(q, tq):
    D = q.shape[-1]

    def loss(a):
        T = a.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=DEV).triu(1)
        s = (a.float() @ a.float().transpose(-1, -2) / math.sqrt(D)).masked_fill(causal, float("-inf"))
        t = (tq.float() @ tq.float().transpose(-1, -2) / math.sqrt(D)).masked_fill(causal, float("-inf"))
        ls, lt = s.log_softmax(-1), t.log_softmax(-1)
        return (lt.exp() * (lt - ls)).masked_fill(causal, 0).sum()

    qg = q.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return loss(q)

    def fb():
        loss(qg).backward()

    return fwd, fb, [qg]


SDPA_PEERS = ("flash", "cuDNN")  # every ratio is taken against the faster of the two


def sdpa_fns(q, k, v, backend="flash"):
    """Causal SDPA of the same tensors on one backend (``SDPA_PEERS``), GQA included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cuDNN": SDPBackend.CUDNN_ATTENTION}[backend]
    gqa = q.shape[1] != k.shape[1]

    def fwd():
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    dout = torch.randn_like(q)

    def fb():
        with sdpa_kernel(which):
            F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa).backward(dout)

    return fwd, fb, leaves


def sdpa_peers(q, k, v, label):
    """Rows for SDPA flash and cuDNN of the same shape, measured in this process."""
    return [measure(f"SDPA {b} ({label})", *sdpa_fns(q, k, v, b), fwd_keep=nbytes(q)) for b in SDPA_PEERS]


def fastest_peer(rows, key):
    """The SDPA row with the smallest ``key`` time (a backend that refused the shape has none)."""
    return min((r for r in rows if r["name"].startswith("SDPA") and key in r), key=lambda r: r[key], default=None)


def ratio_cell(row, peer, key):
    """``row``'s time over the fastest peer's, with the peer's backend: '1.27x cuDNN'."""
    if peer is None or key not in row:
        return "-"
    return f"{row[key] / peer[key]:.2f}x {peer['name'].split()[1]}"


def measure(name, fwd, fb, leaves, fwd_keep=0):
    row = {"name": name}
    try:
        row["fwd"] = bench(fwd)
        row["fb"] = bench(fb, grad_to_none=leaves)
        for x in leaves:
            x.grad = None
        row["mem_fwd"] = peak_extra(fwd, fwd_keep)
        row["mem_fb"] = peak_extra(fb, nbytes(*leaves))  # the returned grads are not "extra"
        for x in leaves:
            x.grad = None
    except torch.cuda.OutOfMemoryError:
        row["oom"] = "OOM"
    except Exception as e:  # e.g. a backend that refuses the shape: report, keep going
        row["oom"] = f"error: {type(e).__name__}: {str(e)[:80]}"
        log(f"{name}: {row['oom']}")
    gc.collect()
    torch.cuda.empty_cache()
    return row


def fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_mb(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def table(title, rows):
    log(f"\n### {title}\n")
    log(
        "| T | case | fwd ms | fwd+bwd ms | fwd / fastest SDPA | fwd+bwd / fastest SDPA | peak extra fwd MiB | "
        "peak extra fwd+bwd MiB |"
    )
    log("|---|---|---|---|---|---|---|---|")
    for T, rs in rows:
        fastest = {key: fastest_peer(rs, key) for key in ("fwd", "fb")}
        for r in rs:
            if r.get("oom"):
                log(f"| {T} | {r['name']} | {r['oom']} | | | | | |")
                continue
            log(
                f"| {T} | {r['name']} | {fmt_ms(r['fwd'])} | {fmt_ms(r['fb'])} | "
                f"{ratio_cell(r, fastest['fwd'], 'fwd')} | {ratio_cell(r, fastest['fb'], 'fb')} | "
                f"{fmt_mb(r['mem_fwd'])} | {fmt_mb(r['mem_fb'])} |"
            )


# ----------------------------------------------------------------------------- sweep
def sweep(D, T=8192):
    H = 32
    q, _, _ = inputs(1, H, H, T, D)
    tq = q + 0.5 * torch.randn_like(q)
    TC = rk.TileConfig
    if D == 128:
        # The 4-warp tiles fit two programs per SM (registers and shared memory): two programs that
        # are not kept in step might overlap each other's exponentials with their products, which
        # the two warpgroups of one 8-warp program do not. Measured at T=4096: no faster (benchmarks/README.md).
        fwd_c = [TC(128, 128, 8, 2), TC(128, 128, 8, 3), TC(128, 64, 8, 3), TC(64, 64, 4, 2), TC(64, 32, 4, 3)]
        bwd_c = [
            TC(64, 64, 4, 2),
            TC(128, 64, 8, 2),
            TC(64, 32, 4, 2),
            TC(64, 32, 4, 3),
            TC(32, 32, 4, 3),
            TC(32, 32, 2, 3),
        ]
    else:
        fwd_c = [TC(128, 64, 4, 3), TC(128, 128, 8, 3)]
        bwd_c = [TC(64, 32, 4, 3), TC(64, 64, 4, 3)]
    best = {}
    qg = q.clone().requires_grad_(True)
    kl = relation_kl(qg, None, tq, None)
    for kind, cands in (("fwd", fwd_c), ("bwd", bwd_c)):
        res = []
        for c in cands:
            rk.set_tile_config(kind, c)
            try:
                t0 = time.time()
                if kind == "fwd":
                    ms = bench(lambda: relation_kl(q, None, tq, None), rep=100)
                else:
                    kl = relation_kl(qg, None, tq, None)
                    ms = bench(lambda kl=kl: kl.backward(retain_graph=True), grad_to_none=[qg], rep=100)
                res.append((ms, c))
                kern = rk.last_compiled.get(kind)
                regs = (
                    f"regs {kern.n_regs} spills {kern.n_spills} smem {kern.metadata.shared // 1024} KiB"
                    if kern is not None
                    else ""
                )
                log(f"sweep T{T} D{D} {kind} {c}: {ms:.3f} ms {regs} (compile+time {time.time() - t0:.1f}s)")
            except Exception as e:  # out of resources etc.
                log(f"sweep T{T} D{D} {kind} {c}: failed {type(e).__name__}: {str(e)[:120]}")
        rk.set_tile_config(kind, None)
        if res:
            best[kind] = min(res, key=lambda x: x[0])[1]
    return best


def _bwd1_tiles(D: int, cands) -> None:
    """Time the one-recompute backward's candidate tiles at T=8192 and make the best the default."""
    q, _, _ = inputs(1, 32, 32, 8192, D)
    tq = q + 0.5 * torch.randn_like(q)
    qg = q.clone().requires_grad_(True)
    rk.set_backward_mode("atomic")
    res = []
    for c in cands:
        rk.set_tile_config("bwd1", c)
        try:
            kl = relation_kl(qg, None, tq, None)
            ms = bench(lambda kl=kl: kl.backward(retain_graph=True), grad_to_none=[qg], rep=100)
            kern = rk.last_compiled.get("bwd1")
            log(f"bwd1 tiles D{D} T8192 {c}: {ms:.3f} ms regs {kern.n_regs} spills {kern.n_spills}")
            res.append((ms, c))
        except Exception as e:
            log(f"bwd1 tiles D{D} {c}: failed {type(e).__name__}: {str(e)[:120]}")
    rk.set_tile_config("bwd1", None)
    rk.set_backward_mode(None)
    if res:
        best = min(res, key=lambda x: x[0])[1]
        log(f"best bwd1 tiles D{D}: {best} (default {rk._BWD1_CFG[D]})")
        rk._BWD1_CFG[D] = best


def _rowfwd_tiles(D: int, fwd_cands, bwd_cands) -> None:
    """Time the rowfwd mode's forward (with the row part) and column-only backward tiles at T=8192
    and make the best the defaults (they were set without a GPU)."""
    q, _, _ = inputs(1, 32, 32, 8192, D)
    tq = q + 0.5 * torch.randn_like(q)
    qg = q.clone().requires_grad_(True)
    rk.set_backward_mode("rowfwd")
    for kind, cands, table in (("fwdr", fwd_cands, rk._FWDR_CFG), ("bwdc", bwd_cands, rk._BWDC_CFG)):
        res = []
        for c in cands:
            rk.set_tile_config(kind, c)
            try:
                if kind == "fwdr":
                    ms = bench(lambda: relation_kl(qg, None, tq, None), rep=100)
                else:
                    kl = relation_kl(qg, None, tq, None)
                    ms = bench(lambda kl=kl: kl.backward(retain_graph=True), grad_to_none=[qg], rep=100)
                kern = rk.last_compiled.get(kind)
                log(f"rowfwd tiles D{D} T8192 {kind} {c}: {ms:.3f} ms regs {kern.n_regs} spills {kern.n_spills}")
                res.append((ms, c))
            except Exception as e:
                log(f"rowfwd tiles D{D} {kind} {c}: failed {type(e).__name__}: {str(e)[:120]}")
        rk.set_tile_config(kind, None)
        if res:
            best = min(res, key=lambda x: x[0])[1]
            log(f"best {kind} tiles D{D}: {best} (default {table[D]})")
            table[D] = best
        gc.collect()
        torch.cuda.empty_cache()
    rk.set_backward_mode(None)


def _bwd_ms(qg, tq) -> float:
    """The backward alone of one call in the current mode (its forward's saved state reused)."""
    kl = relation_kl(qg, None, tq, None)
    return bench(lambda: kl.backward(retain_graph=True), grad_to_none=[qg])


def _fb_only(q, k, v, backend) -> dict:
    """{"fb": SDPA fwd+bwd ms} on ``backend``, or {} where it refuses the shape."""
    _, fb, leaves = sdpa_fns(q, k, v, backend)
    try:
        return {"fb": bench(fb, grad_to_none=leaves)}
    except Exception as e:  # e.g. cuDNN without a kernel for this shape: the other peer stands
        log(f"SDPA {backend}: {type(e).__name__}: {str(e)[:80]}")
        return {}


def _backward_row(T: int, D: int) -> str:
    q, k, v = inputs(1, 32, 32, T, D)
    tq = q + 0.5 * torch.randn_like(q)
    peer = fastest_peer([{"name": f"SDPA {b}", **_fb_only(q, k, v, b)} for b in SDPA_PEERS], "fb")
    t_sdpa = peer["fb"] if peer else float("nan")  # both refused: the ratios read nan, the op's times stand
    qg = q.clone().requires_grad_(True)
    fw, bw, fb = {}, {}, {}
    for mode in ("sweep", "atomic", "rowfwd"):
        rk.set_backward_mode(mode)
        # rowfwd's forward does its extra work only when the student requires grad, so it is timed
        # on qg; the others' forward is the same kernel whatever the mode (timed once, on q).
        if mode == "rowfwd":
            fw[mode] = bench(lambda: relation_kl(qg, None, tq, None))
        elif mode == "sweep":
            fw[mode] = bench(lambda: relation_kl(q, None, tq, None))
        else:
            fw[mode] = fw["sweep"]
        bw[mode] = _bwd_ms(qg, tq)
        fb[mode] = bench(lambda: relation_kl(qg, None, tq, None).backward(), grad_to_none=[qg])
    mem = peak_extra(lambda: relation_kl(qg, None, tq, None).backward(), nbytes(qg))  # rowfwd still set
    qg.grad = None
    rk.set_backward_mode(None)
    cells = [
        f"{fmt_ms(t_sdpa)} {peer['name'].split()[1]}" if peer else "-",
        fmt_ms(fw["sweep"]),
        fmt_ms(bw["sweep"]),
        fmt_ms(bw["atomic"]),
        fmt_ms(fw["rowfwd"]),
        fmt_ms(bw["rowfwd"]),
    ]
    cells += [fmt_ms(fb[m]) for m in ("sweep", "atomic", "rowfwd")]
    cells += [f"{fb[m] / t_sdpa:.2f}" for m in ("sweep", "atomic", "rowfwd")]
    cells += [f"{fb['sweep'] / fb['rowfwd']:.2f}x", fmt_mb(mem)]
    return f"| {T} | " + " | ".join(cells) + " |"


def backward_modes(Ts=(2048, 4096, 8192, 16384), tiles=True):
    """Causal self-relation backward modes: the two-recompute sweep, the one-recompute atomic kernel
    (bwd1) and rowfwd (row part in the forward, column-only backward), each after a small tile
    sweep; fwd and bwd apart, fwd+bwd end to end, ratios against the fastest SDPA fwd+bwd."""
    TC = rk.TileConfig
    cands = {
        128: [TC(64, 128, 8, 2), TC(128, 128, 8, 2), TC(128, 64, 8, 2), TC(64, 64, 4, 2), TC(64, 128, 4, 2)],
        64: [TC(64, 64, 4, 2), TC(64, 128, 8, 2), TC(128, 64, 4, 2)],
    }
    # rowfwd forward: two fp32 [BLOCK_M, D] accumulators on top of the plain forward (see _FWDR_CFG)
    fwdr_cands = {
        128: [TC(128, 64, 8, 2), TC(64, 64, 4, 2), TC(128, 32, 8, 2), TC(64, 32, 4, 3), TC(128, 128, 8, 2)],
        64: [TC(128, 64, 8, 3), TC(64, 64, 4, 3), TC(128, 32, 8, 3), TC(128, 64, 4, 3)],
    }
    # column-only backward: no row part alive, so larger tiles than the sweep's may fit
    bwdc_cands = {
        128: [TC(64, 64, 4, 2), TC(128, 64, 8, 2), TC(64, 64, 4, 3), TC(64, 32, 4, 3)],
        64: [TC(64, 64, 4, 3), TC(128, 64, 8, 3), TC(64, 32, 4, 3)],
    }
    for D in (128, 64):
        if tiles:
            _bwd1_tiles(D, cands[D])
            gc.collect()
            torch.cuda.empty_cache()
            _rowfwd_tiles(D, fwdr_cands[D], bwdc_cands[D])
        log(f"\n### Backward modes of one causal self-relation (B=1, H=32, D={D}, bf16)\n")
        log(
            "fwd: the plain forward (sweep, atomic) or the one that also stores the row part (rowfwd, "
            "student requiring grad); bwd: backward alone; fwd+bwd: one call end to end; "
            "/ SDPA: fwd+bwd over the fastest SDPA backend's fwd+bwd (flash or cuDNN, named in its column); "
            "peak: rowfwd fwd+bwd extra memory (R included).\n"
        )
        log(
            "| T | fastest SDPA fwd+bwd ms | fwd ms | sweep bwd ms | atomic bwd ms | rowfwd fwd ms | rowfwd bwd ms | "
            "sweep fwd+bwd ms | atomic fwd+bwd ms | rowfwd fwd+bwd ms | sweep / SDPA | atomic / SDPA | "
            "rowfwd / SDPA | rowfwd speed-up over sweep | rowfwd peak extra MiB |"
        )
        log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for T in Ts:
            log(_backward_row(T, D))
            gc.collect()
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main
def integration(B=1, T=4096, H=32, Hkv=32, D=128):
    """One layer call the way training makes it: q/k/v are [B, T, heads, D] projections viewed as
    [B, heads, T, D] (row stride heads*D), the loss divides each relation's sum by its own
    normaliser, and the batch mask is all ones (passed, or dropped as the training loss does).
    Defaults: a LLaMA-2-7B layer; SmolLM2-135M is B=2, T=2048, H=9, Hkv=3, D=64."""
    import linearard_ray.ops.api as api

    log(f"\n### One layer call (Q/Q+K/K+V/V, B={B}, H={H}/{Hkv}, T={T}, D={D}, bf16, causal) by input layout\n")
    log("| layout | mask | launch | backward | fwd ms | fwd+bwd ms |")
    log("|---|---|---|---|---|---|")
    heads = (H, Hkv, Hkv)

    def make(strided):
        xs = [torch.randn(B, T, h, D, device=DEV, dtype=torch.bfloat16) for h in heads]
        return [x.transpose(1, 2) if strided else x.transpose(1, 2).contiguous() for x in xs]

    for strided in (False, True):
        s, t = make(strided), [x + 0.5 * torch.randn_like(x) for x in make(strided)]
        leaves = [x.detach().clone().requires_grad_(True) for x in s]  # clone keeps the strides
        ones = torch.ones(B, T, dtype=torch.long, device=DEV)
        for mask, limit, mode in (
            (None, 10**12, "sweep"),
            (ones, 10**12, "sweep"),
            (None, 0, "sweep"),
            (None, 10**12, "atomic"),
            (None, 0, "atomic"),
            (None, 10**12, "rowfwd"),
            (None, 0, "rowfwd"),
        ):
            api.FUSED_LAYER_MAX_ROWS = limit
            rk.set_backward_mode(mode)

            # the loop's tensors bound as defaults: each closure runs in its own pass only
            def f(s=s, t=t, mask=mask):
                return relation_kl_layer(*s, *t, attention_mask=mask)

            def fb(leaves=leaves, t=t, mask=mask):
                vals = relation_kl_layer(*leaves, *t, attention_mask=mask)
                sum(v / (h * B * T) for v, h in zip(vals, heads, strict=False)).backward()

            view = "[B,T,H,D] view" if strided else "contiguous [B,H,T,D]"
            log(
                f"| {view} | {'ones' if mask is not None else 'none'} "
                f"| {'fused' if limit else 'three'} | {mode} | {fmt_ms(bench(f))} | "
                f"{fmt_ms(bench(fb, grad_to_none=leaves))} |"
            )
        rk.set_backward_mode(None)
        del s, t, leaves
        gc.collect()
        torch.cuda.empty_cache()
    api.FUSED_LAYER_MAX_ROWS = FUSED_DEFAULT


# ----------------------------------------------------------------------------- tables
def self_relation_table(quick):
    """The headline: a causal Q/Q self-relation at D=128 against both SDPA peers and, to 8K, the
    naive materialised loss."""
    rows = []
    for T in [2048, 8192, 32768] if quick else [2048, 4096, 8192, 16384, 32768]:
        q, k, v = inputs(1, 32, 32, T, 128)
        tq = q + 0.5 * torch.randn_like(q)
        rs = [*sdpa_peers(q, k, v, "32 heads"), measure("relation_kl Q/Q (ours)", *ours_fns(q, tq))]
        if T <= 8192:
            rs.append(measure("naive materialised", *naive_fns(q, tq)))
        rows.append((T, rs))
        log(f"T={T} done")
        del q, k, v, tq
    table("B=1, H=32, D=128, bf16, causal self-relation", rows)


def head_dim_64_table(quick):
    rows = []
    for T in [8192] if quick else [4096, 16384]:
        q, k, v = inputs(1, 32, 32, T, 64)
        tq = q + 0.5 * torch.randn_like(q)
        rows.append((T, [*sdpa_peers(q, k, v, "32 heads"), measure("relation_kl Q/Q D=64 (ours)", *ours_fns(q, tq))]))
        del q, k, v, tq
    table("B=1, H=32, D=64, bf16, causal self-relation", rows)


def gqa_table(quick):
    rows = []
    for T in [8192] if quick else [4096, 16384]:
        q, k, v = inputs(1, 32, 8, T, 128)
        tq, tk = q + 0.5 * torch.randn_like(q), k + 0.5 * torch.randn_like(k)
        ours = [
            measure("relation_kl K/K, 8 heads (ours)", *ours_fns(k, tk)),
            measure("relation_kl Q/K cross GQA 32/8 (ours)", *ours_fns(q, tq, k, tk)),
        ]
        rows.append((T, [*sdpa_peers(q, k, v, "GQA 32/8"), *ours]))
        del q, k, v, tq, tk
    table("GQA 32 query / 8 KV heads, D=128, bf16, causal", rows)


def fused_layer_table(quick):
    """The fused Q/Q+K/K+V/V call of one layer against three separate calls."""
    log("\n### One layer: fused Q/Q+K/K+V/V call vs three calls (GQA 32/8, D=128, bf16, causal)\n")
    log("| T | fused fwd ms | 3 calls fwd ms | fwd ratio | fused fwd+bwd ms | 3 calls fwd+bwd ms | fwd+bwd ratio |")
    log("|---|---|---|---|---|---|---|")
    for T in [2048, 8192] if quick else [2048, 4096, 8192, 16384]:
        q, k, v = inputs(1, 32, 8, T, 128)
        t = [x + 0.5 * torch.randn_like(x) for x in (q, k, v)]
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

        # the loop's tensors bound as defaults: each closure runs in its own pass only
        def fused_f(q=q, k=k, v=v, t=t):
            return relation_kl_layer(q, k, v, *t)

        def three_f(q=q, k=k, v=v, t=t):
            return [relation_kl(s, None, tt, None) for s, tt in zip((q, k, v), t, strict=False)]

        def fused_fb(leaves=leaves, t=t):
            sum(relation_kl_layer(*leaves, *t)).backward()

        def three_fb(leaves=leaves, t=t):
            sum(relation_kl(s, None, tt, None) for s, tt in zip(leaves, t, strict=False)).backward()

        a, b = bench(fused_f), bench(three_f)
        c, d = bench(fused_fb, grad_to_none=leaves), bench(three_fb, grad_to_none=leaves)
        log(f"| {T} | {fmt_ms(a)} | {fmt_ms(b)} | {a / b:.2f}x | {fmt_ms(c)} | {fmt_ms(d)} | {c / d:.2f}x |")
        if T == 2048:
            _log_registers(fused_fb, three_fb)
        del q, k, v, t, leaves
        gc.collect()
        torch.cuda.empty_cache()


def _log_registers(fused_fb, three_fb):
    """Registers and spills of the fused and the single-relation kernels, as last compiled."""
    fused_fb()
    kf, kb = rk.last_compiled["fwd"], rk.last_compiled["bwd"]
    three_fb()
    sf, sb = rk.last_compiled["fwd"], rk.last_compiled["bwd"]
    log(
        f"(registers/spills fused fwd {kf.n_regs}/{kf.n_spills} bwd {kb.n_regs}/{kb.n_spills}; "
        f"single fwd {sf.n_regs}/{sf.n_spills} bwd {sb.n_regs}/{sb.n_spills})"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-t", type=int, default=8192, help="sequence length of the tile sweep")
    ap.add_argument("--sweep-only", action="store_true", help="stop after the tile sweep (no tables)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument(
        "--integration",
        action="store_true",
        help="only the 7B layer call by input layout and mask (what training passes)",
    )
    ap.add_argument(
        "--backward",
        action="store_true",
        help="only the backward modes (sweep, one recompute, rowfwd), with tile sweeps",
    )
    args = ap.parse_args()
    log(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {importlib.import_module('triton').__version__}"
    )
    torch.manual_seed(0)
    if args.integration:
        integration()  # LLaMA-2-7B layer
        integration(B=2, T=2048, H=9, Hkv=3, D=64)  # SmolLM2-135M layer, the study's shape
        return 0
    if args.check:
        ok = check("sweep") & check("atomic") & check("rowfwd")
        log(f"CHECK {'PASSED' if ok else 'FAILED'}")
    if args.backward:
        backward_modes()
        return 0
    if args.sweep:
        for D in (128, 64):
            best = sweep(D, args.sweep_t)
            log(f"best tiles D{D}: {best}")
            for kind, c in best.items():
                (rk._FWD_CFG if kind == "fwd" else rk._BWD_CFG)[D] = c
        if args.sweep_only:
            return 0

    self_relation_table(args.quick)
    head_dim_64_table(args.quick)
    gqa_table(args.quick)
    fused_layer_table(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
