"""Ray Data preprocessing: raw text -> parquet shards of token blocks + manifest.json.

Pipeline: the driver resolves the sources (failing early on one that does not exist), Ray read
tasks open one input file each and emit its documents (bad ones as skip records), an actor pool
tokenizes them and cuts per-document blocks (see `dataset` and `tokenization`), and the driver
streams the result in a fixed order (Ray's ``preserve_order``), packs across documents when asked,
and writes shards (through a seeded bucket shuffle, see `shards`). Nothing holds the corpus: the
driver sees one Ray block at a time, and the shuffle spills to disk.

Output directory: ``shard-NNNNN.parquet`` (columns ``input_ids`` list<int32>, ``attention_mask``
list<int8>, ``doc_id`` string, ``block_index`` int32) and ``manifest.json``, written last; a
directory without a complete manifest is never reused (see `manifest`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from linearard_ray.config import Config, DataConfig
from linearard_ray.data.blocks import BestFitPacker, Packer, TokenSpec, resolve_token_spec, vocab_hash
from linearard_ray.data.dataset import build_dataset, data_context
from linearard_ray.data.manifest import (
    MANIFEST,
    check_output_dir,
    complete_manifest,
    config_payload,
    default_output_dir,
    format_report,
    hash_payload,
    output_dir_lock,
    read_manifest,
    staged_output,
    tokenizer_info,
    write_manifest,
)
from linearard_ray.data.shards import ShardWriter, Shuffler, table_of_blocks
from linearard_ray.data.sources import SKIP_REASONS, DataError, InputFile, fingerprint, resolve_sources
from linearard_ray.data.tokenization import (
    KIND_BLOCK,
    KIND_DOC,
    KIND_SKIP,
    lazy_load_tokenizer,
    plain_backend,
    tokenizer_payload,
)
from linearard_ray.logs import get_logger
from linearard_ray.paths import output_path
from linearard_ray.ray_env import ensure_ray

if TYPE_CHECKING:
    import ray.data

log = get_logger(__name__)

MAX_LISTED_SKIPS = 10_000
_SPILL_BUCKET_BYTES = 64 << 20

__all__ = [
    "MANIFEST",
    "DataError",
    "config_hash",
    "ensure_preprocessed",
    "format_report",
    "lm_data_config",
    "load_blocks",
    "preprocess",
    "read_manifest",
    "tokenizer_path_for",
]


# --------------------------------------------------------------------------- bookkeeping


class _Stats:
    """What the driver has seen so far: documents used and skipped (with why), tokens, blocks."""

    def __init__(self) -> None:
        self.docs_used = 0
        self.docs_skipped = 0
        self.by_reason: dict[str, int] = {}
        self.skipped: list[dict] = []
        self.tokens = 0
        self.dropped = 0
        self.blocks = 0
        self.real_tokens = 0
        self.docs_replaced = 0  # used documents with characters decoded as U+FFFD
        self.chars_replaced = 0
        self.docs_split = 0  # packed: documents no longer than a block that run across two

    def count_replaced(self, replaced: np.ndarray) -> None:
        self.docs_replaced += int((replaced > 0).sum())
        self.chars_replaced += int(replaced.sum())

    @property
    def docs_read(self) -> int:
        return self.docs_used + self.docs_skipped

    def skip(self, doc_id: str, reason: str, detail: str, n_docs: int = 1) -> None:
        self.docs_skipped += n_docs
        self.by_reason[reason] = self.by_reason.get(reason, 0) + n_docs
        if len(self.skipped) < MAX_LISTED_SKIPS:
            entry = {"doc_id": doc_id, "reason": reason, "detail": detail}
            if n_docs != 1:
                entry["docs"] = n_docs
            self.skipped.append(entry)

    def count_blocks(self, table: pa.Table) -> None:
        self.blocks += table.num_rows
        if table.num_rows:
            self.real_tokens += int(
                np.asarray(table.column("attention_mask").combine_chunks().values).sum(dtype=np.int64)
            )

    def counts(self, shards: list[dict], ctx_len: int) -> dict:
        """The manifest's counts of the run, after the shards are written."""
        return {
            "docs_read": self.docs_read,
            "docs_used": self.docs_used,
            "docs_skipped": self.docs_skipped,
            "skipped_by_reason": dict(sorted(self.by_reason.items())),
            "tokens": self.tokens,
            "tokens_in_blocks": self.real_tokens,
            "tokens_dropped": self.dropped,
            "pad_tokens": self.blocks * ctx_len - self.real_tokens,
            "blocks": self.blocks,
            "block_tokens": self.blocks * ctx_len,
            "shards": shards,
            "skipped": self.skipped,
            "skipped_listed": len(self.skipped),
            "docs_replaced": self.docs_replaced,
            "chars_replaced": self.chars_replaced,
            "docs_split": self.docs_split,
        }


class _Progress:
    """A tqdm bar on a terminal; elsewhere (job logs) a line every `every` seconds."""

    def __init__(self, enabled: bool, every: float = 10.0):
        self.enabled, self.every = enabled, every
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, unit="doc", desc="preprocess", file=sys.stderr)

    def update(self, docs: int, blocks: int, tokens: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(docs - self.bar.n)
            self.bar.set_postfix(blocks=blocks, tokens=tokens, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info(
                f"preprocess: so far {docs} documents, {blocks} blocks, {tokens} tokens "
                f"({tokens / (now - self.t0):.0f} tokens/s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- config hash


def _prepare(data_cfg: DataConfig, tokenizer_path: str | Path):
    """The resolved inputs, the tokenizer, its TokenSpec, its manifest record and the config hash."""
    items = resolve_sources(list(data_cfg.sources), data_cfg.format)
    tok = lazy_load_tokenizer(tokenizer_path)
    try:
        spec = resolve_token_spec(tok, data_cfg.add_bos, data_cfg.add_eos, data_cfg.pack)
    except ValueError as e:
        raise DataError(str(e)) from None
    info = tokenizer_info(tok, tokenizer_path, spec)
    return items, tok, spec, info, hash_payload(config_payload(data_cfg, info, fingerprint(items)))


def config_hash(data_cfg: DataConfig, tokenizer_path: str | Path) -> str:
    """sha256 over what decides the output: the data settings, the tokenizer's vocabulary and
    special tokens, and the resolved inputs (names, sizes, modification times)."""
    return _prepare(data_cfg, tokenizer_path)[-1]


# --------------------------------------------------------------------------- preprocessing


def preprocess(data_cfg: DataConfig, tokenizer_path: str | Path, *, progress: bool = True) -> Path:
    """Tokenize `data_cfg.sources` with the tokenizer at `tokenizer_path` into token blocks.

    Writes parquet shards and manifest.json into `data_cfg.output_dir` (default
    outputs/data/<config hash>) and returns that directory. Raises DataError for a source that does
    not exist (before any work), a bad tokenizer, or a corpus that yields no block.
    """
    t0 = time.perf_counter()
    items, tok, spec, tok_info, h = _prepare(data_cfg, tokenizer_path)
    out = Path(output_path(data_cfg.output_dir)) if data_cfg.output_dir else default_output_dir(h)
    check_output_dir(out)
    with staged_output(out) as staging:
        payload = tokenizer_payload(plain_backend(tok), tokenizer_path)
        counts = _run(items, data_cfg, payload, spec, staging, progress)
        manifest = complete_manifest(counts, data_cfg, len(items), h, tok_info, time.perf_counter() - t0)
        write_manifest(staging, manifest)
    manifest = read_manifest(out)
    log.debug("%s", format_report(manifest, out))  # the callers report it in their own words
    if manifest["chars_replaced"]:
        log.warning(
            "preprocess replaced %d undecodable characters with U+FFFD in %d documents (data.encoding=%s)",
            manifest["chars_replaced"],
            manifest["docs_replaced"],
            data_cfg.encoding,
        )
    if manifest["docs_skipped"]:
        log.warning(
            "preprocess skipped %d of %d documents (%s); the list is in %s",
            manifest["docs_skipped"],
            manifest["docs_read"],
            ", ".join(f"{k}: {v}" for k, v in manifest["skipped_by_reason"].items()),
            out / MANIFEST,
        )
    return out


def _run(
    items: list[InputFile], data_cfg: DataConfig, tokenizer: dict, spec: TokenSpec, staging: Path, progress: bool
) -> dict:
    """Tokenize, cut, shuffle and write the shards of `items` into `staging`; the manifest's counts."""
    stats = _Stats()
    readable = _readable(items, stats)
    writer = ShardWriter(staging, data_cfg.rows_per_shard, data_cfg.ctx_len)
    shuffler = None
    if data_cfg.shuffle:
        known = sum(max(it.size, 0) for it in readable)
        shuffler = Shuffler(staging / "_spill", data_cfg.seed, max(1, -(-known // _SPILL_BUCKET_BYTES)))
    sink = shuffler.add if shuffler else writer.write

    def put(table: pa.Table) -> None:
        stats.count_blocks(table)
        sink(table)

    _stream_blocks(readable, data_cfg, tokenizer, spec, stats, put, progress)
    if stats.blocks == 0:
        if shuffler:
            list(shuffler.sorted_tables())  # draining it removes its spill files
        raise _no_block_error(stats, data_cfg)
    if shuffler:
        for t in shuffler.sorted_tables():
            writer.write(t)
    return stats.counts(writer.close(), data_cfg.ctx_len)


def _readable(items: list[InputFile], stats: _Stats) -> list[InputFile]:
    """The input files to read; the others are counted as skipped."""
    readable = []
    for it in items:
        if it.fmt == "skip":
            stats.skip(it.uri, it.skip_reason, SKIP_REASONS[it.skip_reason])
        else:
            readable.append(it)
    return readable


def _packer(data_cfg: DataConfig, spec: TokenSpec) -> Packer | BestFitPacker | None:
    """What joins documents into blocks on the driver (None: the actors cut per document)."""
    if data_cfg.pack == "best_fit":
        return BestFitPacker(data_cfg.ctx_len, spec.pad_id)
    return Packer(data_cfg.ctx_len, data_cfg.tail, spec.pad_id) if data_cfg.pack else None


def _stream_blocks(
    readable: list[InputFile],
    data_cfg: DataConfig,
    tokenizer: dict,
    spec: TokenSpec,
    stats: _Stats,
    put: Callable[[pa.Table], None],
    progress: bool,
) -> None:
    """Run the Ray Data pipeline over `readable` and hand every block table, in order, to `put`."""
    packer = _packer(data_cfg, spec)
    if readable:
        ensure_ray()
    bar = _Progress(progress)
    try:
        if readable:
            with data_context(progress):
                ds = build_dataset(readable, data_cfg, tokenizer, spec)
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    _consume(batch, stats, packer, put)
                    bar.update(stats.docs_read, stats.blocks, stats.tokens)
        if packer is not None:
            last, dropped = packer.finish()
            stats.dropped += dropped
            stats.docs_split = packer.docs_split
            if last:
                put(table_of_blocks(last))
    finally:
        bar.close()


# What to change for each reason documents were skipped, when none gave a block.
_NO_BLOCK_ADVICE = {
    "missing_text_column": "set data.text_column to the column that holds the text",
    "not_text": "set data.text_column to a column of strings",
    "undecodable": "set data.encoding to the files' encoding, or data.encoding_errors=replace",
    "too_short": "lower data.min_doc_tokens, or add data",
    "no_full_block": "lower data.ctx_len or set data.tail=pad, or add data",
}


def _no_block_error(stats: _Stats, data_cfg: DataConfig) -> DataError:
    """Why no block came out: the counts, an example of each skip reason (the file, and for a
    missing text column the columns it has) and what to change."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.by_reason.items())) or "no documents"
    examples = {}
    for s in stats.skipped:
        examples.setdefault(s["reason"], f"{s['doc_id']}: {s['detail']}")
    advice = [_NO_BLOCK_ADVICE[r] for r in sorted(stats.by_reason) if r in _NO_BLOCK_ADVICE]
    if not advice:
        advice = ["add data, or lower data.ctx_len / data.min_doc_tokens, or set data.tail=pad"]
    return DataError(
        f"no usable block from data.sources={list(data_cfg.sources)}: {stats.docs_read} "
        f"documents read, {stats.docs_skipped} skipped ({reasons}), {stats.tokens} tokens kept "
        f"(ctx_len={data_cfg.ctx_len}, min_doc_tokens={data_cfg.min_doc_tokens}, tail={data_cfg.tail})"
        + "".join(f"\n  e.g. {e}" for e in examples.values())
        + "\n"
        + "; ".join(advice)
    )


def _consume(
    batch: pa.Table, stats: _Stats, packer: Packer | BestFitPacker | None, put: Callable[[pa.Table], None]
) -> None:
    """Count one table of the actors' stream and pass its blocks on (through the packer when packing)."""
    kind = batch.column("kind").to_numpy()
    for i in np.flatnonzero(kind == KIND_SKIP):
        stats.skip(
            batch.column("doc_id")[i].as_py(),
            batch.column("reason")[i].as_py(),
            batch.column("detail")[i].as_py(),
            batch.column("n_docs")[i].as_py(),
        )
    if packer is None:
        _consume_blocks(batch.filter(pa.array(kind == KIND_BLOCK)), stats, put)
    else:
        _consume_documents(batch.filter(pa.array(kind == KIND_DOC)), stats, packer, put)


def _consume_blocks(blocks: pa.Table, stats: _Stats, put: Callable[[pa.Table], None]) -> None:
    if blocks.num_rows == 0:
        return
    first = blocks.column("block_index").to_numpy() == 0
    stats.docs_used += int(first.sum())
    stats.count_replaced(blocks.column("replaced").to_numpy())
    stats.tokens += int(blocks.column("n_tokens").to_numpy().sum())
    stats.dropped += int(blocks.column("dropped").to_numpy().sum())
    put(blocks.select(["input_ids", "attention_mask", "doc_id", "block_index"]))


def _consume_documents(
    docs: pa.Table, stats: _Stats, packer: Packer | BestFitPacker, put: Callable[[pa.Table], None]
) -> None:
    if docs.num_rows == 0:
        return
    stats.count_replaced(docs.column("replaced").to_numpy())
    lists = docs.column("input_ids").combine_chunks()
    offsets = np.asarray(lists.offsets)
    values = np.asarray(lists.values)
    out = []
    for j, doc_id in enumerate(docs.column("doc_id").to_pylist()):
        ids = values[offsets[j] : offsets[j + 1]]
        stats.docs_used += 1
        stats.tokens += len(ids)
        out.extend(packer.add(doc_id, ids))
    if out:
        put(table_of_blocks(out))


# --------------------------------------------------------------------------- reading and reuse


def load_blocks(path: str | Path) -> ray.data.Dataset:
    """The token blocks of a preprocessed directory as a Ray Dataset, in shard order (rows in the
    order they were written)."""
    import ray.data

    p = Path(path)
    manifest = read_manifest(p)
    files = [str((p / s["file"]).resolve()) for s in manifest["shards"]]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DataError(f"{str(p)!r}: shard files listed in the manifest are missing: {missing[:3]}")
    ensure_ray()
    ds = ray.data.read_parquet(files, columns=["input_ids", "attention_mask", "doc_id", "block_index"])
    # The shards' order is the seeded shuffle; keep it, so every reader sees the same stream.
    ds.context.execution_options.preserve_order = True
    return ds


def lm_data_config(data_cfg: DataConfig) -> DataConfig:
    """The data settings of the next-token term's stream: its own sources and block length
    (data.lm_sources, data.lm_ctx_len), everything else as the main stream."""
    return data_cfg.model_copy(
        update={
            "sources": list(data_cfg.lm_sources or data_cfg.sources),
            "ctx_len": data_cfg.lm_ctx_len or data_cfg.ctx_len,
            "lm_sources": None,
            "lm_ctx_len": None,
            "preprocessed": None,
            "output_dir": None,
        }
    )


def tokenizer_path_for(model: str) -> str:
    """Where the teacher's tokenizer lives (a directory or a hub id)."""
    from linearard_ray.models.loading import resolve_model

    resolved = resolve_model(model)
    return str(getattr(resolved, "path", resolved))


def _check_preprocessed(path: str, data_cfg: DataConfig, tokenizer_path: str) -> Path:
    manifest = read_manifest(path)
    tok = lazy_load_tokenizer(tokenizer_path)
    if manifest["tokenizer"]["vocab_hash"] != vocab_hash(tok):
        raise DataError(
            f"data.preprocessed={path!r} was tokenized with {manifest['tokenizer']['name']!r}, "
            f"whose vocabulary differs from the teacher's tokenizer ({tokenizer_path})"
        )
    if manifest["ctx_len"] != data_cfg.ctx_len:
        log.warning(
            "data.preprocessed=%s holds blocks of %d tokens; data.ctx_len=%d is ignored",
            path,
            manifest["ctx_len"],
            data_cfg.ctx_len,
        )
    return Path(path)


def _same_blocks(cfg: Config, stream: str) -> bool:
    """Whether ``stream`` reads the main stream's blocks (the main one, or an lm stream with no
    data settings of its own)."""
    return stream == "main" or not cfg.data.lm_data_differs()


def stream_target(cfg: Config, stream: str, tok_path: str) -> tuple[DataConfig, Path, str]:
    """(data settings, directory, config hash) of the blocks ``stream`` is built into: the given
    ``data.output_dir`` (``-lm`` beside it for an lm stream of its own), else a directory named
    by the hash. ``data.preprocessed`` is the caller's case."""
    data_cfg = cfg.data if stream == "main" else lm_data_config(cfg.data)
    h = config_hash(data_cfg, tok_path)
    if not cfg.data.output_dir:
        return data_cfg, default_output_dir(h), h
    out = Path(output_path(cfg.data.output_dir))
    if not _same_blocks(cfg, stream):
        out = out.with_name(out.name + "-lm")
    return data_cfg, out, h


def ensure_preprocessed(
    cfg: Config, stream: Literal["main", "lm"] = "main", *, progress: bool = True, force: bool = False
) -> Path:
    """A preprocessed directory for the run: `cfg.data.preprocessed` when set, else one made
    (or reused, when its complete manifest has the same config hash) with the teacher's tokenizer.

    stream='lm' gives the next-token term's blocks (data.lm_sources / data.lm_ctx_len); when those
    are unset it is the main stream's directory. force=True preprocesses again instead of reusing.
    """
    if stream not in ("main", "lm"):
        raise ValueError(f"stream must be 'main' or 'lm', got {stream!r}")
    tok_path = tokenizer_path_for(cfg.model.teacher)
    if cfg.data.preprocessed and _same_blocks(cfg, stream):
        return _check_preprocessed(cfg.data.preprocessed, cfg.data, tok_path)
    data_cfg, out, h = stream_target(cfg, stream, tok_path)
    # Concurrent runs (tune trials) wanting the same directory: one builds it, the others reuse it.
    with output_dir_lock(out):
        try:
            if not force and read_manifest(out).get("config_hash") == h:
                log.info("reusing preprocessed data in %s", out)
                return out
        except DataError:
            pass
        return preprocess(data_cfg.model_copy(update={"output_dir": str(out)}), tok_path, progress=progress)
