"""Evaluate restoration and long context: the teacher, the RoPE-scaled (unrestored) student and the
restored student on held-out text of two domains, long documents and passkey retrieval.

Short-text perplexity, relation KL and restoration figures on two text domains, long-context NLL
and passkey retrieval, for those three models (eval.student_path) or any list of models
(eval.models). eval.preset=quick|standard|full sizes it (quick: a CPU smoke test in minutes);
fields set explicitly override the preset.

    python pipelines/evaluate.py --set eval.preset=quick --set eval.student_path=outputs/students/<run>/merged
    python pipelines/evaluate.py --set eval.student_path=outputs/students/linearard-default/merged
    python pipelines/evaluate.py --config configs/<recipe>.yaml --set eval.long_lengths=[16384,32768]
    python pipelines/evaluate.py --set 'eval.models=[{name: a, path: ./ckpt-a}, {name: b, path: ./ckpt-b}]'
    ray job submit --working-dir . -- python pipelines/evaluate.py --ray-address auto ...

Writes report.json, report.md and PNG plots to eval.output_dir and logs an MLflow run. --dry-run
checks the models' paths and the settings and lists the models and where the report would go.
"""

from __future__ import annotations

import os

from linearard_ray.cli import build_parser, parse_config, show_plan, user_error, user_errors
from linearard_ray.config import Config
from linearard_ray.logs import get_logger, show_result
from linearard_ray.paths import output_path

log = get_logger(__name__)


def main(argv: list[str] | None = None, prog: str = "evaluate.py") -> int:
    parser = build_parser(prog, __doc__, sections=["model", "rope", "eval", "tracking"])
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to spread (model, length) jobs over, one GPU each (e.g. 'auto'; default "
        "$RAY_ADDRESS, which `ray job submit` sets); used when the cluster has more than one GPU",
    )
    parser.add_argument(
        "--jobs-per-gpu",
        type=int,
        default=None,
        metavar="N",
        help="run N (model, length) jobs at once on each GPU as Ray tasks (small models leave a "
        "GPU mostly idle); starts a local Ray instance when there is no --ray-address",
    )
    args, cfg = parse_config(parser, argv)
    if args.jobs_per_gpu is not None and args.jobs_per_gpu < 1:
        parser.error(f"--jobs-per-gpu must be >= 1, got {args.jobs_per_gpu}")
    from linearard_ray.evaluation.evaluate import EvalError, evaluate
    from linearard_ray.evaluation.texts import TextsError

    try:
        if args.dry_run:
            return show_plan(prog, dry_run(cfg, args.ray_address, args.jobs_per_gpu))
        if args.jobs_per_gpu:
            import ray

            if not args.ray_address and not ray.is_initialized():
                import torch

                if not torch.cuda.is_available():  # GPU-fraction tasks would wait forever
                    parser.error("--jobs-per-gpu needs a GPU here or a --ray-address with GPUs")
                ray.init(log_to_driver=True)
            report = evaluate(
                cfg, ray_address=args.ray_address, distribute=True, task_resources={"num_gpus": 1.0 / args.jobs_per_gpu}
            )
        else:
            report = evaluate(cfg, ray_address=args.ray_address)
    except user_errors(EvalError, TextsError) as e:
        return user_error(prog, e)
    show_result(f"{prog}: report in {report.get('output_dir') or output_path(cfg.eval.output_dir)}")
    if report.get("mlflow"):
        from linearard_ray.tracking import run_url

        m = report["mlflow"]
        show_result(f"{prog}: MLflow run: {run_url(m['tracking_uri'], m['experiment_id'], m['run_id'])}")
    return 0


def dry_run(cfg: Config, ray_address: str | None, jobs_per_gpu: int | None) -> list[str]:
    """The checks ``evaluate`` makes before its first job, and what it would evaluate where."""
    from pathlib import Path

    from linearard_ray.commands.dry_run import tracking_line
    from linearard_ray.evaluation.evaluate import check_inputs

    ev = cfg.eval
    specs = check_inputs(cfg)  # the run's own checks: a genre not built yet fails here as it would there
    out_dir = Path(output_path(ev.output_dir))
    finished = out_dir / "jobs.jsonl"
    where = "this process"
    if jobs_per_gpu:
        where = f"Ray tasks, {jobs_per_gpu} per GPU"
    elif ray_address:
        where = f"this process, or Ray tasks on {ray_address} when it has more than one GPU"
    lines = [f"model {s.name} ({s.role}): {s.path}{_rope_note(s.rope)}" for s in specs]
    lines += [
        f"texts: {', '.join(ev.texts)} (other domain: {', '.join(ev.other_texts) or 'none'}); "
        f"long lengths {ev.long_lengths}",
        _held_out_line(ev),
        f"output: {out_dir}"
        + (f" (finished jobs in {finished} are reused)" if ev.resume and finished.exists() else ""),
        f"runs in: {where}",
        tracking_line(cfg),
    ]
    return lines


def _rope_note(rope) -> str:
    """', rope linear ×4' for a model given its own RoPE; nothing where the checkpoint's is kept."""
    return "" if rope is None else f", rope {rope.type} ×{rope.factor:g}"


def _held_out_line(ev) -> str:
    """The named held-out domains (eval.domains) and the windows each gets per short length."""
    if not ev.domains:
        return "held-out domains: none (eval.domains; eval.preset=study names three genres)"
    windows = ", ".join(f"{ev.windows_by_length.get(L, ev.max_windows)} windows of {L}" for L in ev.short_lengths)
    return f"held-out domains: {', '.join(ev.domains)} ({windows} tokens each; mean and worst reported)"
