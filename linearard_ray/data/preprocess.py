"""Ray Data preprocessing: raw text -> parquet shards of token blocks + manifest.json.

Pipeline: the driver resolves the sources (failing early on one that does not exist), Ray read
tasks open one input file each and emit its documents (bad ones as skip records), an actor pool
tokenizes them and cuts per-document blocks, and the driver streams the result in a fixed order
(Ray's ``preserve_order``), packs across documents when asked, and writes shards (through a
seeded bucket shuffle, see `shards`). Nothing holds the corpus: the driver sees one Ray block at a
time, and the shuffle spills to disk.

Output directory: ``shard-NNNNN.parquet`` (columns ``input_ids`` list<int32>, ``attention_mask``
list<int8>, ``doc_id`` string, ``block_index`` int32) and ``manifest.json``, written last; a
directory without a complete manifest is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from linearard_ray.config import Config, DataConfig
from linearard_ray.data.blocks import Packer, TokenSpec, cut_document, frame_document, resolve_token_spec, vocab_hash
from linearard_ray.data.shards import ShardWriter, Shuffler, blocks_table
from linearard_ray.data.sources import SKIP_REASONS, DataError, InputFile, fingerprint, iter_documents, resolve_sources
from linearard_ray.ray_env import ensure_ray

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_LISTED_SKIPS = 10_000
# Fields of DataConfig that change what is written (the rest: where it goes, how fast).
_OUTPUT_FIELDS = (
    "sources",
    "format",
    "text_column",
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
_READ_BATCH_DOCS = 64
_READ_BATCH_BYTES = 16 << 20
_SPILL_BUCKET_BYTES = 64 << 20
# Read tasks are light (I/O, JSON); a CPU share unlike the actors' keeps Ray from fusing reading
# into the tokenizer actors, so the pool balances batches of documents, not whole files.
_READ_CPUS = 0.25

__all__ = [
    "DataError",
    "preprocess",
    "read_manifest",
    "load_blocks",
    "ensure_preprocessed",
    "lm_data_config",
    "config_hash",
    "encode_texts",
    "format_report",
]

# One table schema flows from the actors to the driver: blocks, skipped documents, and (when
# packing) whole tokenized documents, told apart by `kind`.
KIND_BLOCK, KIND_SKIP, KIND_DOC = 0, 1, 2
_STREAM_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.int8()),
        pa.field("doc_id", pa.string()),
        pa.field("block_index", pa.int32()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("attention_mask", pa.list_(pa.int8())),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("n_docs", pa.int64()),
        pa.field("n_tokens", pa.int64()),  # the document's tokens with BOS/EOS (block 0 / doc rows)
        pa.field("dropped", pa.int64()),  # its tail tokens dropped (block 0 rows)
    ]
)
_READ_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("text", pa.large_string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("n_docs", pa.int64()),
    ]
)


# --------------------------------------------------------------------------- tokenizer


def _load_tokenizer(path: str | Path):
    # Imported here, not at the top: Ray Data's tokenizer actors import this module and should
    # not pay for torch.
    from linearard_ray.models.loading import load_tokenizer

    return load_tokenizer(path)


def encode_texts(tok, texts: list[str]) -> list[np.ndarray]:
    """Content token ids (no special tokens) of each text, batched through the fast tokenizer
    (a transformers tokenizer, or its `tokenizers.Tokenizer` backend itself)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and hasattr(tok, "encode_batch"):
        backend = tok
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


def _plain_backend(tok):
    # Truncation or padding saved in tokenizer.json would silently shorten documents.
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return tok


# --------------------------------------------------------------------------- Ray stages


def _read_files(batch: dict[str, np.ndarray], items: list[InputFile], text_column: str) -> Iterator[pa.Table]:
    """Read task: the documents of the input files whose indices are in the batch."""
    rows: dict[str, list] = {k: [] for k in _READ_SCHEMA.names}
    size = 0
    for i in batch["id"]:
        for doc in iter_documents(items[int(i)], text_column):
            rows["doc_id"].append(doc.doc_id)
            rows["text"].append(doc.text)
            rows["reason"].append(doc.reason)
            rows["detail"].append(doc.detail)
            rows["n_docs"].append(doc.n_docs)
            size += len(doc.text or "")
            if len(rows["doc_id"]) >= _READ_BATCH_DOCS or size >= _READ_BATCH_BYTES:
                yield pa.table(rows, schema=_READ_SCHEMA)
                rows = {k: [] for k in _READ_SCHEMA.names}
                size = 0
    if rows["doc_id"]:
        yield pa.table(rows, schema=_READ_SCHEMA)


def _list_array(arrays: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def tokenizer_payload(tok, tokenizer_path: str | Path) -> dict:
    """What an actor needs to rebuild the driver's tokenizer: the fast backend serialised (so
    actors import neither transformers nor torch, and need no access to the tokenizer's
    directory), or else the path for a slow tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return {"json": backend.to_str()}
    return {"path": str(tokenizer_path)}


def _tokenizer_from_payload(payload: dict):
    if "json" in payload:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(payload["json"])
    return _load_tokenizer(payload["path"])


class TokenizeCut:
    """Actor: tokenize a batch of documents, drop the too-short ones, cut blocks (or, when
    packing, pass the framed documents on to the driver's packer)."""

    def __init__(self, tokenizer: dict, spec: dict, ctx_len: int, tail: str, min_doc_tokens: int, pack: bool):
        self.tok = _tokenizer_from_payload(tokenizer)
        self.spec = TokenSpec(**spec)
        self.ctx_len, self.tail, self.min_doc_tokens, self.pack = ctx_len, tail, min_doc_tokens, pack

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {k: [] for k in _STREAM_SCHEMA.names}
        ids_col: list[np.ndarray] = []
        mask_col: list[np.ndarray] = []

        def emit(kind, doc_id, bidx, ids, mask, reason="", detail="", n_docs=1, n_tokens=0, dropped=0):
            for k, v in (
                ("kind", kind),
                ("doc_id", doc_id),
                ("block_index", bidx),
                ("reason", reason),
                ("detail", detail),
                ("n_docs", n_docs),
                ("n_tokens", n_tokens),
                ("dropped", dropped),
            ):
                out[k].append(v)
            ids_col.append(ids)
            mask_col.append(mask)

        empty_i32, empty_i8 = np.zeros(0, np.int32), np.zeros(0, np.int8)
        doc_ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        reasons = batch.column("reason").to_pylist()
        details = batch.column("detail").to_pylist()
        n_docs = batch.column("n_docs").to_pylist()
        good = [i for i, r in enumerate(reasons) if not r]
        encoded = dict(zip(good, encode_texts(self.tok, [texts[i] for i in good]), strict=False)) if good else {}
        for i, doc_id in enumerate(doc_ids):
            if reasons[i]:
                emit(KIND_SKIP, doc_id, 0, empty_i32, empty_i8, reasons[i], details[i], n_docs[i])
                continue
            content = encoded[i]
            if len(content) < self.min_doc_tokens:
                emit(
                    KIND_SKIP,
                    doc_id,
                    0,
                    empty_i32,
                    empty_i8,
                    "too_short",
                    f"{len(content)} tokens < data.min_doc_tokens={self.min_doc_tokens}",
                )
                continue
            ids = frame_document(content, self.spec)
            if self.pack:
                emit(KIND_DOC, doc_id, 0, ids, empty_i8, n_tokens=len(ids))
                continue
            blocks, dropped = cut_document(ids, doc_id, self.ctx_len, self.tail, self.spec.pad_id)
            if not blocks:
                emit(
                    KIND_SKIP,
                    doc_id,
                    0,
                    empty_i32,
                    empty_i8,
                    "no_full_block",
                    f"{len(ids)} tokens < data.ctx_len={self.ctx_len} with data.tail=drop",
                )
                continue
            for b in blocks:
                first = b.block_index == 0
                emit(
                    KIND_BLOCK,
                    doc_id,
                    b.block_index,
                    b.input_ids,
                    b.attention_mask,
                    n_tokens=len(ids) if first else 0,
                    dropped=dropped if first else 0,
                )
        cols = {
            k: pa.array(v, type=_STREAM_SCHEMA.field(k).type)
            for k, v in out.items()
            if k not in ("input_ids", "attention_mask")
        }
        cols["input_ids"] = _list_array(ids_col, np.int32)
        cols["attention_mask"] = _list_array(mask_col, np.int8)
        return pa.table([cols[n] for n in _STREAM_SCHEMA.names], schema=_STREAM_SCHEMA)


def _actor_cpus(n_actors: int) -> float:
    """CPUs per tokenizer actor: at most 1, leaving one CPU for the read tasks (on a 2-core
    machine a pool that takes every CPU starves the reads)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.25, min(1.0, (total - 1.0) / n_actors)) if total > 1 else 0.5


@contextmanager
def _data_context(progress: bool):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True  # the output order is part of the result
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _build_dataset(items: list[InputFile], data_cfg: DataConfig, tokenizer: dict, spec: TokenSpec) -> ray.data.Dataset:
    import ray.data
    from ray.data import ActorPoolStrategy

    ds = ray.data.range(len(items), override_num_blocks=len(items))
    n = data_cfg.tokenizer_actors
    actor_cpus = _actor_cpus(n)
    read_cpus = _READ_CPUS if actor_cpus != _READ_CPUS else _READ_CPUS * 0.8
    ds = ds.map_batches(
        _read_files,
        batch_size=1,
        batch_format="numpy",
        num_cpus=read_cpus,
        fn_kwargs={"items": items, "text_column": data_cfg.text_column},
    )
    return ds.map_batches(
        TokenizeCut,
        batch_size=data_cfg.tokenizer_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=n),
        num_cpus=actor_cpus,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "spec": spec.to_dict(),
            "ctx_len": data_cfg.ctx_len,
            "tail": data_cfg.tail,
            "min_doc_tokens": data_cfg.min_doc_tokens,
            "pack": data_cfg.pack,
        },
    )


# --------------------------------------------------------------------------- bookkeeping


class _Stats:
    def __init__(self) -> None:
        self.docs_used = 0
        self.docs_skipped = 0
        self.by_reason: dict[str, int] = {}
        self.skipped: list[dict] = []
        self.tokens = 0
        self.dropped = 0
        self.blocks = 0
        self.real_tokens = 0

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


def _config_payload(data_cfg: DataConfig, tok_info: dict, items_fp: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "data": {k: getattr(data_cfg, k) for k in _OUTPUT_FIELDS},
        "tokenizer": {k: tok_info[k] for k in ("vocab_hash", "add_bos", "add_eos", "bos_id", "eos_id", "pad_id")},
        "inputs": items_fp,
    }


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _tokenizer_info(tok, tokenizer_path: str | Path, spec: TokenSpec) -> dict:
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


def _prepare(data_cfg: DataConfig, tokenizer_path: str | Path):
    items = resolve_sources(list(data_cfg.sources), data_cfg.format)
    tok = _load_tokenizer(tokenizer_path)
    try:
        spec = resolve_token_spec(tok, data_cfg.add_bos, data_cfg.add_eos, data_cfg.pack)
    except ValueError as e:
        raise DataError(str(e)) from None
    info = _tokenizer_info(tok, tokenizer_path, spec)
    return items, tok, spec, info, _hash(_config_payload(data_cfg, info, fingerprint(items)))


def config_hash(data_cfg: DataConfig, tokenizer_path: str | Path) -> str:
    """sha256 over what decides the output: the data settings, the tokenizer's vocabulary and
    special tokens, and the resolved inputs (names, sizes, modification times)."""
    return _prepare(data_cfg, tokenizer_path)[-1]


# --------------------------------------------------------------------------- output directory


def _our_file(name: str) -> bool:
    return name == MANIFEST or (name.startswith("shard-") and name.endswith(".parquet"))


def _check_output_dir(out: Path) -> None:
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


def default_output_dir(h: str) -> Path:
    return Path("outputs") / "data" / h[:12]


# --------------------------------------------------------------------------- public API


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
            print(
                f"preprocess: {docs} documents, {blocks} blocks, {tokens} tokens "
                f"({tokens / (now - self.t0):.0f} tokens/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(data_cfg: DataConfig, tokenizer_path: str | Path, *, progress: bool = True) -> Path:
    """Tokenize `data_cfg.sources` with the tokenizer at `tokenizer_path` into token blocks.

    Writes parquet shards and manifest.json into `data_cfg.output_dir` (default
    outputs/data/<config hash>) and returns that directory. Raises DataError for a source that does
    not exist (before any work), a bad tokenizer, or a corpus that yields no block.
    """
    t0 = time.perf_counter()
    items, tok, spec, tok_info, h = _prepare(data_cfg, tokenizer_path)
    out = Path(data_cfg.output_dir) if data_cfg.output_dir else default_output_dir(h)
    _check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _run(
            items, data_cfg, tokenizer_payload(_plain_backend(tok), tokenizer_path), spec, staging, progress
        )
        manifest.update(
            {
                "format_version": FORMAT_VERSION,
                "config_hash": h,
                "tokenizer": tok_info,
                "wall_time_s": round(time.perf_counter() - t0, 3),
            }
        )
        manifest["tokens_per_s"] = round(manifest["tokens"] / max(manifest["wall_time_s"], 1e-9), 1)
        manifest["complete"] = True
        (staging / MANIFEST).write_text(
            json.dumps(_ordered(manifest, data_cfg, items), indent=2, ensure_ascii=False) + "\n"
        )
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = read_manifest(out)
    log.info("%s", format_report(manifest, out))
    if manifest["docs_skipped"]:
        log.warning(
            "preprocess skipped %d of %d documents (%s); the list is in %s",
            manifest["docs_skipped"],
            manifest["docs_read"],
            ", ".join(f"{k}: {v}" for k, v in manifest["skipped_by_reason"].items()),
            out / MANIFEST,
        )
    return out


def _ordered(m: dict, data_cfg: DataConfig, items: list[InputFile]) -> dict:
    head = {
        "format_version": m["format_version"],
        "complete": m["complete"],
        "config_hash": m["config_hash"],
        "sources": list(data_cfg.sources),
        "input_files": len(items),
        "format": data_cfg.format,
        "text_column": data_cfg.text_column,
        "ctx_len": data_cfg.ctx_len,
        "pack": data_cfg.pack,
        "tail": data_cfg.tail,
        "min_doc_tokens": data_cfg.min_doc_tokens,
        "shuffle": data_cfg.shuffle,
        "seed": data_cfg.seed,
        "rows_per_shard": data_cfg.rows_per_shard,
        "tokenizer": m["tokenizer"],
    }
    rest = {k: v for k, v in m.items() if k not in head}
    return {**head, **rest}


def _run(
    items: list[InputFile], data_cfg: DataConfig, tokenizer: dict, spec: TokenSpec, staging: Path, progress: bool
) -> dict:
    stats = _Stats()
    readable = []
    for it in items:
        if it.fmt == "skip":
            stats.skip(it.uri, it.skip_reason, SKIP_REASONS[it.skip_reason])
        else:
            readable.append(it)

    writer = ShardWriter(staging, data_cfg.rows_per_shard, data_cfg.ctx_len)
    shuffler = None
    if data_cfg.shuffle:
        known = sum(max(it.size, 0) for it in readable)
        shuffler = Shuffler(staging / "_spill", data_cfg.seed, max(1, -(-known // _SPILL_BUCKET_BYTES)))
    sink = shuffler.add if shuffler else writer.write
    packer = Packer(data_cfg.ctx_len, data_cfg.tail, spec.pad_id) if data_cfg.pack else None

    def put(table: pa.Table) -> None:
        stats.count_blocks(table)
        sink(table)

    if readable:
        ensure_ray()
    bar = _Progress(progress)
    try:
        if readable:
            with _data_context(progress):
                ds = _build_dataset(readable, data_cfg, tokenizer, spec)
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    _consume(batch, stats, packer, put)
                    bar.update(stats.docs_used + stats.docs_skipped, stats.blocks, stats.tokens)
        if packer is not None:
            last, dropped = packer.finish()
            stats.dropped += dropped
            if last:
                put(
                    blocks_table(
                        [b.input_ids for b in last],
                        [b.attention_mask for b in last],
                        [b.doc_id for b in last],
                        [b.block_index for b in last],
                    )
                )
    finally:
        bar.close()

    if stats.blocks == 0:
        if shuffler:
            list(shuffler.sorted_tables())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.by_reason.items())) or "no documents"
        raise DataError(
            f"no usable block from data.sources={list(data_cfg.sources)}: {stats.docs_used + stats.docs_skipped} "
            f"documents read, {stats.docs_skipped} skipped ({reasons}), {stats.tokens} tokens kept "
            f"(ctx_len={data_cfg.ctx_len}, min_doc_tokens={data_cfg.min_doc_tokens}, tail={data_cfg.tail}); "
            "add data, or lower data.ctx_len / data.min_doc_tokens, or set data.tail=pad"
        )
    if shuffler:
        for t in shuffler.sorted_tables():
            writer.write(t)
    shards = writer.close()
    return {
        "docs_read": stats.docs_used + stats.docs_skipped,
        "docs_used": stats.docs_used,
        "docs_skipped": stats.docs_skipped,
        "skipped_by_reason": dict(sorted(stats.by_reason.items())),
        "tokens": stats.tokens,
        "tokens_in_blocks": stats.real_tokens,
        "tokens_dropped": stats.dropped,
        "pad_tokens": stats.blocks * data_cfg.ctx_len - stats.real_tokens,
        "blocks": stats.blocks,
        "block_tokens": stats.blocks * data_cfg.ctx_len,
        "shards": shards,
        "skipped": stats.skipped,
        "skipped_listed": len(stats.skipped),
    }


def _consume(batch: pa.Table, stats: _Stats, packer: Packer | None, put) -> None:
    kind = batch.column("kind").to_numpy()
    for i in np.flatnonzero(kind == KIND_SKIP):
        stats.skip(
            batch.column("doc_id")[i].as_py(),
            batch.column("reason")[i].as_py(),
            batch.column("detail")[i].as_py(),
            batch.column("n_docs")[i].as_py(),
        )
    if packer is None:
        blocks = batch.filter(pa.array(kind == KIND_BLOCK))
        if blocks.num_rows == 0:
            return
        first = blocks.column("block_index").to_numpy() == 0
        stats.docs_used += int(first.sum())
        stats.tokens += int(blocks.column("n_tokens").to_numpy().sum())
        stats.dropped += int(blocks.column("dropped").to_numpy().sum())
        put(blocks.select(["input_ids", "attention_mask", "doc_id", "block_index"]))
        return
    docs = batch.filter(pa.array(kind == KIND_DOC))
    if docs.num_rows == 0:
        return
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
        put(
            blocks_table(
                [b.input_ids for b in out],
                [b.attention_mask for b in out],
                [b.doc_id for b in out],
                [b.block_index for b in out],
            )
        )


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
    tok = _load_tokenizer(tokenizer_path)
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
    same = stream == "main" or not cfg.data.lm_data_differs()
    if cfg.data.preprocessed and same:
        return _check_preprocessed(cfg.data.preprocessed, cfg.data, tok_path)
    data_cfg = cfg.data if stream == "main" else lm_data_config(cfg.data)
    h = config_hash(data_cfg, tok_path)
    if cfg.data.output_dir:
        out = Path(cfg.data.output_dir)
        if not same:
            out = out.with_name(out.name + "-lm")
    else:
        out = default_output_dir(h)
    # Concurrent runs (tune trials) wanting the same directory: one builds it, the others reuse it.
    with _dir_lock(out):
        try:
            if not force and read_manifest(out).get("config_hash") == h:
                log.info("reusing preprocessed data in %s", out)
                return out
        except DataError:
            pass
        return preprocess(data_cfg.model_copy(update={"output_dir": str(out)}), tok_path, progress=progress)


@contextmanager
def _dir_lock(out: Path):
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def format_report(manifest: dict, out: str | Path | None = None, max_skips: int = 10) -> str:
    """A human summary of a manifest: what was read, kept, skipped and why, and where it went."""
    m = manifest
    lines = []
    if out is not None:
        lines.append(f"preprocessed data: {out}")
    lines += [
        f"  sources: {', '.join(m['sources'])} ({m['input_files']} input files)",
        f"  tokenizer: {m['tokenizer']['name']} (vocab {m['tokenizer']['vocab_size']}, bos={m['tokenizer']['add_bos']}, eos={m['tokenizer']['add_eos']})",
        f"  documents: {m['docs_read']} read, {m['docs_used']} used, {m['docs_skipped']} skipped",
        f"  tokens: {m['tokens']} in used documents, {m['tokens_in_blocks']} in blocks, {m['tokens_dropped']} dropped (tail), {m['pad_tokens']} padding",
        f"  blocks: {m['blocks']} x {m['ctx_len']} tokens ({'packed' if m['pack'] else 'per document'}, tail={m['tail']}) in {len(m['shards'])} shard(s)",
        f"  wall time: {m['wall_time_s']:.1f} s ({m['tokens_per_s']:.0f} tokens/s)",
    ]
    if m["docs_skipped"]:
        lines.append("  skipped by reason: " + ", ".join(f"{k}={v}" for k, v in m["skipped_by_reason"].items()))
        for s in m["skipped"][:max_skips]:
            lines.append(f"    - {s['doc_id']}: {s['detail']}" + (f" ({s['docs']} documents)" if "docs" in s else ""))
        more = m["docs_skipped"] - sum(s.get("docs", 1) for s in m["skipped"][:max_skips])
        if more > 0:
            lines.append(f"    … and {more} more (see manifest.json)")
    return "\n".join(lines)
