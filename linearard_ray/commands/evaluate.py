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

Writes report.json, report.md and PNG plots to eval.output_dir and logs an MLflow run.
"""

from __future__ import annotations

import os

from linearard_ray.cli import build_parser, parse_config, user_error, user_errors
from linearard_ray.paths import output_path


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
    print(f"{prog}: report in {report.get('output_dir') or output_path(cfg.eval.output_dir)}")
    if report.get("mlflow"):
        from linearard_ray.tracking import run_url

        m = report["mlflow"]
        print(f"{prog}: MLflow run: {run_url(m['tracking_uri'], m['experiment_id'], m['run_id'])}")
    return 0
