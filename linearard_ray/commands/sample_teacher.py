"""Sample a training corpus from the teacher: text for the KL terms that no dataset has to supply.

    python pipelines/sample_teacher.py --out data/teacher.jsonl --samples 2048 --tokens 2048 --top-p 0.95
    python pipelines/sample_teacher.py --config configs/<recipe>.yaml --out ... --batch-size 1024
    python pipelines/distill.py --set 'data.sources=[builtin:sotu/train, data/teacher.jsonl]'

The teacher is the config's model.teacher with its native RoPE. Started again with the same
arguments, it continues after the last complete batch. On a GPU use a large batch: decoding a
small model is bound by per-step overhead (research/LOG.md, teacher sampling). Top-p below
1 is advisable for small teachers, whose far tail drifts into noise over 2,048 tokens. --dry-run
shows the output file and how much of it an earlier run already wrote.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from linearard_ray.cli import build_parser, parse_config, show_plan, user_error, user_errors
from linearard_ray.logs import show_result
from linearard_ray.paths import output_path


def main(argv: list[str] | None = None, prog: str = "sample_teacher.py") -> int:
    parser = build_parser(prog, __doc__, sections=["model"])
    parser.add_argument("--out", required=True, help="JSONL file to write (appended to on a restart)")
    parser.add_argument("--samples", type=int, required=True, help="number of samples")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens generated per sample (EOS ends one sooner)")
    parser.add_argument("--min-tokens", type=int, default=64, help="skip (and count) samples shorter than this")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args, cfg = parse_config(parser, argv)
    from linearard_ray.data.sampling import SampleSpec, sample_corpus

    try:
        spec = SampleSpec(
            num_samples=args.samples,
            max_new_tokens=args.tokens,
            min_tokens=args.min_tokens,
            batch_size=args.batch_size,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a check across fields (min_tokens against max_new_tokens)
            parser.error(err["msg"].removeprefix("Value error, "))
        flag = {"num_samples": "samples", "max_new_tokens": "tokens"}.get(err["loc"][0], str(err["loc"][0]))
        parser.error(f"--{flag.replace('_', '-')}: {err['msg']}")
    if args.dry_run:
        return show_plan(prog, dry_run(cfg, spec, output_path(args.out), args.device))
    try:
        # an output like any other: not into Ray's copy of a submitted job's working_dir
        summary = sample_corpus(cfg.model, spec, output_path(args.out), device=args.device)
    except user_errors() as e:
        return user_error(prog, e)
    show_result(json.dumps(summary))  # for scripts
    return 0


def dry_run(cfg, spec, out: str, device: str | None) -> list[str]:
    from pathlib import Path

    from linearard_ray.data.sampling import is_complete

    p = Path(out)
    if is_complete(p, cfg.model, spec):
        state = "complete: nothing left to sample"
    elif p.exists():
        state = "exists: sampling continues after its last complete batch"
    else:
        state = "new"
    return [
        f"teacher: {cfg.model.teacher} (native RoPE) on {device or 'cuda when available, else cpu'}",
        f"samples: {spec.num_samples} × up to {spec.max_new_tokens} tokens, batch {spec.batch_size}, "
        f"temperature {spec.temperature}, top-p {spec.top_p}, seed {spec.seed}",
        f"output: {p} ({state})",
    ]
