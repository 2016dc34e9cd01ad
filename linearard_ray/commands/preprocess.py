"""Tokenize raw text into the token blocks training streams (Ray Data, parquet + manifest.json).

Reads files, directories, globs, s3:// and gs:// paths, hf:<dataset>[:split] or hf:<dataset>:<config>:[split]
and builtin:sotu/<split>; tokenizes them with the teacher's tokenizer in a Ray Data actor pool, cuts ctx_len blocks and
writes parquet shards plus manifest.json. Bad documents are skipped, counted and reported.

    python pipelines/preprocess.py                                   # embedded SOTU 1790-1989, teacher's tokenizer
    python pipelines/preprocess.py --set data.ctx_len=2048
    python pipelines/preprocess.py --set 'data.sources=["corpus/*.jsonl", "s3://bucket/books/"]' --set data.pack=true
    python pipelines/preprocess.py --config configs/<recipe>.yaml --stream lm

The output goes to data.output_dir, or outputs/data/<hash of the data settings and tokenizer>;
a run with the same settings and unchanged inputs reuses a finished directory (--force redoes it).
--dry-run shows where each stream's blocks would go and whether they are already there.
"""

from __future__ import annotations

import os
import sys

from linearard_ray.cli import build_parser, parse_config, show_plan, user_error, user_errors
from linearard_ray.config import Config
from linearard_ray.logs import show_result


def main(argv: list[str] | None = None, prog: str = "preprocess.py") -> int:
    parser = build_parser(prog, __doc__, sections=["model", "data"])
    parser.add_argument(
        "--stream",
        choices=["main", "lm", "both"],
        default="main",
        help="main: the distillation blocks; lm: the next-token term's (data.lm_sources, "
        "data.lm_ctx_len); both: one after the other",
    )
    parser.add_argument("--force", action="store_true", help="preprocess again even when a finished directory matches")
    args, cfg = parse_config(parser, argv)

    from linearard_ray.data.preprocess import ensure_preprocessed, format_report, read_manifest

    streams = ["main", "lm"] if args.stream == "both" else [args.stream]
    try:
        if args.dry_run:
            return show_plan(prog, dry_run(cfg, streams, args.force))
        for stream in streams:
            out = ensure_preprocessed(cfg, stream=stream, progress=not args.quiet, force=args.force)
            show_result(f"[{stream}] " + format_report(read_manifest(out), out))
    except user_errors() as e:  # the user's input (sources, data, tokenizer), not a bug: no traceback
        return user_error(prog, e)
    return 0


def dry_run(cfg: Config, streams: list[str], force: bool) -> list[str]:
    """Each stream's directory and whether it is already preprocessed (sources resolved, nothing read)."""
    from linearard_ray.commands.dry_run import data_dir, data_line

    lines = []
    for stream in streams:
        lines.append(data_line(stream, *data_dir(cfg, stream), force=force))
    return lines


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
