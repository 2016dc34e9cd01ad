"""The Gluon relation-KL forward experiment (benchmarks/experimental/gluon_relation_fwd.py) still
compiles for Hopper (sm_90) on this CPU machine: the kernel's syntax, its wgmma products and its
registers without spills. Its values need a GPU (Triton's interpreter does not run Gluon), so they
are checked by the script's --check on the GPU host, not here."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_compiles_for_hopper_without_spills(D):
    mod = load_script("benchmarks/experimental/gluon_relation_fwd.py")
    r = mod.compile_for_hopper(D)
    # two products (student, teacher) per column tile, D/16 wgmma instructions each, in the
    # prologue and the loop
    assert r["wgmma"] == 2 * 2 * D // 16
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
    assert r["product_waits_in_loop_body"] == 1  # student and teacher products waited together, once per tile
    assert r["shared_bytes"] >= 2 * (mod.BLOCK_M + 2 * mod.BLOCK_N) * D * 2  # Q pair + two K-pair buffers


def test_gluon_forward_rejects_what_it_does_not_cover():
    import torch

    mod = load_script("benchmarks/experimental/gluon_relation_fwd.py")
    x = torch.randn(1, 2, 256, 96).to(torch.bfloat16)
    with pytest.raises(ValueError, match="D in"):
        mod.relation_kl_rows_gluon(x, x.clone())
    y = torch.randn(1, 2, 256, 64)
    with pytest.raises(ValueError, match="bf16"):
        mod.relation_kl_rows_gluon(y, y.clone())
