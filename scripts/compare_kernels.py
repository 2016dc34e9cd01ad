"""Whether a change touched the op's Triton kernels: compares every ``@triton.jit`` function and
every module-level constant (the tile configurations) of two versions of a kernel file as syntax
trees, without docstrings, comments, formatting or line numbers. Identical trees compile to the
same kernels, so a refactor that passes this check cannot move a GPU figure.

    python scripts/compare_kernels.py --base c295542:linearard_ray/ops/relation_kl.py \
        linearard_ray/ops/relation_kl_triton.py

``--base`` is ``REV:PATH`` (read with ``git show``) or a file. Exit status 1 when a kernel or a
constant differs.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path


def _read(spec: str) -> str:
    if Path(spec).is_file():
        return Path(spec).read_text()
    return subprocess.run(["git", "show", spec], capture_output=True, text=True, check=True).stdout


def _without_docstring(fn: ast.FunctionDef) -> str:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return ast.dump(ast.Module(body=body, type_ignores=[])) + ast.dump(fn.args) + repr(fn.name)


def kernels_and_constants(source: str) -> tuple[dict[str, str], dict[str, str]]:
    """(kernel name -> its tree, constant name -> its value's tree) of a module's top level."""
    kernels, constants = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            kernels[node.name] = _without_docstring(node)
        elif isinstance(node, ast.Assign):
            constants[ast.unparse(node.targets[0])] = ast.dump(node.value)
    return kernels, constants


def compare(old: dict[str, str], new: dict[str, str], what: str) -> bool:
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    same = len(old.keys() & new.keys()) - len(changed)
    print(f"{what}: {same} identical; changed {changed or 'none'}; removed {gone or 'none'}; added {added or 'none'}")
    return not (changed or gone or added)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="REV:PATH or a file: the version to compare against")
    ap.add_argument("path", help="the kernel file now")
    args = ap.parse_args(argv)
    old_k, old_c = kernels_and_constants(_read(args.base))
    new_k, new_c = kernels_and_constants(Path(args.path).read_text())
    ok = compare(old_k, new_k, "kernels") & compare(old_c, new_c, "constants")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
