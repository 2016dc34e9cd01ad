"""Tokenisation for preprocessing: encoding texts, shipping the tokenizer to Ray actors, and the
`TokenizeCut` actor that turns a batch of documents into token blocks.

Ray Data's tokenizer actors import this module, so it imports neither torch nor transformers at
the top: a fast tokenizer travels to them serialised (`tokenizer_payload`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from linearard_ray.data.blocks import TokenSpec, cut_document, frame_document

__all__ = [
    "KIND_BLOCK",
    "KIND_DOC",
    "KIND_SKIP",
    "TokenizeCut",
    "encode_texts",
    "lazy_load_tokenizer",
    "plain_backend",
    "tokenizer_payload",
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
        pa.field("replaced", pa.int64()),  # its characters decoded as U+FFFD (block 0 / doc rows)
    ]
)
_LIST_COLUMNS = ("input_ids", "attention_mask")
_NO_IDS = np.zeros(0, np.int32)
_NO_MASK = np.zeros(0, np.int8)


def lazy_load_tokenizer(path: str | Path):
    """`models.loading.load_tokenizer`, imported on first use: Ray Data's tokenizer actors import
    this module and should not pay for torch."""
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


def plain_backend(tok):
    """`tok` with truncation and padding turned off in its fast backend: either one saved in
    tokenizer.json would silently shorten documents."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return tok


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
    return lazy_load_tokenizer(payload["path"])


def _list_array(arrays: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class _StreamRows:
    """The actor's output table in `_STREAM_SCHEMA`, gathered one row at a time."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {k: [] for k in _STREAM_SCHEMA.names if k not in _LIST_COLUMNS}
        self.input_ids: list[np.ndarray] = []
        self.attention_mask: list[np.ndarray] = []

    def add(
        self,
        kind: int,
        doc_id: str,
        block_index: int = 0,
        ids: np.ndarray = _NO_IDS,
        mask: np.ndarray = _NO_MASK,
        *,
        reason: str = "",
        detail: str = "",
        n_docs: int = 1,
        n_tokens: int = 0,
        dropped: int = 0,
        replaced: int = 0,
    ) -> None:
        row = {
            "kind": kind,
            "doc_id": doc_id,
            "block_index": block_index,
            "reason": reason,
            "detail": detail,
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "dropped": dropped,
            "replaced": replaced,
        }
        for k, v in row.items():
            self.columns[k].append(v)
        self.input_ids.append(ids)
        self.attention_mask.append(mask)

    def skip(self, doc_id: str, reason: str, detail: str, n_docs: int = 1) -> None:
        self.add(KIND_SKIP, doc_id, reason=reason, detail=detail, n_docs=n_docs)

    def table(self) -> pa.Table:
        cols = {k: pa.array(v, type=_STREAM_SCHEMA.field(k).type) for k, v in self.columns.items()}
        cols["input_ids"] = _list_array(self.input_ids, np.int32)
        cols["attention_mask"] = _list_array(self.attention_mask, np.int8)
        return pa.table([cols[n] for n in _STREAM_SCHEMA.names], schema=_STREAM_SCHEMA)


class TokenizeCut:
    """Actor: tokenize a batch of documents, drop the too-short ones, cut blocks (or, when
    packing, pass the framed documents on to the driver's packer)."""

    def __init__(self, tokenizer: dict, spec: dict, ctx_len: int, tail: str, min_doc_tokens: int, pack: bool):
        self.tok = _tokenizer_from_payload(tokenizer)
        self.spec = TokenSpec(**spec)
        self.ctx_len, self.tail, self.min_doc_tokens, self.pack = ctx_len, tail, min_doc_tokens, pack

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _StreamRows()
        doc_ids = batch.column("doc_id").to_pylist()
        texts = batch.column("text").to_pylist()
        reasons = batch.column("reason").to_pylist()
        details = batch.column("detail").to_pylist()
        n_docs = batch.column("n_docs").to_pylist()
        replaced = batch.column("replaced").to_pylist() if "replaced" in batch.column_names else [0] * len(doc_ids)
        good = [i for i, r in enumerate(reasons) if not r]
        encoded = dict(zip(good, encode_texts(self.tok, [texts[i] for i in good]), strict=False)) if good else {}
        for i, doc_id in enumerate(doc_ids):
            if reasons[i]:
                rows.skip(doc_id, reasons[i], details[i], n_docs[i])
            else:
                self._add_document(rows, doc_id, encoded[i], replaced[i])
        return rows.table()

    def _add_document(self, rows: _StreamRows, doc_id: str, content: np.ndarray, replaced: int = 0) -> None:
        """The rows of one readable document: a skip, its framed tokens (packing), or its blocks.
        Its count of replaced characters rides on its first row, as its token count does."""
        if len(content) < self.min_doc_tokens:
            rows.skip(doc_id, "too_short", f"{len(content)} tokens < data.min_doc_tokens={self.min_doc_tokens}")
            return
        ids = frame_document(content, self.spec)
        if self.pack:
            rows.add(KIND_DOC, doc_id, 0, ids, _NO_MASK, n_tokens=len(ids), replaced=replaced)
            return
        blocks, dropped = cut_document(ids, doc_id, self.ctx_len, self.tail, self.spec.pad_id)
        if not blocks:
            rows.skip(doc_id, "no_full_block", f"{len(ids)} tokens < data.ctx_len={self.ctx_len} with data.tail=drop")
            return
        for b in blocks:
            first = b.block_index == 0
            rows.add(
                KIND_BLOCK,
                doc_id,
                b.block_index,
                b.input_ids,
                b.attention_mask,
                n_tokens=len(ids) if first else 0,
                dropped=dropped if first else 0,
                replaced=replaced if first else 0,
            )
