#!/usr/bin/env python
"""A recipe config from a sweep's winner: the base recipe with what the best trial trained differently.

`pipelines/tune.py` writes the best trial's whole configuration as ``best_config.yaml``: every
field, the sweep's own plumbing included (its run name, 1M-token budget, screening evaluation,
storage under the sweep's working directory and, on a lent host, the unpacked teacher corpus as a
plain source). A recipe in ``configs/`` is short and trains at the study's budget. This writes the
base recipe (its own fields, in its own order) with every training field where the winner differs
from it: objective weights, mix, RoPE, LoRA, learning rate, ... The plumbing stays the base
recipe's, and the unpacked teacher corpus is dropped from the mix, since the recipe samples its
teacher text itself (``data.teacher_samples``); another local file in the mix is kept, with a
warning.

    python research/recipe_from_sweep.py --best /tmp/w/tune/smollm2-135m-pi4-genres/best_config.yaml \\
        --base configs/smollm2-135m-x4-restore-general.yaml --out configs/smollm2-135m-x4-restore-searched.yaml

The result is a candidate, not yet a recommended recipe: research/README.md says how it is judged
(three trainings against CPT on the same mix).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from linearard_ray.config import build_config, load_config
from linearard_ray.config.loading import set_dotted
from linearard_ray.data.sources import is_named_source


def _study():
    """research/restoration_study.py, whose rule says which fields are trained and which are a
    run's plumbing (the same rule its recipe variants follow)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import restoration_study

    return restoration_study


# The name gpu_round.sh unpacks the shipped teacher corpus to, as a plain source of the sweep.
UNPACKED_SAMPLES = "teacher_samples.jsonl"


def winner_changes(best: dict, base_full: dict) -> dict[str, Any]:
    """The training fields where the best trial's full config differs from the base recipe's, the
    unpacked teacher corpus left out of the mix (the recipe samples its teacher text itself)."""
    changes = _study().training_changes(best, base_full)
    if "data.sources" in changes:
        kept = [s for s in changes["data.sources"] if is_named_source(s) or Path(s).name != UNPACKED_SAMPLES]
        if kept == base_full["data"]["sources"]:
            del changes["data.sources"]
        else:
            changes["data.sources"] = kept
    return changes


def local_sources(changes: dict[str, Any]) -> list[str]:
    """Files the new mix names by path: a recipe's users need them at the same place."""
    return [s for s in changes.get("data.sources", []) if not is_named_source(s)]


def recipe_from_winner(best: dict, base_raw: dict, base_full: dict, run_name: str) -> tuple[dict, dict[str, Any]]:
    """The base recipe as written, with the winner's changes set and ``run_name``; and the changes."""
    changes = winner_changes(best, base_full)
    recipe = copy.deepcopy(base_raw)
    for key, value in changes.items():
        set_dotted(recipe, key, value)
    recipe.setdefault("train", {})["run_name"] = run_name
    build_config(copy.deepcopy(recipe))  # a recipe distill.py accepts
    return recipe, changes


def _header(best_text: str, base: str, changes: dict[str, Any], base_flat: dict[str, Any]) -> str:
    first = [x for x in best_text.splitlines() if x.startswith("# Best trial of sweep")]
    origin = first[0] if first else "# Best trial of a sweep."
    lines = [
        origin,
        f"# Made by research/recipe_from_sweep.py from {base}; changed from it:",
        *(f"#   {k}: {base_flat.get(k)!r} -> {v!r}" for k, v in changes.items()),
        "# A candidate until three trainings against CPT on the same mix say otherwise (research/README.md).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--best", required=True, help="the sweep's best_config.yaml")
    p.add_argument("--base", required=True, help="the recipe the sweep searched around (configs/...yaml)")
    p.add_argument("--out", required=True, help="where to write the new recipe")
    p.add_argument("--run-name", default=None, help="the recipe's train.run_name (default: the out file's stem)")
    a = p.parse_args(argv)
    for path in (a.best, a.base):
        if not Path(path).is_file():
            raise SystemExit(f"recipe_from_sweep.py: no file {path}")
    best_text = Path(a.best).read_text()
    base_full = load_config(a.base).model_dump(mode="json")
    recipe, changes = recipe_from_winner(
        yaml.safe_load(best_text), yaml.safe_load(Path(a.base).read_text()), base_full, a.run_name or Path(a.out).stem
    )
    if not changes:
        print(f"the best trial trains exactly what {a.base} trains: nothing to write")
        return 0
    base_flat = _study().flatten(base_full)
    Path(a.out).write_text(
        _header(best_text, a.base, changes, base_flat) + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    )
    print(f"wrote {a.out}: {a.base} with {len(changes)} change(s) from the best trial")
    for k, v in changes.items():
        print(f"  {k}: {base_flat.get(k)!r} -> {v!r}")
    for path in local_sources(changes):
        print(f"  warning: the mix reads {path} by path; users of the recipe need that file there", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
