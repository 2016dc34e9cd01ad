#!/usr/bin/env python
"""How much of its own document each training token sees inside its block, per source of the mix.

A model trained on 2K blocks learns long-range attention only from tokens whose document started
far back in the same block. Cutting per document gives every token its whole block; packing cuts
the concatenated stream, so a short document may start anywhere and run on into the next block.
This reads a preprocessed directory (pipelines/preprocess.py) and reports, per source and for the
whole mix: blocks, documents per block, the mean number of earlier tokens of the token's own
document in its block, the share of tokens with at least 1024 of them, and padding. Documents are
told apart by the EOS that packing puts after each. Measured for the PI×4 recipes in
research/LOG.md#packing-context.

    xz -dc research/data/smollm2_teacher_samples.jsonl.xz > /tmp/teacher_samples.jsonl
    mix='["builtin:sotu/train", "genre:scripture", "genre:fortunes", "genre:lexicon", "/tmp/teacher_samples.jsonl"]'
    python pipelines/preprocess.py --config configs/smollm2-135m-x4-restore-general.yaml \\
        --set data.teacher_samples=null --set "data.sources=$mix" --set data.output_dir=/tmp/mix/general
    python research/block_context.py /tmp/mix/general
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

LONG_CONTEXT = 1024


def source_of(doc_id: str) -> str:
    """The source a block's first document comes from: 'sotu', a genre's name, or a file's stem."""
    first = doc_id.split("+")[0]
    if first.startswith("sotu/"):
        return "sotu"
    if "/genres/" in first:
        return first.split("/genres/")[1].split("/")[0]
    return Path(first.split(":")[0]).stem


def own_context(ids: np.ndarray, mask: np.ndarray, eos_id: int) -> np.ndarray:
    """For each real token of a block, how many earlier tokens of its own document the block holds
    (the EOS ends the document it closes)."""
    n = int(mask.sum())
    starts = np.zeros(n, dtype=np.int64)
    for k in np.flatnonzero(ids[: n - 1] == eos_id):
        starts[k + 1 :] = k + 1
    return np.arange(n) - starts


def summarise(rows: list[tuple[np.ndarray, int, int]], ctx_len: int) -> dict:
    """rows: (own-context of each real token, documents in the block, padding) per block."""
    ctx = np.concatenate([r[0] for r in rows])
    return {
        "blocks": len(rows),
        "docs_per_block": round(float(np.mean([r[1] for r in rows])), 2),
        "one_document_blocks_pct": round(100 * float(np.mean([r[1] == 1 for r in rows])), 1),
        "mean_own_context": round(float(ctx.mean()), 1),
        f"tokens_with_{LONG_CONTEXT}_pct": round(100 * float((ctx >= LONG_CONTEXT).mean()), 1),
        "padding_pct": round(100 * sum(r[2] for r in rows) / (len(rows) * ctx_len), 2),
    }


def block_context(directory: Path) -> dict[str, dict]:
    manifest = json.loads((directory / "manifest.json").read_text())
    eos, ctx_len = manifest["tokenizer"]["eos_id"], manifest["ctx_len"]
    table = pq.read_table(sorted(directory.glob("*.parquet")), columns=["input_ids", "attention_mask", "doc_id"])
    by_source: dict[str, list] = defaultdict(list)
    for row in table.to_pylist():
        ids, mask = np.asarray(row["input_ids"]), np.asarray(row["attention_mask"])
        ctx = own_context(ids, mask, eos)
        docs = int(np.count_nonzero(ctx == 0))  # each document starts with no context of its own
        by_source[source_of(row["doc_id"])].append((ctx, docs, ctx_len - len(ctx)))
    out = {s: summarise(rows, ctx_len) for s, rows in sorted(by_source.items())}
    out["all"] = summarise([r for rows in by_source.values() for r in rows], ctx_len)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="preprocessed directories (with manifest.json)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    figures = {str(d): block_context(d) for d in a.dirs}
    for d, table in figures.items():
        print(d)
        for source, f in table.items():
            print(f"  {source:>20}: " + ", ".join(f"{k} {v}" for k, v in f.items()))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
