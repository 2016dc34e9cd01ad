#!/usr/bin/env python
"""Distil a RoPE-scaled student from its native-RoPE teacher on Ray Train (LinearARD).

    python pipelines/distill.py                          # embedded default: SmolLM2-135M PI×4 on CPU
    python pipelines/distill.py --config configs/llama2-7b-32k.yaml
    python pipelines/distill.py --set train.max_steps=10 --set data.ctx_len=256
    ray job submit --working-dir . -- python pipelines/distill.py --config configs/<recipe>.yaml

Starting it again with the same train.run_name resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "linearard_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from linearard_ray.cli import build_parser, parse_config  # noqa: E402
from linearard_ray.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "distill.py",
        "LinearARD self-distillation on Ray Train: a frozen native-RoPE teacher restores the short-text "
        "ability of its RoPE-scaled student. Without arguments it runs the embedded default "
        "(SmolLM2-135M, PI×4, the shipped State of the Union text, CPU, a few minutes).",
    )
    _, cfg = parse_config(parser, argv)
    from linearard_ray.data.sampling import SamplingError
    from linearard_ray.data.sources import DataError
    from linearard_ray.models.loading import ModelError
    from linearard_ray.models.rope import RopeError
    from linearard_ray.training.driver import run_distill

    try:
        run_distill(cfg)
    except (
        ConfigError,
        DataError,
        ModelError,
        RopeError,
        SamplingError,
    ) as e:  # the user's input, not a bug: no traceback
        print(f"distill.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
