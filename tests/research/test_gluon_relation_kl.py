"""The Gluon relation-KL experiment (research/experimental/gluon_relation_kl.py) still compiles
for Hopper (sm_90) on this CPU machine: the kernels' syntax, their wgmma products, their
registers without spills, and ptxas keeping the products asynchronous. Their values need a GPU
(Triton's interpreter does not run Gluon), so they are checked by the script's --check on the GPU
host, not here."""

from __future__ import annotations

import pytest

from tests.scripts import compile_report, load_script

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


@pytest.fixture(scope="module")
def compiled():
    """`--compile` as a user runs it: every kernel at D 64 and 128, one JSON line each. It runs in a
    process of its own, which the script makes non-interpreted (compiled kernels cannot call
    Triton's interpreted helpers)."""
    return compile_report("research/experimental/gluon_relation_kl.py")


@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_compiles_for_hopper_without_spills(compiled, D):
    mod = load_script("research/experimental/gluon_relation_kl.py")
    r = compiled[("gluon fwd", D)]
    # two products (student, teacher) per column tile, D/16 wgmma instructions each, in the
    # prologue, the loop and the diagonal epilogue
    assert r["wgmma"] == 3 * 2 * D // 16
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
    assert r["product_waits_in_loop_body"] == 1  # student and teacher products waited together, once per tile
    assert not r["wgmma_serialized"]  # ptxas keeps the products asynchronous
    assert r["shared_bytes"] >= 2 * (mod.BLOCK_M + 2 * mod.BLOCK_N) * D * 2  # Q pair + two K-pair buffers
    # the op's Triton forward, compiled alongside: it waits after each of its two products
    assert (
        compiled[(next(k for k, d in compiled if k.startswith("triton") and d == D), D)]["product_waits_in_loop_body"]
        == 2
    )


@pytest.mark.parametrize("D", [64, 128])
def test_gluon_backward_compiles_for_hopper_without_spills(compiled, D):
    mod = load_script("research/experimental/gluon_relation_kl.py")
    r = compiled[("gluon bwd", D)]
    # the logit pair (K = D) in the prologue and the loop, the two gradient products (K = the
    # block) in the loop and the last tile
    assert r["wgmma"] == 2 * (2 * D // 16) + 2 * (2 * mod.BWD_BLOCK // 16)
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
    assert r["product_waits_in_loop_body"] == 2
    assert not r["wgmma_serialized"]


def test_gluon_kernels_reject_what_they_do_not_cover():
    import torch

    mod = load_script("research/experimental/gluon_relation_kl.py")
    x = torch.randn(1, 2, 256, 96).to(torch.bfloat16)
    with pytest.raises(ValueError, match="D in"):
        mod.relation_kl_rows_gluon(x, x.clone())
    y = torch.randn(1, 2, 256, 64)
    with pytest.raises(ValueError, match="bf16"):
        mod.relation_kl_rows_gluon(y, y.clone())
    z = torch.randn(1, 2, 96, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        mod.relation_kl_grad_gluon(z, z.clone(), None, None, None)


def test_install_routes_only_what_the_kernels_cover_and_undoes():
    """install() sends causal unmasked self-relations the kernels cover to them and every other call
    to the op unchanged (counted), and its undo puts the op's function back."""
    import importlib

    import torch

    mod = load_script("research/experimental/gluon_relation_kl.py")
    rk = importlib.import_module("linearard_ray.ops.relation_kl_triton")
    original = rk.relation_kl_rows
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    s = torch.randn(1, 2, 40, 16, generator=rng)
    t = s + 0.5 * torch.randn(1, 2, 40, 16, generator=rng)
    want = original(s, None, t, None, None, True, 0.25, 0.25)
    undo = mod.install()
    try:
        # fp32, D=16, T=40: not what the kernels cover, so the op answers, counted
        got = rk.relation_kl_rows(s, None, t, None, None, True, 0.25, 0.25)
        masked = rk.relation_kl_rows(s, None, t, None, torch.ones(1, 40, dtype=torch.int8), True, 0.25, 0.25)
    finally:
        undo()
    assert rk.relation_kl_rows is original
    assert torch.equal(got, want) and torch.allclose(masked, want)
    assert mod.routed == {"gluon": 0, "op": 2}
