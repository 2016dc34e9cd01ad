"""Distil a RoPE-scaled student from its native-RoPE teacher on Ray Train (LinearARD).

A frozen native-RoPE teacher restores the short-text ability of its RoPE-scaled student. Without
arguments it runs the embedded default: SmolLM2-135M, PI×4, the shipped State of the Union text,
on the CPU (about 4 minutes on 2 idle cores, most of it distillation).

    python pipelines/distill.py                          # embedded default: SmolLM2-135M PI×4 on CPU
    python pipelines/distill.py --config configs/llama2-7b-32k.yaml
    python pipelines/distill.py --set train.max_steps=10 --set data.ctx_len=256
    ray job submit --working-dir . -- python pipelines/distill.py --config configs/<recipe>.yaml

Starting it again with the same train.run_name resumes from the last checkpoint. --dry-run checks
the config and shows the run lock, the paths, the data and the step plan without starting Ray.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from linearard_ray.cli import build_parser, parse_config, show_plan, user_error, user_errors
from linearard_ray.config import Config, EvalConfig
from linearard_ray.logs import get_logger
from linearard_ray.paths import output_path

log = get_logger(__name__)


def main(argv: list[str] | None = None, prog: str = "distill.py") -> int:
    parser = build_parser(prog, __doc__)
    parser.add_argument(
        "--force",
        action="store_true",
        help="take over the run name from a job that seems to hold it (same as --set train.takeover=true)",
    )
    args, cfg = parse_config(parser, argv)
    if args.force:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"takeover": True})})
    try:
        if args.dry_run:
            return show_plan(prog, dry_run(cfg))
        from linearard_ray.training.driver import run_distill

        result = run_distill(cfg)
    except user_errors() as e:  # the user's input, not a bug: no traceback
        return user_error(prog, e)
    if result.student_dir and not cfg.train.evaluate_at_end:
        log.info(next_step(args.config, args.overrides, result.student_dir, cfg))
    return 0


def next_step(config: str | None, overrides: list[str], student_dir: str, cfg: Config) -> str:
    """The command that judges the student as train.evaluate_at_end would: this job's config and
    overrides (so the same teacher and RoPE scaling), its report beside the student unless the
    config names another place. A progress line, so --quiet leaves only the result."""
    words = ["python", "pipelines/evaluate.py", *(["--config", config] if config else [])]
    words += [w for o in overrides for w in ("--set", o)] + ["--set", f"eval.student_path={student_dir}"]
    if cfg.eval.output_dir == EvalConfig().output_dir:
        words += ["--set", f"eval.output_dir={Path(student_dir) / 'eval'}"]
    return f"[distill] next, to measure what it restored: {shlex.join(words)}"


def dry_run(cfg: Config) -> list[str]:
    """What the job would do: every check that needs no worker, the run lock, paths, data, steps."""
    from linearard_ray.commands.dry_run import training_lines

    lines = training_lines(cfg)
    if cfg.train.evaluate_at_end:
        lines.append(f"then: evaluation of the student into {output_path(cfg.eval.output_dir)}")
    return lines
