"""scripts/compare_kernels.py: formatting, comments and docstrings do not count; a changed
operator, tile constant or a kernel gone does."""

from __future__ import annotations

from tests.scripts import load_script

KERNEL = '''
import triton

BLOCK = {64: (128, 64)}


@triton.jit
def _k(x, y, N: tl.constexpr):
    """Adds."""
    return x + y
'''


def _run(tmp_path, old: str, new: str) -> int:
    (tmp_path / "old.py").write_text(old)
    (tmp_path / "new.py").write_text(new)
    return load_script("scripts/compare_kernels.py").main(
        ["--base", str(tmp_path / "old.py"), str(tmp_path / "new.py")]
    )


def test_layout_comments_and_docstrings_are_not_changes(tmp_path):
    reformatted = KERNEL.replace('"""Adds."""', '"""Adds two tiles."""  # why').replace(
        "def _k(x, y, N: tl.constexpr):", "def _k(\n    x,\n    y,\n    N: tl.constexpr,\n):"
    )
    assert _run(tmp_path, KERNEL, reformatted) == 0


def test_a_changed_kernel_or_tile_constant_is(tmp_path, capsys):
    assert _run(tmp_path, KERNEL, KERNEL.replace("x + y", "x - y")) == 1
    assert "changed ['_k']" in capsys.readouterr().out
    assert _run(tmp_path, KERNEL, KERNEL.replace("(128, 64)", "(64, 64)")) == 1
    assert _run(tmp_path, KERNEL, KERNEL.replace("def _k(", "def _k2(")) == 1
