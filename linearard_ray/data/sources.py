"""Finding and reading the documents of a corpus.

A source is a string from ``data.sources``: a local file, directory or glob; an ``s3://``,
``gs://`` or ``file://`` URI (file, prefix or glob, through pyarrow filesystems); a Hugging Face
dataset ``hf:<name>[:split]`` or ``hf:<name>:<config>:[split]`` (its data files of that
configuration and split, read through the hub's filesystem: `parse_hf` has the grammar); or the embedded
corpus ``builtin:sotu/<split>``; or a genre built at set-up, ``genre:<name>[/<part>]``
(``data.genres``: its JSONL files in the cache; the held-out evaluation genres are refused as
training text).

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
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from linearard_ray.data.corpus import is_builtin, iter_builtin
from linearard_ray.data.genres import GENRES, GenreError, genre_files, is_genre, parse_genre

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


# Corpora a recipe names by path that the repository builds at set-up rather than ships.
BUILT_AT_SETUP = {"unixdocs.jsonl.xz": "python scripts/build_unixdocs_corpus.py --out {path}"}


def _built_at_setup_hint(path: str) -> str:
    """The command that builds a missing corpus the recipes expect to be built; empty for others."""
    command = BUILT_AT_SETUP.get(Path(path).name)
    return f"; it is built at set-up: {command.format(path=path)}" if command else ""


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
        "names (outputs/ among them): put the file on shared storage (s3://, gs://) and name that URI; "
        "what earlier jobs wrote to relative paths is under $LINEARARD_HOME (default ~/linearard_ray) "
        "of the node that ran them, to name by its absolute path"
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
            f"{field}[{idx}]: {source!r} does not exist"
            + (_built_at_setup_hint(path) + _uploaded_working_dir_hint() if scheme is None else "")
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


class HfSource(NamedTuple):
    """A parsed ``hf:`` source: the dataset, and the configuration and split it names (None: not named)."""

    name: str
    config: str | None
    split: str | None


HF_GRAMMAR = "hf:<dataset>[:split] or hf:<dataset>:<config>:[split]"


def parse_hf(source: str) -> HfSource:
    """The grammar of a Hugging Face source (``HF_GRAMMAR``); the dataset is ``name`` or
    ``owner/name``, and a part left empty is not named:

    - ``hf:org/name``: every split of the default configuration;
    - ``hf:org/name:train``: one part is a split (of the default configuration), as before configs;
    - ``hf:org/name:wiki:train``: two parts are a configuration and a split;
    - ``hf:org/name:wiki:``: every split of one configuration; ``hf:org/name::train`` = ``hf:org/name:train``.
    """
    name, *parts = source[len(HF_PREFIX) :].split(":")
    if len(parts) > 2 or not name or name.count("/") > 1 or any("/" in x for x in parts):
        raise DataError(f"bad Hugging Face source {source!r}; use {HF_GRAMMAR}, e.g. hf:org/name:train")
    config, split = parts if len(parts) == 2 else (None, parts[0] if parts else None)
    return HfSource(name, config or None, split or None)


def _split_matches(rel: str, split: str | None) -> bool:
    if split is None:
        return True
    parts = rel.split("/")
    return split in parts[:-1] or parts[-1].startswith(split + "-") or parts[-1].startswith(split + ".")


def _glob_regex(pattern: str) -> re.Pattern:
    """A data_files pattern as the hub reads it: ``*`` and ``?`` stay within a folder, ``**`` crosses
    folders."""
    out, i = [], 0
    pattern = pattern.removeprefix("./")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


def _card_configs(hub, root: str, source: str) -> list[dict]:
    """The ``configs`` a dataset card (README.md's YAML header) declares; [] when there is none."""
    import yaml

    try:
        with hub.open(f"{root}/README.md", "r", encoding="utf-8") as fh:
            text = fh.read()
    except Exception:  # no card, or no dataset: the listing that follows names the dataset's own error
        return []
    if not text.startswith("---"):
        return []
    header = text[3:].partition("\n---")[0]
    try:
        configs = (yaml.safe_load(header) or {}).get("configs") or []
    except yaml.YAMLError as e:
        raise DataError(f"{source!r}: cannot read the configs of its README.md: {e}") from None
    return [c for c in configs if isinstance(c, dict) and c.get("config_name")]


def _pick_config(configs: list[dict], ref: HfSource, source: str) -> dict:
    """The configuration ``ref`` names, or the card's default one (marked ``default: true``, named
    "default", or the only one)."""
    names = [str(c["config_name"]) for c in configs]
    if ref.config is not None:
        if ref.config not in names:
            raise DataError(f"{source!r}: no configuration {ref.config!r}; the dataset has {', '.join(names)}")
        return configs[names.index(ref.config)]
    default = [c for c in configs if c.get("default")] or [c for c in configs if c["config_name"] == "default"]
    if default or len(configs) == 1:
        return (default or configs)[0]
    raise DataError(
        f"{source!r}: the dataset has configurations {', '.join(names)} and none is the default; "
        f"name one: hf:{ref.name}:<config>:[split]"
    )


def _config_patterns(config: dict, split: str | None, source: str) -> list[str] | None:
    """The file patterns (relative to the dataset's root) of a card's configuration and split; None
    when the configuration lists no data_files (its files are then found by split name)."""
    files = config.get("data_files")
    if not files:
        return None
    if isinstance(files, str) or all(isinstance(f, str) for f in files):
        by_split = {"train": [files] if isinstance(files, str) else list(files)}  # the hub's rule
    else:
        by_split = {}
        for f in files:
            paths = f.get("path") or []
            by_split.setdefault(str(f.get("split", "train")), []).extend([paths] if isinstance(paths, str) else paths)
    if split is not None and split not in by_split:
        raise DataError(
            f"{source!r}: configuration {config['config_name']!r} has no split {split!r}; it has {', '.join(by_split)}"
        )
    base = str(config.get("data_dir") or "").strip("/")
    chosen = by_split[split] if split is not None else [p for ps in by_split.values() for p in ps]
    return [f"{base}/{p}" if base else p for p in chosen]


def _hf_items(idx: int, source: str, fmt: str, hub, fs, root: str, keep) -> list[InputFile]:
    """The corpus files under ``root`` (relative path ``rel``) for which ``keep(rel)`` holds."""
    try:
        found = sorted(hub.find(root))
    except Exception as e:  # the hub raises many kinds; all mean "cannot use it"
        raise DataError(f"cannot list {source!r} on the Hugging Face hub: {e}") from None
    items = []
    for p in found:
        rel = p[len(root) + 1 :]
        f = file_format(p, fmt, explicit=False)
        if f is None or Path(rel).name.lower().startswith("readme") or not keep(rel):
            continue
        items.append(_item(idx, source, f"hf://{p}", fs, fs.get_file_info(p), f))
    return items


def _hf_selection(hub, root: str, ref: HfSource, source: str) -> tuple[Callable[[str], bool] | None, str | None]:
    """Which of the dataset's own files ``ref`` selects (a predicate on the relative path, from the
    configurations its card declares), and the configuration's name. No predicate when the card
    declares none and ``ref`` names one, which only the hub's parquet conversion can then have."""
    configs = _card_configs(hub, root, source)
    if not configs:
        if ref.config not in (None, "default"):  # "default": the one configuration of a card without configs
            return None, ref.config
        return (lambda rel: _split_matches(rel, ref.split)), ref.config
    config = _pick_config(configs, ref, source)
    patterns = _config_patterns(config, ref.split, source)
    if patterns is None:
        return (lambda rel: _split_matches(rel, ref.split)), str(config["config_name"])
    regexes = [_glob_regex(p) for p in patterns]
    return (lambda rel: any(r.fullmatch(rel) for r in regexes)), str(config["config_name"])


def resolve_hf(idx: int, source: str, fmt: str = "auto", field: str = "data.sources", hub=None) -> list[InputFile]:
    """The input files of an ``hf:`` source: the dataset's own data files of the configuration and
    split it names (as its card's ``configs`` give them), else those of the hub's parquet conversion
    (``<config>/<split>/...``). ``hub`` is an fsspec filesystem laid out as the hub
    (``datasets/<name>/...``); the hub itself (``HfFileSystem``) when None."""
    ref = parse_hf(source)
    if hub is None:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise DataError(f"{field}[{idx}]: {source!r} needs the Hugging Face hub, but HF_HUB_OFFLINE is set")
        from huggingface_hub import HfFileSystem

        hub = HfFileSystem()
    import pyarrow.fs as pafs

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(hub))
    root = f"datasets/{ref.name}"
    try:
        keep, config = _hf_selection(hub, root, ref, source)
        items = _hf_items(idx, source, fmt, hub, fs, root, keep) if keep else []
        if not items:  # a script dataset, or a configuration the card does not declare
            items = _hf_converted(idx, source, fmt, hub, fs, root, ref._replace(config=config))
    except DataError as e:
        raise DataError(f"{field}[{idx}]: {e}") from None
    if items:
        return items
    wanted = " ".join(f"{k} {v!r}" for k, v in (("configuration", ref.config), ("split", ref.split)) if v)
    raise DataError(
        f"{field}[{idx}]: {source!r} has no text/jsonl/json/parquet files" + (f" for {wanted}" if wanted else "")
    )


def _hf_converted(idx: int, source: str, fmt: str, hub, fs, root: str, ref: HfSource) -> list[InputFile]:
    """Files of the hub's parquet conversion (``<config>/<split>/NNNN.parquet``); [] without one."""
    converted = f"{root}@refs%2Fconvert%2Fparquet"
    prefix = f"{ref.config}/" if ref.config else ""

    def keep(rel: str) -> bool:
        return rel.startswith(prefix) and _split_matches(rel[len(prefix) :], ref.split)

    try:
        return _hf_items(idx, source, fmt, hub, fs, converted, keep)
    except DataError:
        return []


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
        return resolve_hf(idx, source, fmt, field)
    if is_genre(source):
        return _resolve_genre(idx, source, fmt, field)
    return _resolve_fs_source(idx, source, fmt, field)


def is_named_source(source: str) -> bool:
    """A source that names a corpus (``builtin:``, ``hf:``, ``genre:``) rather than a path or URI:
    it resolves the same from any working directory."""
    return is_builtin(source) or source.startswith(HF_PREFIX) or is_genre(source)


TRAINING_FIELDS = ("data.sources", "data.lm_sources")


def _resolve_genre(idx: int, source: str, fmt: str, field: str) -> list[InputFile]:
    """The built files of a genre, named by the genre source; an evaluation genre is no training text."""
    try:
        g, _ = parse_genre(source)
        if field in TRAINING_FIELDS and g.role == "eval":
            raise GenreError(
                f"{source!r} is a held-out evaluation genre: no recipe trains on it (training genres: "
                + ", ".join(f"genre:{n}" for n, x in sorted(GENRES.items()) if x.role == "train")
                + ")"
            )
        files = genre_files(source)
    except GenreError as e:
        raise DataError(f"{field}[{idx}]: {e}") from None
    items = []
    for path in files:
        items += [replace(it, source=source) for it in _resolve_fs_source(idx, str(path), fmt, field)]
    return items


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
