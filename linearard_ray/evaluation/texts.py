"""Evaluation texts: documents from built-in corpora or local files, cut into token windows.

Sources are ``builtin:<corpus>[/<split>]``, built genres ``genre:<name>[/<part>]`` or local paths,
directories and globs of ``.txt`` (one document per file), ``.jsonl`` / ``.json`` (one document
per record, ``text_column``) and ``.parquet`` (one per row). Windows of one length are
non-overlapping and picked with a seeded generator, so every model sees the same tokens.

Where too few documents are long enough for a length, windows are cut from the documents joined
end to end (separated by the EOS token) instead; the window set records that, and the report
says so. Where even the whole joined text is shorter than the length, the length is skipped with
its reason: never dropped silently.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linearard_ray.data.corpus import check_builtin, is_builtin, iter_builtin
from linearard_ray.data.genres import GenreError, genre_files, is_genre, iter_genre_documents

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_ALL_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


class TextsError(ValueError):
    """Unusable evaluation text: the message names the source and the problem."""


@dataclass
class Document:
    id: str
    text: str


@dataclass
class DocumentSet:
    sources: list[str]
    documents: list[Document]
    empty_skipped: int = 0  # documents with no text, counted so the report can say so


@dataclass
class WindowSet:
    """`n` windows of `length` tokens, or a skip with its reason."""

    length: int
    requested: int
    windows: np.ndarray | None = None  # [n, length] int64
    construction: str = "single documents"  # or "concatenated documents"
    docs_per_window: float = 1.0
    pool: int = 0  # candidate windows the seeded choice was drawn from
    available_tokens: int = 0
    skipped_reason: str | None = None
    doc_ids: list[list[str]] = field(default_factory=list)  # documents each window covers
    starts: list[int] = field(default_factory=list)  # token offset of each window in its document / the joined text

    @property
    def skipped(self) -> bool:
        return self.windows is None

    @property
    def n(self) -> int:
        return 0 if self.windows is None else int(self.windows.shape[0])

    def describe(self) -> dict:
        d = {
            "length": self.length,
            "requested_windows": self.requested,
            "n_windows": self.n,
            "construction": self.construction,
            "docs_per_window": round(self.docs_per_window, 3),
            "candidate_windows": self.pool,
            "available_tokens": self.available_tokens,
            "skipped": self.skipped,
        }
        if self.skipped_reason:
            d["reason"] = self.skipped_reason
        return d


# --------------------------------------------------------------------------- loading


def _expand(source: str) -> list[Path]:
    if "://" in source or source.startswith("hf:"):
        raise TextsError(
            f"eval text source {source!r}: only local paths, directories, globs and builtin: corpora are supported"
        )
    p = Path(os.path.expanduser(source))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(_ALL_SUFFIXES))
        if not files:
            raise TextsError(f"eval text source {source!r}: directory has no {'/'.join(_ALL_SUFFIXES)} files")
        return files
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(source), recursive=True) if Path(m).is_file())
    if not matches:
        raise TextsError(f"eval text source {source!r}: no such file, directory or glob match")
    return matches


def check_source(source: str) -> None:
    """TextsError unless ``source`` can be read here: a known built-in corpus (nothing is read), a
    built genre, or a local path, directory or glob that matches files."""
    if is_genre(source):
        try:
            genre_files(source)
        except GenreError as e:
            raise TextsError(str(e)) from None
    elif is_builtin(source):
        try:
            check_builtin(source)
        except ValueError as e:
            raise TextsError(str(e)) from None
    else:
        _expand(source)


def _records(path: Path, text_column: str) -> Iterator[tuple[str, object]]:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        yield path.stem, path.read_text(encoding="utf-8", errors="replace")
    elif name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    yield _row_id(row, path, i), _column(row, text_column, path)
    elif name.endswith(".json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            yield _row_id(row, path, i), _column(row, text_column, path)
    elif name.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise TextsError(f"{path}: no column {text_column!r} (columns: {table.column_names})")
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        for i, t in enumerate(table.column(text_column).to_pylist()):
            yield (str(ids[i]) if ids else f"{path.stem}:{i}"), t
    else:
        raise TextsError(f"{path}: unsupported file type; use {', '.join(_ALL_SUFFIXES)}")


def _row_id(row, path: Path, i: int) -> str:
    return str(row.get("id", f"{path.stem}:{i}")) if isinstance(row, dict) else f"{path.stem}:{i}"


def _column(row, text_column: str, path: Path):
    if not isinstance(row, dict) or text_column not in row:
        raise TextsError(f"{path}: record has no field {text_column!r}")
    return row[text_column]


def load_documents(sources: Iterable[str], text_column: str = "text") -> DocumentSet:
    """Every document of `sources`, in order; empty ones are counted, not kept."""
    sources = list(sources)
    if not sources:
        raise TextsError("no evaluation text sources given")
    docs: list[Document] = []
    empty = 0
    for src in sources:
        if is_builtin(src) or is_genre(src):
            read = iter_genre_documents if is_genre(src) else iter_builtin
            try:
                rows = [(str(r.get("id", i)), r.get("text")) for i, r in enumerate(read(src))]
            except ValueError as e:  # GenreError included: not built, with the command that builds it
                raise TextsError(str(e)) from None
        else:
            rows = [r for path in _expand(src) for r in _records(path, text_column)]
        for doc_id, text in rows:
            if not isinstance(text, str) or not text.strip():
                empty += 1
                continue
            docs.append(Document(doc_id, text))
    if not docs:
        raise TextsError(f"eval text sources {sources} hold no non-empty document")
    return DocumentSet(sources, docs, empty)


def domain_label(sources: list[str]) -> str:
    """A short human name for a list of sources (for tables and plots)."""
    return ", ".join(sources)


# --------------------------------------------------------------------------- windows


def tokenize_documents(docs: DocumentSet, tokenizer) -> list[np.ndarray]:
    """Token ids of each document, without special tokens (windows add their own BOS)."""
    out = []
    for d in docs.documents:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def bos_prefix(tokenizer) -> list[int]:
    """[bos] where the tokenizer itself starts sequences with BOS, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def make_windows(
    token_docs: list[np.ndarray],
    doc_ids: list[str],
    length: int,
    n: int,
    seed: int,
    prefix: list[int] | None = None,
    separator: int | None = None,
) -> WindowSet:
    """Up to `n` non-overlapping windows of exactly `length` tokens (prefix included).

    Single-document windows (document cut at multiples of the body length) are used when there
    are at least `n` of them; otherwise the documents are joined in order, separated by
    `separator`, and cut the same way. The choice among candidates is seeded.
    """
    prefix = list(prefix or [])
    body = length - len(prefix)
    if body < 2:
        raise TextsError(f"window length {length} is too short")
    rng = np.random.default_rng([seed, length])
    ws = WindowSet(length=length, requested=n, available_tokens=int(sum(len(t) for t in token_docs)))
    single = [(di, s) for di, t in enumerate(token_docs) for s in range(0, len(t) - body + 1, body)]
    if len(single) >= n:
        rows = _single_document_windows(ws, token_docs, doc_ids, single, body, rng)
    else:
        rows = _joined_document_windows(ws, token_docs, doc_ids, body, rng, separator)
    if rows is not None:
        ws.windows = np.stack([np.concatenate([np.asarray(prefix, dtype=np.int64), r]) for r in rows])
    return ws


def _single_document_windows(
    ws: WindowSet, token_docs: list[np.ndarray], doc_ids: list[str], single: list[tuple[int, int]], body: int, rng
) -> list[np.ndarray]:
    """``ws.requested`` of the (document, start) cuts in ``single``, each window inside one document."""
    pick = sorted(rng.choice(len(single), size=ws.requested, replace=False).tolist())
    ws.doc_ids = [[doc_ids[single[i][0]]] for i in pick]
    ws.starts = [single[i][1] for i in pick]
    ws.pool = len(single)
    ws.construction = "single documents"
    ws.docs_per_window = 1.0
    return [token_docs[single[i][0]][single[i][1] : single[i][1] + body] for i in pick]


def _joined_stream(token_docs: list[np.ndarray], separator: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The documents joined in order (``separator`` between them) and each token's document index."""
    parts, owner = [], []
    for di, t in enumerate(token_docs):
        if di and separator is not None:
            parts.append(np.asarray([separator], dtype=np.int64))
            owner.append(np.full(1, di, dtype=np.int64))
        parts.append(t)
        owner.append(np.full(len(t), di, dtype=np.int64))
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(parts), np.concatenate(owner)


def _joined_document_windows(
    ws: WindowSet, token_docs: list[np.ndarray], doc_ids: list[str], body: int, rng, separator: int | None
) -> list[np.ndarray] | None:
    """Up to ``ws.requested`` windows cut from the joined documents; None, with ``ws.skipped_reason``
    set, when even the joined text is shorter than one window."""
    stream, owners = _joined_stream(token_docs, separator)
    ws.construction = "concatenated documents"
    starts = list(range(0, len(stream) - body + 1, body))
    if not starts:
        ws.skipped_reason = (
            f"needs {ws.length} tokens but all {len(token_docs)} documents together hold only "
            f"{len(stream) + ws.length - body} (with separators)"
        )
        return None
    pick = sorted(rng.choice(len(starts), size=min(ws.requested, len(starts)), replace=False).tolist())
    ws.doc_ids = [[doc_ids[j] for j in np.unique(owners[starts[i] : starts[i] + body])] for i in pick]
    ws.starts = [starts[i] for i in pick]
    ws.pool = len(starts)
    ws.docs_per_window = float(np.mean([len(d) for d in ws.doc_ids]))
    return [stream[starts[i] : starts[i] + body] for i in pick]
