"""relation_kl / relation_kl_layer against a dense float64 reference, on both backends.

The Triton kernels run under TRITON_INTERPRET=1 here (conftest sets it without CUDA). The
interpreter computes tl.dot through numpy, which has no bfloat16 and mis-handles bf16 dots, so
the launcher upcasts fp16/bf16 tiles to fp32 inside the kernel when interpreting (exact for the
inputs; G is rounded to the input dtype first, as on the GPU). bf16 inputs are covered that way.
"""

from __future__ import annotations

import importlib
import math
import os
import zlib

import pytest
import torch

from linearard_ray.ops import relation_kl, relation_kl_layer
from tests.ops.reference import relation_kl_reference

try:  # importlib: the package attribute `relation_kl` is the function, not this module
    triton_mod = importlib.import_module("linearard_ray.ops.relation_kl_triton")
    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# "triton" runs the default backward (the two-recompute sweep), "triton-atomic" the opt-in
# one-recompute backward with atomics (causal self-relations), "triton-rowfwd" the opt-in mode whose
# forward also stores the row part of the grad (column-only backward); all are the "triton" backend.
TRITON_MODES = {"triton": None, "triton-atomic": "atomic", "triton-rowfwd": "rowfwd"}
BACKENDS = ["torch"] + (list(TRITON_MODES) if HAVE_TRITON and (CUDA or INTERP) else [])


def be(backend):
    return "triton" if backend.startswith("triton") else backend


@pytest.fixture(autouse=True)
def _backward_mode(request):
    params = getattr(request.node, "callspec", None)
    mode = TRITON_MODES.get(params.params.get("backend")) if params is not None else None
    if mode:
        triton_mod.set_backward_mode(mode)
    yield
    if mode:
        triton_mod.set_backward_mode(None)


DEV = "cuda" if CUDA else "cpu"


def rel_err(x, ref):
    x = x.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(x).all(), "NaN/Inf in result"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def make(B, H, Hk, T, D, dtype, gen, spread=1.0):
    """Student/teacher inputs; the teacher is a perturbed student so both maps are non-trivial."""

    def r(h):
        return torch.randn(B, h, T, D, generator=gen, dtype=torch.float64)

    sq, sk = r(H) * spread, r(Hk) * spread
    tq, tk = sq + 0.7 * r(H), sk + 0.7 * r(Hk)
    return [x.to(dtype).to(DEV) for x in (sq, sk, tq, tk)]


def padding_mask(B, T, gen):
    """Left padding on batch 0, right padding on the last one, both ends in the middle."""
    m = torch.ones(B, T, dtype=torch.long)
    left = int(torch.randint(1, max(2, T // 3), (1,), generator=gen))
    right = int(torch.randint(1, max(2, T // 3), (1,), generator=gen))
    m[0, :left] = 0
    m[-1, T - right :] = 0
    if B > 2:
        m[1, :2] = 0
        m[1, -3:] = 0
    return m.to(DEV)


def run_case(backend, B, H, Hk, T, D, dtype, *, self_rel, causal, mask, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    sq, sk, tq, tk = make(B, H, Hk, T, D, dtype, gen)
    if self_rel:
        sk = tk = None
    m = padding_mask(B, T, gen) if mask else None
    a_s, a_t = scales
    leaves = [x.detach().clone().requires_grad_(True) for x in ((sq, sk) if not self_rel else (sq,))]
    s_q = leaves[0]
    s_k = None if self_rel else leaves[1]
    kl = relation_kl(
        s_q,
        s_k,
        tq,
        tk,
        attention_mask=m,
        causal=causal,
        student_scale=a_s,
        teacher_scale=a_t,
        reduction="none",
        backend=be(backend),
    )
    w = torch.rand(kl.shape, generator=gen, dtype=torch.float64).to(DEV)  # random upstream grads
    (kl.double() * w).sum().backward()

    ref_leaves = [x.detach().double().cpu().requires_grad_(True) for x in leaves]
    r_k = None if self_rel else ref_leaves[1]
    ref = relation_kl_reference(
        ref_leaves[0],
        r_k,
        tq.double().cpu(),
        None if tk is None else tk.double().cpu(),
        None if m is None else m.cpu(),
        causal,
        a_s,
        a_t,
    )
    (ref * w.cpu()).sum().backward()
    t = tol(dtype)
    if T == 1:
        # One valid column per row: the KL and its gradient are exactly 0, so a relative error is
        # undefined; the kernel's rounding (t - s) - t + s must stay below the tolerance in absolute terms.
        assert ref.abs().max() < 1e-12 and kl.abs().max().item() <= t, ("kl", kl.abs().max().item())
        for got in leaves:
            assert got.grad.dtype == got.dtype and got.grad.abs().max().item() <= t
    else:
        assert rel_err(kl, ref) <= t, ("kl", rel_err(kl, ref))
        for got, want in zip(leaves, ref_leaves, strict=False):
            assert got.grad.dtype == got.dtype
            assert rel_err(got.grad, want.grad) <= t, ("grad", rel_err(got.grad, want.grad))
    if m is not None:  # masked rows: exactly zero loss and (self-relation) exactly zero grad
        rows = (m == 0)[:, None, :].expand_as(kl)
        assert torch.all(kl[rows] == 0)
        if self_rel:
            assert torch.all(leaves[0].grad.transpose(1, 2)[m == 0] == 0)
    return kl, [x.grad for x in leaves]


# T values straddle the test tile sizes (16 / 32) and are not multiples of them.
CASES = [
    # B, H, Hk, T, D, self_rel, causal, mask, scales
    (2, 2, 2, 37, 16, True, True, False, (None, None)),
    (3, 2, 2, 50, 32, True, True, True, (0.3, 0.15)),
    (2, 4, 2, 45, 16, False, True, True, (None, 0.2)),
    (2, 4, 1, 33, 32, False, False, True, (0.2, None)),
    (1, 2, 2, 70, 24, True, False, False, (None, None)),
    (2, 2, 2, 1, 16, True, True, False, (None, None)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        f"B{c[0]}H{c[1]}k{c[2]}T{c[3]}D{c[4]}{'self' if c[5] else 'cross'}{'C' if c[6] else 'N'}{'M' if c[7] else ''}"
    ),
)
def test_fp32_matches_reference(backend, case):
    B, H, Hk, T, D, self_rel, causal, mask, scales = case
    run_case(
        backend,
        B,
        H,
        Hk,
        T,
        D,
        torch.float32,
        self_rel=self_rel,
        causal=causal,
        mask=mask,
        scales=scales,
        seed=zlib.crc32(repr(case).encode()) % 10_000,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_matches_reference(backend, dtype):
    run_case(backend, 3, 4, 2, 41, 32, dtype, self_rel=False, causal=True, mask=True, scales=(None, None), seed=7)
    run_case(backend, 2, 2, 2, 29, 16, dtype, self_rel=True, causal=True, mask=True, scales=(0.2, 0.3), seed=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_fully_masked_batch(backend):
    gen = torch.Generator().manual_seed(3)
    sq, _, tq, _ = make(2, 2, 2, 20, 16, torch.float32, gen)
    m = torch.ones(2, 20, dtype=torch.long, device=DEV)
    m[1] = 0  # a whole sequence of padding
    m[0, :5] = 0
    x = sq.clone().requires_grad_(True)
    rows = relation_kl(x, None, tq, None, attention_mask=m, reduction="none", backend=be(backend))
    total = relation_kl(x, None, tq, None, attention_mask=m, reduction="sum", backend=be(backend))
    mean = relation_kl(x, None, tq, None, attention_mask=m, reduction="mean", backend=be(backend))
    assert torch.allclose(total, rows.sum(), rtol=1e-6)
    assert torch.allclose(mean, rows.sum() / (2 * 15), rtol=1e-6)  # H * valid positions
    assert (
        torch.all(rows[1] == 0) and torch.all(rows[0, :, :5] == 0) and torch.all(rows[0, :, 6:] > 0)
    )  # row 5 sees one column: KL 0
    mean.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1] == 0) and torch.all(x.grad[0, :, :5] == 0)
    assert x.grad[0, :, 5:].abs().sum() > 0
    # nothing valid at all: mean is 0 with zero gradient, no NaN
    y = sq.clone().requires_grad_(True)
    z = relation_kl(y, None, tq, None, attention_mask=torch.zeros_like(m), reduction="mean", backend=be(backend))
    z.backward()
    assert z.item() == 0 and torch.all(y.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_grad_and_equal_maps_give_zero(backend):
    gen = torch.Generator().manual_seed(4)
    sq, sk, tq, tk = make(1, 2, 1, 19, 16, torch.float32, gen)
    t = tq.clone().requires_grad_(True)
    s = sq.clone().requires_grad_(True)
    relation_kl(s, sk, t, tk, backend=be(backend)).backward()
    assert t.grad is None and s.grad is not None
    same = relation_kl(sq, sk, sq, sk, reduction="none", backend=be(backend))
    assert same.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(5)
    sq, sk, tq, tk = make(2, 4, 2, 45, 32, torch.float16, gen)
    m = padding_mask(2, 45, gen)
    outs = []
    for _ in range(2):
        a, b = sq.clone().requires_grad_(True), sk.clone().requires_grad_(True)
        kl = relation_kl(a, b, tq, tk, attention_mask=m, backend=be(backend))
        kl.backward()
        outs.append((kl.detach(), a.grad, b.grad))
    for x, y in zip(*outs, strict=False):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_three_calls(backend):
    gen = torch.Generator().manual_seed(6)
    B, T, D = 2, 39, 16
    sq, sk, tq, tk = make(B, 4, 2, T, D, torch.float32, gen)
    sv, _, tv, _ = make(B, 2, 2, T, D, torch.float32, gen)
    m = padding_mask(B, T, gen)
    scales_s, scales_t = (None, 0.2, 0.3), (0.25, None, 0.1)
    leaves = [x.clone().requires_grad_(True) for x in (sq, sk, sv)]
    outs = relation_kl_layer(
        *leaves,
        tq,
        tk,
        tv,
        attention_mask=m,
        student_scales=scales_s,
        teacher_scales=scales_t,
        reduction="mean",
        backend=be(backend),
    )
    sum(outs).backward()
    for i, (s, t) in enumerate(zip((sq, sk, sv), (tq, tk, tv), strict=False)):
        x = s.double().cpu().requires_grad_(True)
        ref = relation_kl_reference(x, None, t.double().cpu(), None, m.cpu(), True, scales_s[i], scales_t[i])
        ref = ref.sum() / (s.shape[1] * m.sum().item())
        ref.backward()
        assert rel_err(outs[i], ref) <= 1e-5
        assert rel_err(leaves[i].grad, x.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_layer_runs_separate_launches_with_the_same_result(backend, monkeypatch):
    """Above FUSED_LAYER_MAX_ROWS the layer call runs three launches: same values and grads."""
    import linearard_ray.ops.api as api

    gen = torch.Generator().manual_seed(8)
    B, T, D = 1, 33, 16
    sq, sk, tq, tk = make(B, 4, 2, T, D, torch.float32, gen)
    sv, _, tv, _ = make(B, 2, 2, T, D, torch.float32, gen)
    results = []
    for limit in (10**9, 0):
        monkeypatch.setattr(api, "FUSED_LAYER_MAX_ROWS", limit)
        leaves = [x.clone().requires_grad_(True) for x in (sq, sk, sv)]
        outs = relation_kl_layer(*leaves, tq, tk, tv, backend=be(backend))
        sum(o * w for o, w in zip(outs, (1.0, 0.5, 2.0), strict=False)).backward()
        results.append([o.detach() for o in outs] + [x.grad for x in leaves])
    for a, b in zip(*results, strict=False):
        assert rel_err(a, b) <= 1e-6


def _bad_calls():
    x = torch.randn(1, 4, 8, 16)
    k2 = torch.randn(1, 2, 8, 16)
    k3 = torch.randn(1, 3, 8, 16)
    ok = dict(student_q=x, student_k=None, teacher_q=x, teacher_k=None)

    def call(**kw):
        args = {**ok, **kw}
        extra = {k: args.pop(k) for k in list(args) if k not in ok}
        return lambda: relation_kl(args["student_q"], args["student_k"], args["teacher_q"], args["teacher_k"], **extra)

    return [
        ("student_q", call(student_q=torch.randn(4, 8, 16))),
        ("student_q", call(student_q=[1, 2])),
        ("teacher_q", call(teacher_q=None)),
        ("teacher_q", call(teacher_q=torch.randn(2, 4, 8, 16))),  # batch mismatch
        ("teacher_q", call(teacher_q=torch.randn(1, 4, 9, 16))),  # T mismatch
        ("teacher_q", call(teacher_q=torch.randn(1, 2, 8, 16))),  # heads mismatch
        ("student_k", call(student_k=k3, teacher_k=k3)),  # heads do not divide
        ("student_k", call(student_k=torch.randn(1, 2, 7, 16), teacher_k=k2)),
        ("teacher_k", call(student_k=k2, teacher_k=torch.randn(1, 2, 8, 32))),
        ("teacher_k", call(student_k=k2)),  # only one side given
        ("student_q", call(student_q=x.to(torch.float64), teacher_q=x.to(torch.float64))),  # dtype
        ("student_q", call(student_q=x.to(torch.int32), teacher_q=x)),
        ("student_q", call(student_q=torch.randn(1, 4, 8, 8), teacher_q=torch.randn(1, 4, 8, 8))),  # D < 16
        ("student_q", call(student_q=torch.randn(1, 4, 8, 320), teacher_q=torch.randn(1, 4, 8, 320))),
        ("student_q", call(student_q=torch.randn(1, 4, 0, 16), teacher_q=torch.randn(1, 4, 0, 16))),
        ("attention_mask", call(attention_mask=torch.ones(1, 9))),
        ("attention_mask", call(attention_mask=torch.ones(8))),
        ("attention_mask", call(attention_mask=torch.full((1, 8), 0.5))),
        ("reduction", call(reduction="avg")),
        ("backend", call(backend="cuda")),
        ("student_scale", call(student_scale=-1.0)),
        ("teacher_scale", call(teacher_scale=float("nan"))),
        ("causal", call(causal="yes")),
    ]


@pytest.mark.parametrize("name,fn", _bad_calls(), ids=[f"{i}-{n}" for i, (n, _) in enumerate(_bad_calls())])
def test_bad_input_raises_value_error_naming_argument(name, fn):
    with pytest.raises(ValueError, match=name):
        fn()


def test_layer_bad_input():
    x, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="student_v"):
        relation_kl_layer(x, k, torch.randn(1, 1, 8, 16), x, k, torch.randn(1, 1, 8, 16))
    with pytest.raises(ValueError, match="teacher_k"):
        relation_kl_layer(x, k, k, x, torch.randn(1, 2, 8, 32), k)
    with pytest.raises(ValueError, match="student_scales"):
        relation_kl_layer(x, k, k, x, k, k, student_scales=(None, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite(backend):
    x = torch.randn(1, 2, 8, 16, device=DEV)
    bad = x.clone()
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="teacher_q"):
        relation_kl(x, None, bad, None, check_finite=True, backend=be(backend))
    bad[0, 1, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="student_q"):
        relation_kl(bad, None, x, None, check_finite=True, backend=be(backend))
    assert math.isfinite(relation_kl(x, None, x * 1.5, None, check_finite=True, backend=be(backend)).item())


def test_torch_path_is_chunked_and_matches_unchunked():
    """Small row chunks (several per sequence) give the same values and grads as one chunk."""
    from linearard_ray.ops import relation_kl_torch as rt

    gen = torch.Generator().manual_seed(9)
    sq, sk, tq, tk = make(2, 4, 2, 31, 16, torch.float32, gen)
    m = padding_mask(2, 31, gen)
    res = []
    for chunk in (31, 4):
        a = sq.clone().requires_grad_(True)
        b = sk.clone().requires_grad_(True)
        kl = rt.relation_kl_rows(a, b, tq, tk, m.bool(), True, 0.25, 0.25, chunk=chunk)
        kl.sum().backward()
        res.append((kl.detach(), a.grad, b.grad))
    for x, y in zip(*res, strict=False):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_match_contiguous(backend):
    """Captured q/k come as [B, T, H, D] transposed views; a teacher may have another layout."""
    gen = torch.Generator().manual_seed(10)
    B, H, Hk, T, D = 2, 4, 2, 23, 16
    raw = [torch.randn(B, T, h, D, generator=gen).to(DEV) for h in (H, Hk, H, Hk)]
    sq, sk, tq, tk = (x.transpose(1, 2) for x in raw)  # non-contiguous [B, H, T, D]
    tk = tk.contiguous()  # teacher keys in a different layout from the student's
    m = padding_mask(B, T, gen)
    outs = []
    for make_contig in (False, True):
        a = (sq.contiguous() if make_contig else sq).detach().requires_grad_(True)
        b = (sk.contiguous() if make_contig else sk).detach().requires_grad_(True)
        kl = relation_kl(a, b, tq, tk, attention_mask=m, reduction="none", backend=be(backend))
        kl.sum().backward()
        outs.append((kl.detach(), a.grad, b.grad))
    for x, y in zip(*outs, strict=False):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_auto_backend_uses_torch_off_cuda(monkeypatch):
    from linearard_ray.ops import relation_kl_torch as rt

    calls = []
    real = rt.relation_kl_rows
    monkeypatch.setattr(rt, "relation_kl_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 2, 8, 16)
    relation_kl(x, None, x * 1.1, None, backend="auto")
    assert calls == [1]


needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (16, 16)], ids=lambda t: f"m{t[0]}n{t[1]}")
def test_one_recompute_backward_tiles(tiles):
    """The one-recompute backward owns column blocks and sweeps row tiles; any pair of sizes,
    with T cutting through both, must give the reference grads (values too: the forward is shared)."""
    triton_mod.set_tile_config("bwd1", triton_mod.TileConfig(tiles[0], tiles[1], 1, 1))
    triton_mod.set_backward_mode("atomic")
    triton_mod.last_compiled.pop("bwd1", None)
    try:
        run_case(
            "triton",
            2,
            3,
            3,
            45,
            16,
            torch.float32,
            self_rel=True,
            causal=True,
            mask=True,
            scales=(0.3, 0.2),
            seed=11 + tiles[0] + 3 * tiles[1],
        )
    finally:
        triton_mod.set_tile_config("bwd1", None)
        triton_mod.set_backward_mode(None)
    assert "bwd1" in triton_mod.last_compiled


def _two_relations(seed: int, weight_heads: int):
    """Student/teacher pairs for two bf16 relations (B=2, H=2, T=41, D=32), a padding mask and
    per-row upstream weights for ``weight_heads`` heads: the inputs the backward-mode tests share."""
    gen = torch.Generator().manual_seed(seed)
    B, T, D = 2, 41, 32
    sq, _, tq, _ = make(B, 2, 2, T, D, torch.bfloat16, gen)
    sk, _, tk, _ = make(B, 2, 2, T, D, torch.bfloat16, gen)
    return sq, sk, tq, tk, padding_mask(B, T, gen), torch.rand(B, weight_heads, T, generator=gen).to(DEV)


@needs_triton
def test_backward_modes_agree_and_only_opt_in_runs_atomics():
    sq, sk, tq, tk, m, w = _two_relations(12, 4)
    grads = {}
    for mode in ("atomic", "sweep", "default", "atomic+deterministic"):
        triton_mod.last_compiled.clear()
        triton_mod.set_backward_mode(None if mode == "default" else mode.split("+")[0])
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(mode.endswith("deterministic"))
        try:
            a, b = sq.clone().requires_grad_(True), sk.clone().requires_grad_(True)
            outs = relation_kl_layer(a, b, b, tq, tk, tk, attention_mask=m, reduction="none", backend="triton")
            (torch.cat(outs[:2], dim=1) * w).sum().backward()
        finally:
            torch.use_deterministic_algorithms(was)
            triton_mod.set_backward_mode(None)
        assert ("bwd1" in triton_mod.last_compiled) == (mode == "atomic"), mode
        grads[mode] = (a.grad, b.grad)
    for mode in ("sweep", "default", "atomic+deterministic"):
        for x, y in zip(grads["atomic"], grads[mode], strict=False):
            assert rel_err(x, y) <= 1e-2  # G is rounded to bf16 in both; the accumulation order differs
    with pytest.raises(ValueError, match="backward mode"):
        triton_mod.set_backward_mode("fast")


@needs_triton
@pytest.mark.parametrize(
    "fwd_tiles,bwd_tiles",
    [((32, 16), (16, 16)), ((16, 16), (32, 16)), ((32, 32), (32, 32))],
    ids=lambda t: f"m{t[0]}n{t[1]}",
)
def test_rowfwd_tiles(fwd_tiles, bwd_tiles):
    """The rowfwd forward stores R per row block of its own tile and the column-only backward owns
    row blocks of another size: any pair, with T cutting through both, gives the reference values
    and grads (self causal + mask, cross GQA without causal mask, a D that is not a power of 2)."""
    triton_mod.set_tile_config("fwdr", triton_mod.TileConfig(*fwd_tiles, 1, 1))
    triton_mod.set_tile_config("bwdc", triton_mod.TileConfig(*bwd_tiles, 1, 1))
    triton_mod.set_backward_mode("rowfwd")
    triton_mod.last_compiled.clear()
    try:
        seed = 13 + fwd_tiles[0] + 3 * bwd_tiles[0]
        run_case(
            "triton",
            2,
            3,
            3,
            45,
            24,
            torch.float32,
            self_rel=True,
            causal=True,
            mask=True,
            scales=(0.3, 0.2),
            seed=seed,
        )
        run_case(
            "triton",
            2,
            4,
            2,
            38,
            16,
            torch.float32,
            self_rel=False,
            causal=False,
            mask=True,
            scales=(None, 0.2),
            seed=seed + 1,
        )
    finally:
        triton_mod.set_tile_config("fwdr", None)
        triton_mod.set_tile_config("bwdc", None)
        triton_mod.set_backward_mode(None)
    assert {"fwdr", "bwdc"} <= set(triton_mod.last_compiled)
    assert not {"fwd", "bwd", "bwd1"} & set(triton_mod.last_compiled)


@needs_triton
def test_rowfwd_agrees_with_sweep_and_is_chosen_at_forward_time():
    """rowfwd runs only when a student grad is wanted; a forward in one mode is finished by that
    mode's backward even if the mode changes in between; values equal the sweep's bitwise (same
    forward arithmetic) and grads agree to bf16 rounding, per-row upstream grads on a fused layer."""
    sq, sk, tq, tk, m, w = _two_relations(14, 6)

    def layer(fwd_mode, bwd_mode):
        triton_mod.last_compiled.clear()
        triton_mod.set_backward_mode(fwd_mode)
        try:
            leaves = [x.clone().requires_grad_(True) for x in (sq, sk, sk)]
            outs = relation_kl_layer(*leaves, tq, tk, tk, attention_mask=m, reduction="none", backend="triton")
            triton_mod.set_backward_mode(bwd_mode)
            (torch.cat(outs, dim=1) * w).sum().backward()
        finally:
            triton_mod.set_backward_mode(None)
        return [o.detach() for o in outs], [x.grad for x in leaves], set(triton_mod.last_compiled)

    vals, grads, kinds = layer("sweep", "sweep")
    assert kinds == {"fwd", "bwd"}
    for fwd_mode, bwd_mode in (("rowfwd", "rowfwd"), ("rowfwd", None), ("rowfwd", "atomic")):
        v, g, kinds = layer(fwd_mode, bwd_mode)
        assert kinds == {"fwdr", "bwdc"}, (fwd_mode, bwd_mode, kinds)
        for x, y in zip(v, vals, strict=False):
            assert torch.equal(x, y)
        for x, y in zip(g, grads, strict=False):
            assert rel_err(x, y) <= 1e-2  # P rounded to bf16 twice here, G once in the sweep
    assert layer("sweep", "rowfwd")[2] == {"fwd", "bwd"}

    triton_mod.set_backward_mode("rowfwd")
    try:
        for grad_mode, needs in ((False, True), (True, False)):
            triton_mod.last_compiled.clear()
            with torch.set_grad_enabled(grad_mode):
                relation_kl(sq.clone().requires_grad_(needs), None, tq, None, backend="triton")
            assert set(triton_mod.last_compiled) == {"fwd"}, (grad_mode, needs)
    finally:
        triton_mod.set_backward_mode(None)
