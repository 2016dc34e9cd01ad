#!/usr/bin/env python
"""A sweep config that trains on the shipped teacher corpus instead of sampling the teacher first.

A GPU sweep with ``data.teacher_samples`` draws its teacher text once before the first trial (about
five minutes of a lent host's 30 on SmolLM2-135M). The study ships that text already drawn with the
same settings (research/data/smollm2_teacher_samples.jsonl.xz), so a sweep on a lent host reads it
as a plain source: this writes the config with ``data.teacher_samples`` removed and the unpacked
corpus added to the base mix and to every ``data.sources`` choice of the search space, which is
where the sampler would have put it. Nothing else changes.

    python research/sweep_on_shipped_samples.py --config configs/sweep-smollm2-135m-genres.yaml \\
        --samples /tmp/w/teacher_samples.jsonl --out /tmp/w/sweep.yaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

from linearard_ray.config import load_config


def with_shipped_samples(sweep: dict, samples: str) -> dict:
    """``sweep`` (a sweep config as read from YAML) reading ``samples`` instead of sampling it."""
    out = copy.deepcopy(sweep)
    data = out.setdefault("data", {})
    if data.pop("teacher_samples", None) is None:
        raise ValueError("the sweep samples no teacher text (no data.teacher_samples): nothing to replace")
    data["sources"] = [*data.get("sources", []), samples]
    mix = out.get("tune", {}).get("space", {}).get("data.sources")
    if mix is not None:
        (kind, choices), *rest = mix.items()
        if rest or kind not in ("choice", "grid"):
            raise ValueError(f"tune.space's data.sources must be one choice or grid list, not {mix!r}")
        mix[kind] = [[*choice, samples] for choice in choices]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the sweep config that samples the teacher")
    p.add_argument("--samples", required=True, help="the unpacked teacher corpus (JSONL)")
    p.add_argument("--out", required=True, help="where to write the derived sweep config")
    a = p.parse_args(argv)
    if not Path(a.samples).is_file():
        raise SystemExit(f"sweep_on_shipped_samples.py: no teacher corpus at {a.samples}")
    derived = with_shipped_samples(yaml.safe_load(Path(a.config).read_text()), str(Path(a.samples).resolve()))
    Path(a.out).write_text(
        f"# {a.config} reading the shipped teacher corpus (research/sweep_on_shipped_samples.py)\n"
        + yaml.safe_dump(derived, sort_keys=False, allow_unicode=True)
    )
    load_config(a.out)  # the derived sweep must still be a valid config
    print(f"wrote {a.out}: {a.config} with the teacher corpus {a.samples} as a source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
