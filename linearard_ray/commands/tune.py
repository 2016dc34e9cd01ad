"""Sweep distillation settings with Ray Tune (each trial one Ray Train run) and record it in MLflow.

Searches RoPE type/factor, layer selection, term weights, objective, lr, LoRA rank and token
budget. Without --config it runs a small default sweep (SmolLM2-135M, a 2×2 grid of rope.factor ×
layer selection, CPU, minutes).

    python pipelines/tune.py                                  # small default sweep: SmolLM2-135M, CPU, minutes
    python pipelines/tune.py --config configs/sweep-smollm2-135m.yaml
    python pipelines/tune.py --config configs/sweep-default.yaml --set tune.num_samples=2   # 2 × 2 grid twice: 8
    python pipelines/tune.py --set tune.search=random --set tune.num_samples=3              # exactly 3 trials
    ray job submit --working-dir . -- python pipelines/tune.py --config configs/<sweep>.yaml

The space is tune.space (dotted config path -> grid/choice/uniform/loguniform/randint). Results:
<tune.storage_path>/<tune.sweep_name>/ (results.csv, results.md, objective.png, best_config.yaml)
and the MLflow experiment named after the sweep: mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import sys

from linearard_ray.cli import EXIT_INTERNAL, build_parser, user_error, user_errors
from linearard_ray.config import ConfigError, load_config, parse_overrides

# Without --config: the embedded default (SmolLM2-135M, PI, CPU) made small enough that its
# 2 × 2 grid (rope.factor × layer selection, tune's default space) runs in minutes.
# configs/sweep-default.yaml holds the same settings as a file.
SWEEP_DEFAULTS: dict[str, object] = {
    "data.ctx_len": 256,
    "train.max_steps": 4,
    "train.warmup_steps": 1,
    "train.lr": 1.0e-3,
    "train.eval_every": 2,
    "train.eval_texts": 2,
    "train.eval_long_len": 1024,
    "train.checkpoint_every": 2,
    "lora.r": 16,
    "lora.alpha": 32.0,
    "tune.sweep_name": "linearard-sweep-default",
    "tune.grace_period": 2,
}


def main(argv: list[str] | None = None, prog: str = "tune.py") -> int:
    parser = build_parser(prog, __doc__)
    args = parser.parse_args(argv)
    try:
        overrides = ({} if args.config else dict(SWEEP_DEFAULTS)) | parse_overrides(args.overrides)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return user_error(prog, e)
    from linearard_ray.sweep.tune import run_sweep

    try:
        res = run_sweep(cfg)
    except user_errors() as e:  # the user's input: no traceback
        return user_error(prog, e)
    if res.best is None:
        print(f"{prog}: no trial reported the objective; see the table above for the errors", file=sys.stderr)
        return EXIT_INTERNAL
    return 0
