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
--dry-run checks the space and shows the trials, the base data and where the results would go.
"""

from __future__ import annotations

from linearard_ray.cli import EXIT_INTERNAL, build_parser, parse_config, show_plan, user_error, user_errors
from linearard_ray.config import Config
from linearard_ray.logs import get_logger
from linearard_ray.paths import output_path

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


log = get_logger(__name__)


def main(argv: list[str] | None = None, prog: str = "tune.py") -> int:
    parser = build_parser(prog, __doc__, defaults=SWEEP_DEFAULTS)  # a bare run is the small sweep
    args, cfg = parse_config(parser, argv)
    try:
        if args.dry_run:
            return show_plan(prog, dry_run(cfg))
        from linearard_ray.sweep.tune import run_sweep

        res = run_sweep(cfg)
    except user_errors() as e:  # the user's input: no traceback
        return user_error(prog, e)
    if res.best is None:
        log.error(f"{prog}: no trial reported the objective; see the table above for the errors")
        return EXIT_INTERNAL
    return 0


def dry_run(cfg: Config) -> list[str]:
    """The sweep's checks (``check_sweep``), its trials, the base config's data and where it writes."""
    from linearard_ray.commands.dry_run import data_dir, data_line, tracking_line, with_finished_teacher_samples
    from linearard_ray.sweep.search_space import grid_size
    from linearard_ray.sweep.tune import check_sweep

    specs = check_sweep(cfg)
    t = cfg.tune
    n = grid_size(specs, t.search, t.num_samples)
    lines = [f"space: {key} = {value}" for key, value in t.space.items()]
    lines += [
        f"trials: {n if n is not None else t.num_samples} ({t.search} search, scheduler {t.scheduler}, "
        f"ranked by {t.metric} ({t.mode}))",
        f"results: {output_path(t.storage_path).rstrip('/')}/{t.sweep_name}",
        tracking_line(cfg, experiment=t.sweep_name),  # one experiment per sweep
    ]
    cfg, samples, ready = with_finished_teacher_samples(cfg)
    lines += [samples] if samples else []
    if ready:
        lines.append(
            "base " + data_line("main", *data_dir(cfg, "main")) + "; trials that sweep data fields make their own"
        )
    return lines
