"""benchmarks/bench_relation_kl.py's tables without a GPU: every ratio is taken against the faster
SDPA backend of the same row, whichever that is, and a backend that refused the shape is skipped."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

pytest.importorskip("triton")


def _bench():
    return load_script("benchmarks/bench_relation_kl.py")


def _row(name, fwd, fb, mem=2**20):
    return {"name": name, "fwd": fwd, "fb": fb, "mem_fwd": mem, "mem_fb": mem}


def _cells(out: str, case: str) -> list[str]:
    line = next(x for x in out.splitlines() if f"| {case} |" in x)
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_use_the_fastest_peer_of_each_column(capsys):
    b = _bench()
    # cuDNN is faster forward, flash faster forward+backward: each column picks its own peer
    rs = [_row("SDPA flash (32 heads)", 2.0, 4.0), _row("SDPA cuDNN (32 heads)", 1.0, 5.0), _row("ours", 1.5, 6.0)]
    b.table("t", [(4096, rs)])
    cells = _cells(capsys.readouterr().out, "ours")
    assert cells[4:6] == ["1.50x cuDNN", "1.50x flash"]


def test_a_refused_backend_is_not_a_peer(capsys):
    b = _bench()
    refused = {"name": "SDPA cuDNN (GQA 32/8)", "oom": "error: RuntimeError: no kernel"}
    rs = [_row("SDPA flash (GQA 32/8)", 2.0, 4.0), refused, _row("ours", 3.0, 2.0)]
    b.table("t", [(8192, rs)])
    out = capsys.readouterr().out
    assert _cells(out, "ours")[4:6] == ["1.50x flash", "0.50x flash"]
    assert "no kernel" in _cells(out, "SDPA cuDNN (GQA 32/8)")[2]


def test_no_peer_gives_a_dash():
    b = _bench()
    assert b.fastest_peer([_row("ours", 1.0, 1.0)], "fb") is None
    assert b.ratio_cell(_row("ours", 1.0, 1.0), None, "fb") == "-"
