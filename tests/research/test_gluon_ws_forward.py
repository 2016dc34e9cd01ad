"""The warp-specialised Gluon forward experiment (research/experimental/gluon_ws_forward.py)
still compiles for Hopper (sm_90) on this CPU machine, in its three modes, with its partitions'
register budgets applied and no local memory (its first version spilled inside the consumer
partitions while cuobjdump reported no spill bytes). Values and speed need a GPU: the script's
--check and --bench on the GPU host."""

from __future__ import annotations

import pytest

from tests.scripts import compile_report

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


@pytest.fixture(scope="module")
def compiled():
    return compile_report("research/experimental/gluon_ws_forward.py")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("mode", ["", " pingpong", " overlap"])
def test_ws_forward_compiles_for_hopper(compiled, D, mode):
    r = compiled[("gluon ws fwd" + mode, D)]
    # two consumer warpgroups, two products (student, teacher) each, D/16 wgmma instructions per
    # product; the overlapped consumer issues its first pair before the loop and the next inside it
    assert r["wgmma"] == 2 * 2 * (D // 16) * (2 if mode == " overlap" else 1)
    assert r["register_reallocation"]  # the producer gives its registers to the consumers
    assert r["local_memory_instructions"] == 0
    assert not r["wgmma_serialized"]
