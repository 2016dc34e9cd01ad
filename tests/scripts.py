"""The repository's scripts (pipelines/, benchmarks/) as modules, for tests that call their functions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """A fresh module from ROOT/relpath, named so that no installed package can shadow it."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location("_script_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script runs
    spec.loader.exec_module(mod)
    return mod


def compile_report(relpath: str) -> dict[tuple[str, int], dict]:
    """``python <relpath> --compile`` (a kernel experiment compiling for Hopper without a GPU):
    its one JSON line per kernel, keyed by (kernel, head dim)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / relpath), "--compile"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["kernel"], r["D"]): r for r in map(json.loads, out.stdout.splitlines())}
