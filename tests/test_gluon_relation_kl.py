"""The Gluon relation-KL experiment (benchmarks/experimental/gluon_relation_kl.py) still compiles
for Hopper (sm_90) on this CPU machine: the kernels' syntax, their wgmma products and their
registers without spills. Their values need a GPU (Triton's interpreter does not run Gluon), so
they are checked by the script's --check on the GPU host, not here."""

from __future__ import annotations

import pytest

from tests.scripts import ROOT, load_script

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


@pytest.fixture(scope="module")
def compiled():
    """`--compile` as a user runs it: every kernel at D 64 and 128, one JSON line each. It runs in a
    process of its own, which the script makes non-interpreted (compiled kernels cannot call
    Triton's interpreted helpers)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/experimental/gluon_relation_kl.py"), "--compile"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["kernel"], r["D"]): r for r in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_compiles_for_hopper_without_spills(compiled, D):
    mod = load_script("benchmarks/experimental/gluon_relation_kl.py")
    r = compiled[("gluon fwd", D)]
    # two products (student, teacher) per column tile, D/16 wgmma instructions each, in the
    # prologue and the loop
    assert r["wgmma"] == 2 * 2 * D // 16
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
    assert r["product_waits_in_loop_body"] == 1  # student and teacher products waited together, once per tile
    assert r["shared_bytes"] >= 2 * (mod.BLOCK_M + 2 * mod.BLOCK_N) * D * 2  # Q pair + two K-pair buffers
    # the op's Triton forward, compiled alongside: it waits after each of its two products
    assert compiled[(next(k for k, d in compiled if k.startswith("triton") and d == D), D)]["product_waits_in_loop_body"] == 2


@pytest.mark.parametrize("D", [64, 128])
def test_gluon_backward_compiles_for_hopper_without_spills(compiled, D):
    mod = load_script("benchmarks/experimental/gluon_relation_kl.py")
    r = compiled[("gluon bwd", D)]
    # per tile: the logit pair (K = D) and the two gradient products (K = the block)
    assert r["wgmma"] == 2 * D // 16 + 2 * mod.BWD_BLOCK // 16
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
    assert r["product_waits_in_loop_body"] == 2


def test_gluon_kernels_reject_what_they_do_not_cover():
    import torch

    mod = load_script("benchmarks/experimental/gluon_relation_kl.py")
    x = torch.randn(1, 2, 256, 96).to(torch.bfloat16)
    with pytest.raises(ValueError, match="D in"):
        mod.relation_kl_rows_gluon(x, x.clone())
    y = torch.randn(1, 2, 256, 64)
    with pytest.raises(ValueError, match="bf16"):
        mod.relation_kl_rows_gluon(y, y.clone())
    z = torch.randn(1, 2, 96, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        mod.relation_kl_grad_gluon(z, z.clone(), None, None, None)
