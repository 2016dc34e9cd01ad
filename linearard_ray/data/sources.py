"""Finding and reading the documents of a corpus.

A source is a string from ``data.sources``: a local file, directory or glob; an ``s3://``,
``gs://`` or ``file://`` URI (file, prefix or glob, through pyarrow filesystems); a Hugging Face
dataset ``hf:<name>[:split]`` (its data files, read through the hub's filesystem); or the embedded
corpus ``builtin:sotu/<split>``.

Resolution (`resolve_sources`) runs in the driver before any work starts and fails on a source
that matches nothing. Reading (`iter_documents`) runs inside Ray tasks, one input file at a time,
and yields every document it meets, good or bad: a bad one carries a skip reason instead of text,
so the caller can count it rather than lose it.
"""

from __future__ import annotations

import bz2
import codecs
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from linearard_ray.data.corpus import is_builtin, iter_builtin

FORMATS = ("text", "jsonl", "json", "parquet")
_EXT_FORMAT = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
_REMOTE_SCHEMES = ("s3", "gs", "gcs", "file")
_GLOB_CHARS = "*?["
HF_PREFIX = "hf:"
_BUILTIN_DOCS_PER_ITEM = 64
# Bytes looked at to decide that a file is binary rather than text.
_SNIFF_BYTES = 8192


class DataError(ValueError):
    """Input data that cannot be used; the message names the source or field."""


# Skip reasons: short stable keys (counted in the manifest) and what each means.
SKIP_REASONS = {
    "empty": "empty file or document",
    "binary": "binary content (not text)",
    "undecodable": "not valid text in data.encoding (with data.encoding_errors=skip)",
    "invalid_json": "a line or file that is not valid JSON",
    "not_an_object": "a JSON record that is not an object",
    "missing_text_column": "the text column is missing",
    "not_text": "the text column does not hold strings",
    "unsupported_file_type": "a file found in a directory or glob whose type is not text/jsonl/json/parquet",
    "hidden_file": "a hidden file (name starting with '.') found in a directory",
    "unreadable": "a file that could not be opened or parsed",
    "too_short": "fewer tokens than data.min_doc_tokens",
    "no_full_block": "shorter than one block with data.tail=drop",
}


@dataclass(frozen=True)
class InputFile:
    """One thing a read task opens: a file of a source, or a built-in corpus."""

    source_index: int
    source: str
    uri: str  # stable display name; prefix of the document ids
    fmt: str  # text | jsonl | json | parquet | builtin | skip
    path: str = ""  # path inside `fs`
    fs: Any = None  # pyarrow FileSystem (picklable, so read tasks on other nodes can open it)
    size: int = -1
    mtime_ns: int = -1
    skip_reason: str = ""  # set for files listed but not readable as a corpus
    rows: tuple[int, int] | None = None  # a built-in corpus is read in slices of documents

    @property
    def compression(self) -> str | None:
        return _COMPRESSION.get(Path(self.path).suffix.lower())


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str | None
    reason: str = ""  # a SKIP_REASONS key when the document is skipped
    detail: str = ""
    n_docs: int = 1  # documents this record stands for (a whole unreadable parquet file: its rows)
    replaced: int = 0  # characters that data.encoding_errors=replace turned into U+FFFD


@dataclass(frozen=True)
class Decoding:
    """How the bytes of text, jsonl and json inputs become text (data.encoding, data.encoding_errors)."""

    encoding: str = "utf-8"
    errors: str = "skip"  # skip: the file or line is a counted skip; replace: U+FFFD, counted

    @property
    def codec(self) -> str:
        # UTF-8 reads a leading byte-order mark as a mark, not as text
        return "utf-8-sig" if codecs.lookup(self.encoding).name == "utf-8" else self.encoding

    @property
    def wide(self) -> bool:
        """UTF-16/32: NUL bytes are text, and lines cannot be split on the byte b'\\n'."""
        return codecs.lookup(self.encoding).name.startswith(("utf-16", "utf-32"))

    def decode(self, data: bytes, where: str = "") -> tuple[str | None, int, str]:
        """(text, characters replaced, why not): text None when `data` is not valid and errors=skip."""
        try:
            return data.decode(self.codec), 0, ""
        except UnicodeDecodeError as e:
            if self.errors != "replace":
                return None, 0, f"not valid {self.encoding} at byte {e.start}{where} (data.encoding)"
        text = data.decode(self.codec, "replace")
        # U+FFFD already in the text is not a replacement: count only what decoding added
        return text, text.count("\ufffd") - data.decode(self.codec, "ignore").count("\ufffd"), ""


UTF8 = Decoding()


# --------------------------------------------------------------------------- resolution


def split_uri(source: str) -> tuple[str | None, str]:
    """('s3', 'bucket/key') for 's3://bucket/key'; (None, path) for a local path."""
    if "://" in source:
        scheme, rest = source.split("://", 1)
        scheme = scheme.lower()
        if scheme not in _REMOTE_SCHEMES:
            raise DataError(
                f"unsupported URI scheme {scheme!r} in source {source!r}; use s3://, gs://, file:// or a local path"
            )
        if scheme == "gcs":
            scheme = "gs"
        return scheme, rest
    return None, source


def glob_base(path: str) -> str:
    """The directory part of a glob before its first wildcard: 'b/dir/x*/*.json' -> 'b/dir'."""
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=len(path))
    return path[:cut].rsplit("/", 1)[0] if "/" in path[:cut] else ""


def has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def filesystem_for(scheme: str | None):
    """The pyarrow filesystem serving a URI scheme (None: local disk)."""
    import pyarrow.fs as pafs

    if scheme in (None, "file"):
        return pafs.LocalFileSystem()
    if scheme == "s3":
        return pafs.S3FileSystem()
    if scheme == "gs":
        return pafs.GcsFileSystem()
    raise DataError(f"no filesystem for scheme {scheme!r}")


def file_format(path: str, fmt: str, *, explicit: bool) -> str | None:
    """Format of a file: the configured one, else from its extension (ignoring .gz/.bz2/.xz).

    A file named explicitly with an unknown extension is read as text; one found by listing a
    directory or glob is not (None), so stray files in a data directory are reported, not parsed.
    """
    if fmt != "auto":
        return fmt
    p = Path(path.lower())
    if p.suffix in _COMPRESSION:
        p = p.with_suffix("")
    found = _EXT_FORMAT.get(p.suffix)
    if found is None and explicit:
        return "text"
    return found


def _list_files(fs, base: str) -> list[Any]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _item(idx: int, source: str, uri: str, fs, info, fmt: str | None) -> InputFile:
    mtime = info.mtime_ns if info.mtime_ns is not None else -1
    size = info.size if info.size is not None else -1
    if fmt is None:
        return InputFile(idx, source, uri, "skip", info.path, fs, size, mtime, skip_reason="unsupported_file_type")
    return InputFile(idx, source, uri, fmt, info.path, fs, size, mtime)


def _uploaded_working_dir_hint() -> str:
    """Why a local file can be missing inside a submitted Ray job: `ray job submit --working-dir .`
    uploads the checkout without what .gitignore names (outputs/ among them), and the job's driver
    runs from that copy. Empty outside such a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return ""
    try:
        working_dir = (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return ""
    if not working_dir:
        return ""
    return (
        "; this Ray job runs from its uploaded --working-dir, which leaves out files that .gitignore "
        "names (outputs/ among them): put the file on shared storage (s3://, gs://) and name that URI"
    )


def _glob_files(fs, scheme: str | None, pattern: str) -> list[Any]:
    """The FileInfo of each file that matches `pattern` on `fs`, in path order."""
    if scheme is None:
        # glob.glob understands ** and [] the way users expect on local disk.
        matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
        return fs.get_file_info(matches) if matches else []
    base = glob_base(pattern)
    return [i for i in _list_files(fs, base) if fnmatch.fnmatchcase(i.path, pattern)]


def _resolve_fs_source(idx: int, source: str, fmt: str, field: str) -> list[InputFile]:
    import pyarrow.fs as pafs

    scheme, path = split_uri(source)
    fs = filesystem_for(scheme)
    if scheme is None:
        path = os.path.abspath(os.path.expanduser(path))

    def uri_of(p: str) -> str:
        return p if scheme in (None, "file") else f"{scheme}://{p}"

    if has_glob(path):
        infos = _glob_files(fs, scheme, path)
        if not infos:
            raise DataError(
                f"{field}[{idx}]: {source!r} matches no file" + (_uploaded_working_dir_hint() if scheme is None else "")
            )
        return [_item(idx, source, uri_of(i.path), fs, i, file_format(i.path, fmt, explicit=False)) for i in infos]

    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DataError(f"{field}[{idx}]: cannot look up {source!r}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(
            f"{field}[{idx}]: {source!r} does not exist" + (_uploaded_working_dir_hint() if scheme is None else "")
        )
    if info.type == pafs.FileType.File:
        return [_item(idx, source, uri_of(info.path), fs, info, file_format(info.path, fmt, explicit=True))]
    infos = _list_files(fs, path)
    if not infos:
        raise DataError(f"{field}[{idx}]: directory {source!r} holds no file")
    out = []
    for i in infos:
        if any(part.startswith(".") for part in Path(i.path[len(path) :]).parts):
            # .DS_Store, .git/...: listed as skipped rather than read or silently left out.
            out.append(InputFile(idx, source, uri_of(i.path), "skip", i.path, fs, skip_reason="hidden_file"))
        else:
            out.append(_item(idx, source, uri_of(i.path), fs, i, file_format(i.path, fmt, explicit=False)))
    return out


def parse_hf(source: str) -> tuple[str, str | None]:
    """'hf:org/name:train' -> ('org/name', 'train')."""
    body = source[len(HF_PREFIX) :]
    name, _, split = body.partition(":")
    if not name or name.count("/") > 1:
        raise DataError(f"bad Hugging Face source {source!r}; use hf:<dataset>[:split], e.g. hf:org/name:train")
    return name, (split or None)


def _split_matches(rel: str, split: str | None) -> bool:
    if split is None:
        return True
    parts = rel.split("/")
    return split in parts[:-1] or parts[-1].startswith(split + "-") or parts[-1].startswith(split + ".")


def _resolve_hf(idx: int, source: str, fmt: str, field: str) -> list[InputFile]:
    name, split = parse_hf(source)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise DataError(f"{field}[{idx}]: {source!r} needs the Hugging Face hub, but HF_HUB_OFFLINE is set")
    import pyarrow.fs as pafs
    from huggingface_hub import HfFileSystem

    hffs = HfFileSystem()
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(hffs))
    # The dataset's own data files first; else the hub's parquet conversion of it.
    for root in (f"datasets/{name}", f"datasets/{name}@refs%2Fconvert%2Fparquet"):
        try:
            found = sorted(hffs.find(root))
        except Exception as e:  # the hub raises many kinds; all mean "cannot use it"
            if root.endswith("parquet"):
                break
            raise DataError(f"{field}[{idx}]: cannot list {source!r} on the Hugging Face hub: {e}") from None
        items = []
        for p in found:
            rel = p[len(root) + 1 :]
            f = file_format(p, fmt, explicit=False)
            if f is None or Path(rel).name.lower().startswith("readme") or not _split_matches(rel, split):
                continue
            info = fs.get_file_info(p)
            items.append(_item(idx, source, f"hf://{p}", fs, info, f))
        if items:
            return items
    raise DataError(
        f"{field}[{idx}]: {source!r} has no text/jsonl/json/parquet files" + (f" for split {split!r}" if split else "")
    )


def resolve_source(idx: int, source: str, fmt: str = "auto", field: str = "data.sources") -> list[InputFile]:
    """The input files of one source; DataError, naming ``field[idx]``, when it does not exist or
    matches nothing."""
    if is_builtin(source):
        try:
            next(iter_builtin(source))
        except (ValueError, StopIteration) as e:
            raise DataError(f"{field}[{idx}]: {e}") from None
        corpus = source[len("builtin:") :].partition("/")[0]
        asset = Path(str(resources.files("linearard_ray") / "assets" / f"{corpus}.jsonl.xz"))
        st = asset.stat() if asset.exists() else None
        n = sum(1 for _ in iter_builtin(source))
        # Slices, so that several tokenizer actors share the corpus.
        step = _BUILTIN_DOCS_PER_ITEM
        size = (st.st_size * 5 // max(n, 1)) if st else -1  # ~ uncompressed bytes per document
        return [
            InputFile(
                idx,
                source,
                f"{source}[{a}:{min(a + step, n)}]",
                "builtin",
                str(asset),
                None,
                size * (min(a + step, n) - a) if st else -1,
                st.st_mtime_ns if st else -1,
                rows=(a, min(a + step, n)),
            )
            for a in range(0, n, step)
        ]
    if source.startswith(HF_PREFIX):
        return _resolve_hf(idx, source, fmt, field)
    return _resolve_fs_source(idx, source, fmt, field)


def resolve_sources(sources: list[str], fmt: str = "auto") -> list[InputFile]:
    """Every input file of every source, in a stable order (source order, then path order)."""
    if not sources:
        raise DataError("data.sources is empty: name at least one file, directory, glob or builtin:sotu/train")
    items: list[InputFile] = []
    for i, s in enumerate(sources):
        items.extend(resolve_source(i, s, fmt))
    return items


def fingerprint(items: list[InputFile]) -> str:
    """Hash of what was resolved (names, sizes, modification times): changes when inputs change."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.source_index}\t{it.uri}\t{it.fmt}\t{it.size}\t{it.mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def _open_bytes(item: InputFile) -> io.RawIOBase:
    raw = item.fs.open_input_stream(item.path, compression=None)  # we decompress: pyarrow has no xz
    comp = item.compression
    if comp == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if comp == "bz2":
        return bz2.BZ2File(raw)
    if comp == "xz":
        return lzma.LZMAFile(raw)
    return raw


def looks_binary(data: bytes, decoding: Decoding = UTF8) -> bool:
    """NUL bytes or many control characters: not text in any encoding we read (UTF-16/32 text
    holds NUL bytes: there decoding alone decides)."""
    if decoding.wide:
        return False
    sample = data[:_SNIFF_BYTES]
    if b"\x00" in sample:
        return True
    ctrl = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13))
    return len(sample) > 0 and ctrl / len(sample) > 0.1


def _skip(doc_id: str, reason: str, detail: str = "", n_docs: int = 1) -> Document:
    return Document(doc_id, None, reason, detail or SKIP_REASONS[reason], n_docs)


def _doc_from_value(doc_id: str, value: Any, replaced: int = 0) -> Document:
    if value is None:
        return _skip(doc_id, "empty", "null text")
    if not isinstance(value, str):
        return _skip(doc_id, "not_text", f"text column holds {type(value).__name__}, not a string")
    if not value.strip():
        return _skip(doc_id, "empty")
    return Document(doc_id, value, replaced=replaced)


def _file_text(item: InputFile, decoding: Decoding) -> tuple[str | None, int, Document | None]:
    """The whole file decoded, with the characters replaced, or the skip record that says why it
    cannot be."""
    with _open_bytes(item) as f:
        data = f.read()
    if not data.strip():
        return None, 0, _skip(item.uri, "empty")
    if looks_binary(data, decoding):
        return None, 0, _skip(item.uri, "binary")
    text, replaced, err = decoding.decode(data)
    if text is None:
        return None, 0, _skip(item.uri, "undecodable", err)
    return text, replaced, None


def _read_text(item: InputFile, decoding: Decoding) -> Iterator[Document]:
    text, replaced, skipped = _file_text(item, decoding)
    if skipped is not None:
        yield skipped
        return
    yield _doc_from_value(item.uri, text, replaced)


def _record(doc_id: str, obj: Any, column: str, replaced: int = 0) -> Document:
    if not isinstance(obj, dict):
        return _skip(doc_id, "not_an_object", f"record is a JSON {type(obj).__name__}")
    if column not in obj:
        keys = ", ".join(sorted(obj)[:8])
        return _skip(doc_id, "missing_text_column", f"no column {column!r} (has: {keys}; data.text_column)")
    return _doc_from_value(doc_id, obj[column], replaced if isinstance(obj[column], str) else 0)


def _jsonl_lines(item: InputFile, decoding: Decoding) -> Iterator[tuple[int, bytes | str, int]]:
    """(line number, line, characters replaced) of every non-blank line: bytes, decoded one line
    at a time, for encodings whose newline is the byte b'\\n'; text for UTF-16/32, whose file is
    decoded whole (its replaced characters counted with the first line)."""
    replaced = 0
    with _open_bytes(item) as f:
        if decoding.wide:
            text, replaced, err = decoding.decode(f.read())
            if text is None:
                yield 0, err, 0
                return
            lines: Any = text.splitlines()
        else:
            head = f.read(_SNIFF_BYTES)
            if looks_binary(head):
                yield -1, b"", 0
                return
            lines = io.BufferedReader(_Prefixed(head, f))
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                yield lineno, line, replaced
                replaced = 0


def _read_jsonl(item: InputFile, column: str, decoding: Decoding) -> Iterator[Document]:
    any_line = False
    for lineno, line, replaced in _jsonl_lines(item, decoding):
        if lineno <= 0:  # the whole file: binary (-1), or a wide encoding that did not decode (0)
            yield _skip(item.uri, "binary") if lineno < 0 else _skip(item.uri, "undecodable", line)
            return
        any_line = True
        doc_id = f"{item.uri}:{lineno}"
        if isinstance(line, bytes):
            line, replaced, err = decoding.decode(line, f" of line {lineno}")
            if line is None:
                yield _skip(doc_id, "undecodable", err)
                continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield _skip(doc_id, "invalid_json", f"line {lineno}: {e.msg}")
            continue
        yield _record(doc_id, obj, column, replaced)
    if not any_line:
        yield _skip(item.uri, "empty")


class _Prefixed(io.RawIOBase):
    """A stream that replays bytes already read (the sniffed head) before the rest."""

    def __init__(self, head: bytes, rest):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        chunk = self._rest.read(len(b))
        n = len(chunk)
        b[:n] = chunk
        return n


def _read_json(item: InputFile, column: str, decoding: Decoding) -> Iterator[Document]:
    text, replaced, skipped = _file_text(item, decoding)
    if skipped is not None:
        yield skipped
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        yield _skip(item.uri, "invalid_json", f"line {e.lineno}: {e.msg}")
        return
    if isinstance(obj, dict) and column not in obj:
        # {"data": [...]} and similar wrappers: one key holding the records.
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(obj) == 1 and len(lists) == 1:
            obj = lists[0]
    if isinstance(obj, list):
        if not obj:
            yield _skip(item.uri, "empty", "empty JSON list")
        # the replaced characters are counted once, with the file's first record
        for i, rec in enumerate(obj):
            yield _record(f"{item.uri}:{i}", rec, column, replaced if i == 0 else 0)
    else:
        yield _record(item.uri, obj, column, replaced)


def _missing_column(column: str, names: list[str]) -> str:
    more = f", … ({len(names)} columns)" if len(names) > 8 else ""
    return f"no column {column!r} (data.text_column); the file's columns: {', '.join(names[:8]) or 'none'}{more}"


def _read_parquet(item: InputFile, column: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(item.fs.open_input_file(item.path))
    except (OSError, pa.ArrowException) as e:
        yield _skip(item.uri, "unreadable", f"not a readable parquet file: {e}")
        return
    n_rows = pf.metadata.num_rows
    names = pf.schema_arrow.names
    if n_rows == 0:
        yield _skip(item.uri, "empty", "parquet file without rows")
        return
    if column not in names:
        yield _skip(item.uri, "missing_text_column", _missing_column(column, names), n_docs=n_rows)
        return
    typ = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        yield _skip(item.uri, "not_text", f"column {column!r} has type {typ}, not string", n_docs=n_rows)
        return
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=256):
        for value in batch.column(0).to_pylist():
            yield _doc_from_value(f"{item.uri}:{row}", value)
            row += 1


def _read_builtin(item: InputFile, column: str) -> Iterator[Document]:
    corpus = item.source[len("builtin:") :].partition("/")[0]
    a, b = item.rows
    for i, row in enumerate(iter_builtin(item.source)):
        if i >= b:
            break
        if i >= a:
            yield _doc_from_value(f"{corpus}/{row['id']}", row.get("text"))


def iter_documents(item: InputFile, text_column: str = "text", decoding: Decoding = UTF8) -> Iterator[Document]:
    """Every document of one input, in file order; unreadable ones come out as skips. `decoding`
    applies to text, jsonl and json files (parquet and the built-in corpora hold text already)."""
    if item.fmt == "skip":
        yield _skip(item.uri, item.skip_reason)
        return
    readers = {
        "text": lambda it, c: _read_text(it, decoding),
        "jsonl": lambda it, c: _read_jsonl(it, c, decoding),
        "json": lambda it, c: _read_json(it, c, decoding),
        "parquet": _read_parquet,
        "builtin": _read_builtin,
    }
    try:
        yield from readers[item.fmt](item, text_column)
    except (OSError, EOFError, lzma.LZMAError) as e:
        # Opening failed, or a compressed stream is truncated: the rest of the file is lost.
        yield _skip(item.uri, "unreadable", f"{type(e).__name__}: {e}")
