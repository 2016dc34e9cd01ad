"""The repository's scripts (pipelines/, benchmarks/) as modules, for tests that call their functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """A fresh module from ROOT/relpath, named so that no installed package can shadow it."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location("_script_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
