"""The manifest of a preprocessed directory and the directory itself.

``manifest.json`` is written last: it records the settings, the tokenizer, the counts and the
shards, and its config hash says whether a later run may reuse the directory. Output is written
into a staging directory and renamed into place, so a directory without a complete manifest is
never reused. `output_dir_lock` lets concurrent runs that want one directory build it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from linearard_ray.config import DataConfig
from linearard_ray.data.blocks import TokenSpec, layout_name, vocab_hash
from linearard_ray.data.sources import DataError
from linearard_ray.paths import output_path

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "check_output_dir",
    "complete_manifest",
    "config_payload",
    "default_output_dir",
    "format_report",
    "hash_payload",
    "output_dir_lock",
    "read_manifest",
    "staged_output",
    "tokenizer_info",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Fields of DataConfig that change what is written (the rest: where it goes, how fast).
_OUTPUT_FIELDS = (
    "sources",
    "format",
    "text_column",
    "encoding",
    "encoding_errors",
    "ctx_len",
    "pack",
    "tail",
    "min_doc_tokens",
    "add_bos",
    "add_eos",
    "shuffle",
    "seed",
    "rows_per_shard",
)


# --------------------------------------------------------------------------- config hash


def tokenizer_info(tok, tokenizer_path: str | Path, spec: TokenSpec) -> dict:
    """The manifest's record of the tokenizer and the special tokens framing each document."""
    return {
        "path": str(tokenizer_path),
        "name": getattr(tok, "name_or_path", str(tokenizer_path)),
        "class": type(tok).__name__,
        "vocab_size": len(tok.get_vocab()),
        "vocab_hash": vocab_hash(tok),
        "bos_id": spec.bos_id,
        "eos_id": spec.eos_id,
        "pad_id": spec.pad_id,
        "add_bos": spec.add_bos,
        "add_eos": spec.add_eos,
    }


def config_payload(data_cfg: DataConfig, tok_info: dict, items_fp: str) -> dict:
    """What decides the output: the data settings that change it, the tokenizer's vocabulary and
    special tokens, and the fingerprint `items_fp` of the resolved inputs."""
    return {
        "format_version": FORMAT_VERSION,
        "data": {k: getattr(data_cfg, k) for k in _OUTPUT_FIELDS},
        "tokenizer": {k: tok_info[k] for k in ("vocab_hash", "add_bos", "add_eos", "bos_id", "eos_id", "pad_id")},
        "inputs": items_fp,
    }


def hash_payload(payload: dict) -> str:
    """sha256 of the payload's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- manifest


def complete_manifest(
    counts: dict, data_cfg: DataConfig, n_inputs: int, config_hash: str, tok_info: dict, wall_time_s: float
) -> dict:
    """The manifest as written: the settings and the tokenizer first, then the `counts` of the
    run (documents, tokens, blocks, shards, skips), then its speed."""
    wall = round(wall_time_s, 3)
    head = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "config_hash": config_hash,
        "sources": list(data_cfg.sources),
        "input_files": n_inputs,
        "format": data_cfg.format,
        "text_column": data_cfg.text_column,
        "encoding": data_cfg.encoding,
        "encoding_errors": data_cfg.encoding_errors,
        "ctx_len": data_cfg.ctx_len,
        "pack": data_cfg.pack,
        "tail": data_cfg.tail,
        "min_doc_tokens": data_cfg.min_doc_tokens,
        "shuffle": data_cfg.shuffle,
        "seed": data_cfg.seed,
        "rows_per_shard": data_cfg.rows_per_shard,
        "tokenizer": tok_info,
    }
    speed = {"wall_time_s": wall, "tokens_per_s": round(counts["tokens"] / max(wall, 1e-9), 1)}
    return {**head, **counts, **speed}


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(path: str | Path) -> dict:
    """The manifest of a preprocessed directory; DataError when missing or incomplete."""
    p = Path(path)
    m = p / MANIFEST
    if not m.is_file():
        raise DataError(f"{str(p)!r} has no {MANIFEST}: run pipelines/preprocess.py to create it")
    try:
        manifest = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{m}: not valid JSON ({e.msg}); preprocess again") from None
    if not manifest.get("complete"):
        raise DataError(f"{m}: preprocessing did not finish; preprocess again")
    return manifest


def format_report(manifest: dict, out: str | Path | None = None, max_skips: int = 10) -> str:
    """A human summary of a manifest: what was read, kept, skipped and why, and where it went."""
    m = manifest
    tok = m["tokenizer"]
    layout = layout_name(m["pack"])
    tail = "" if m["pack"] == "best_fit" else f", tail={m['tail']}"  # best fit pads, never drops
    lines = [f"preprocessed data: {out}"] if out is not None else []
    lines += [
        f"  sources: {', '.join(m['sources'])} ({m['input_files']} input files)",
        f"  tokenizer: {tok['name']} (vocab {tok['vocab_size']}, bos={tok['add_bos']}, eos={tok['add_eos']})",
        f"  documents: {m['docs_read']} read, {m['docs_used']} used, {m['docs_skipped']} skipped",
        f"  tokens: {m['tokens']} in used documents, {m['tokens_in_blocks']} in blocks, "
        f"{m['tokens_dropped']} dropped (tail), {m['pad_tokens']} padding",
        f"  blocks: {m['blocks']} x {m['ctx_len']} tokens ({layout}{tail}) in {len(m['shards'])} shard(s)",
        f"  wall time: {m['wall_time_s']:.1f} s ({m['tokens_per_s']:.0f} tokens/s)",
    ]
    if m.get("chars_replaced"):
        lines.append(
            f"  decoding: {m['chars_replaced']} undecodable characters replaced with U+FFFD in "
            f"{m['docs_replaced']} used documents (encoding={m['encoding']})"
        )
    if m.get("docs_split"):
        lines.append(
            f"  split: {m['docs_split']} documents no longer than a block run across two blocks "
            "(data.pack: best_fit keeps each whole)"
        )
    if m["docs_skipped"]:
        lines += _skip_report(m, max_skips)
    return "\n".join(lines)


def _skip_report(m: dict, max_skips: int) -> list[str]:
    lines = ["  skipped by reason: " + ", ".join(f"{k}={v}" for k, v in m["skipped_by_reason"].items())]
    for s in m["skipped"][:max_skips]:
        lines.append(f"    - {s['doc_id']}: {s['detail']}" + (f" ({s['docs']} documents)" if "docs" in s else ""))
    more = m["docs_skipped"] - sum(s.get("docs", 1) for s in m["skipped"][:max_skips])
    if more > 0:
        lines.append(f"    … and {more} more (see manifest.json)")
    return lines


# --------------------------------------------------------------------------- output directory


def default_output_dir(h: str) -> Path:
    """outputs/data/<the config hash's first 12 hex digits>, under the output base
    (linearard_ray.paths)."""
    return Path(output_path(Path("outputs") / "data" / h[:12]))


def _our_file(name: str) -> bool:
    return name == MANIFEST or (name.startswith("shard-") and name.endswith(".parquet"))


def check_output_dir(out: Path) -> None:
    """DataError unless `out` is a local path that is missing, empty, or an earlier output."""
    if "://" in str(out) or str(out).startswith(("s3:", "gs:")):
        raise DataError(
            f"data.output_dir {str(out)!r}: write to a local or shared-filesystem directory "
            "(object-store output is not supported)"
        )
    if out.exists():
        if not out.is_dir():
            raise DataError(f"data.output_dir {str(out)!r} is a file, not a directory")
        stray = sorted(p.name for p in out.iterdir() if not _our_file(p.name))
        if stray:
            raise DataError(
                f"data.output_dir {str(out)!r} holds other files ({', '.join(stray[:5])}); "
                "choose an empty or a previous preprocess directory"
            )


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        for p in out.iterdir():
            if _our_file(p.name):
                p.unlink()
        out.rmdir()
    staging.rename(out)


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside `out`; on success it replaces `out`, on any error
    (interrupts included) it is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def output_dir_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `.<name>.lock` beside `out`, held for the block. A second holder, in this
    process or another, waits without a time limit; the lock goes with the process that held it, so
    a run killed while building never blocks the next one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        yield
