"""Finding and reading inputs (no Ray): path resolution, each format, bad input as skip records."""

from __future__ import annotations

import gzip
import json
import random
import string

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from linearard_ray.data import sources
from linearard_ray.data.corpus import iter_sotu
from linearard_ray.data.sources import (
    DataError,
    glob_base,
    has_glob,
    iter_documents,
    parse_hf,
    resolve_sources,
    split_uri,
)


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(n))


def _docs(item, column="text"):
    return list(iter_documents(item, column))


# --------------------------------------------------------------------------- path resolution


@pytest.mark.parametrize(
    "uri,scheme,path",
    [
        ("s3://bucket/dir/*.jsonl", "s3", "bucket/dir/*.jsonl"),
        ("gs://b/x/y.parquet", "gs", "b/x/y.parquet"),
        ("gcs://b/x/", "gs", "b/x/"),
        ("file:///tmp/a.txt", "file", "/tmp/a.txt"),
        ("data/*.txt", None, "data/*.txt"),
    ],
)
def test_split_uri(uri, scheme, path):
    assert split_uri(uri) == (scheme, path)


def test_split_uri_rejects_unknown_scheme():
    with pytest.raises(DataError, match="unsupported URI scheme 'ftp'"):
        split_uri("ftp://host/file.txt")


@pytest.mark.parametrize(
    "path,base,glob",
    [
        ("bucket/dir/*.jsonl", "bucket/dir", True),
        ("bucket/a/b?/c/*.txt", "bucket/a", True),
        ("bucket/a/[xy]/f", "bucket/a", True),
        ("bucket/file.txt", "bucket", False),
    ],
)
def test_glob_base(path, base, glob):
    assert has_glob(path) is glob
    if glob:
        assert glob_base(path) == base


@pytest.fixture
def fake_s3(tmp_path, monkeypatch):
    """'s3://' served by a local directory through a pyarrow filesystem (picklable, like S3's)."""
    root = tmp_path / "s3root"
    root.mkdir()
    real = sources.filesystem_for

    def fake(scheme):
        if scheme in ("s3", "gs"):
            return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
        return real(scheme)

    monkeypatch.setattr(sources, "filesystem_for", fake)
    return root


def test_object_store_glob_prefix_and_file(fake_s3):
    rng = random.Random()
    (fake_s3 / "bucket" / "corpus" / "sub").mkdir(parents=True)
    texts = {}
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        t = _words(rng, 20)
        texts[name] = t
        (fake_s3 / "bucket" / "corpus" / name).write_text(json.dumps({"text": t}) + "\n")
    (fake_s3 / "bucket" / "corpus" / "readme.md").write_text("not data")

    items = resolve_sources(["s3://bucket/corpus/*.jsonl"])
    # fnmatch's * crosses '/', as object-store listings do.
    assert [i.uri for i in items] == [
        "s3://bucket/corpus/a.jsonl",
        "s3://bucket/corpus/b.jsonl",
        "s3://bucket/corpus/sub/c.jsonl",
    ]
    assert all(i.fmt == "jsonl" for i in items)
    got = [d for i in items for d in _docs(i)]
    assert [d.text for d in got] == [texts["a.jsonl"], texts["b.jsonl"], texts["sub/c.jsonl"]]
    assert got[0].doc_id == "s3://bucket/corpus/a.jsonl:1"

    prefix = resolve_sources(["gs://bucket/corpus/"])
    assert [i.fmt for i in prefix] == ["jsonl", "jsonl", "text", "jsonl"]  # readme.md is text
    single = resolve_sources(["s3://bucket/corpus/b.jsonl"])
    assert len(single) == 1 and single[0].path.endswith("bucket/corpus/b.jsonl")

    with pytest.raises(DataError, match=r"sources\[0\].*does not exist"):
        resolve_sources(["s3://bucket/nothing.txt"])
    with pytest.raises(DataError, match="matches no file"):
        resolve_sources(["s3://bucket/corpus/*.parquet"])


def test_missing_local_source_in_a_submitted_job_says_why(tmp_path, monkeypatch):
    """Inside `ray job submit --working-dir .` the driver runs from an upload without the
    .gitignore'd files; the error says so (and only there, and not for a bucket path)."""
    missing = str(tmp_path / "outputs" / "corpus.jsonl.xz")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(DataError) as plain:
        resolve_sources(["builtin:sotu/train", missing])
    assert "working-dir" not in str(plain.value)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with pytest.raises(
        DataError,
        match=r"sources\[1\]: .*does not exist; this Ray job runs from its uploaded "
        r"--working-dir.*\.gitignore.*s3://",
    ):
        resolve_sources(["builtin:sotu/train", missing])
    with pytest.raises(DataError, match=r"matches no file; this Ray job"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    with pytest.raises(DataError) as no_upload:
        resolve_sources([missing])
    assert "working-dir" not in str(no_upload.value)


def test_local_missing_sources_fail_early(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "ok.txt").write_text("hello")
    with pytest.raises(DataError, match=r"sources\[1\]: .*nope\.txt' does not exist"):
        resolve_sources([str(tmp_path / "ok.txt"), str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="matches no file"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    with pytest.raises(DataError, match="holds no file"):
        resolve_sources([str(tmp_path / "empty_dir")])
    with pytest.raises(DataError, match="data.sources is empty"):
        resolve_sources([])
    with pytest.raises(DataError, match="unknown built-in corpus"):
        resolve_sources(["builtin:nosuch/train"])


def test_a_missing_corpus_built_at_setup_names_its_build_command(tmp_path):
    """The documentation-genre recipe names a corpus the repository builds rather than ships: its
    absence says how to build it, where any other missing file gets no such line."""
    with pytest.raises(DataError) as built:
        resolve_sources([str(tmp_path / "data" / "unixdocs.jsonl.xz")])
    assert f"build_unixdocs_corpus.py --out {tmp_path / 'data' / 'unixdocs.jsonl.xz'}" in str(built.value)
    with pytest.raises(DataError) as other:
        resolve_sources([str(tmp_path / "mine.jsonl.xz")])
    assert "built at set-up" not in str(other.value)


def test_directory_listing_order_formats_and_unsupported(tmp_path):
    (tmp_path / "d" / "z").mkdir(parents=True)
    (tmp_path / "d" / ".git").mkdir()
    for name in ("b.txt", "a.jsonl", "z/c.parquet", "x.json", "y.ndjson.gz", "notes.bin", ".DS_Store", ".git/HEAD"):
        (tmp_path / "d" / name).write_bytes(b"")
    items = resolve_sources([str(tmp_path / "d")])
    names = [i.uri.split("/d/")[1] for i in items]
    assert names == sorted(names)
    fmt = {i.uri.split("/d/")[1]: i.fmt for i in items}
    assert fmt == {
        "a.jsonl": "jsonl",
        "b.txt": "text",
        "notes.bin": "skip",
        "x.json": "json",
        "y.ndjson.gz": "jsonl",
        "z/c.parquet": "parquet",
        ".DS_Store": "skip",
        ".git/HEAD": "skip",
    }
    reasons = {i.uri.split("/d/")[1]: [d.reason for d in _docs(i)] for i in items if i.fmt == "skip"}
    assert reasons == {
        "notes.bin": ["unsupported_file_type"],
        ".DS_Store": ["hidden_file"],
        ".git/HEAD": ["hidden_file"],
    }
    # Named explicitly, an unknown extension is read as text; a forced format wins.
    assert resolve_sources([str(tmp_path / "d" / "notes.bin")])[0].fmt == "text"
    forced = resolve_sources([str(tmp_path / "d")], "jsonl")
    assert {i.fmt for i in forced if i.skip_reason != "hidden_file"} == {"jsonl"}


def test_hf_source_parsing_and_offline(monkeypatch):
    assert parse_hf("hf:org/name:train") == ("org/name", None, "train")
    assert parse_hf("hf:name") == ("name", None, None)
    with pytest.raises(DataError, match="bad Hugging Face source"):
        parse_hf("hf:a/b/c")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="needs the Hugging Face hub"):
        resolve_sources(["hf:org/name:train"])


def test_builtin_slices_cover_the_split_once_in_order(monkeypatch):
    monkeypatch.setattr(sources, "_BUILTIN_DOCS_PER_ITEM", 4)
    items = resolve_sources(["builtin:sotu/eval", "builtin:sotu/extra"])
    ids = [d.doc_id for it in items for d in _docs(it)]
    want = [f"sotu/{r['id']}" for r in iter_sotu("eval")] + [f"sotu/{r['id']}" for r in iter_sotu("extra")]
    assert ids == want
    n_eval, n_extra = sum(1 for _ in iter_sotu("eval")), sum(1 for _ in iter_sotu("extra"))
    assert len(items) == -(-n_eval // 4) + -(-n_extra // 4)  # slices of 4 documents
    texts = [d.text for d in _docs(items[0])]
    assert texts[0] == next(iter_sotu("eval"))["text"]


# --------------------------------------------------------------------------- reading


def _one(tmp_path, name, data: bytes, fmt="auto"):
    p = tmp_path / name
    p.write_bytes(data)
    return resolve_sources([str(p)], fmt)[0]


def test_text_files_good_and_bad(tmp_path):
    rng = random.Random()
    t = _words(rng, 50) + "\nnaïve café ✓"
    [d] = _docs(_one(tmp_path, "good.txt", t.encode()))
    assert d.text == t and d.reason == "" and d.doc_id.endswith("good.txt")
    [d] = _docs(_one(tmp_path, "bom.txt", b"\xef\xbb\xbf" + t.encode()))
    assert d.text == t
    cases = {
        "empty.txt": (b"", "empty"),
        "blank.txt": (b"  \n\t\n", "empty"),
        "junk.txt": (bytes(rng.randrange(256) for _ in range(3000)) + b"\x00", "binary"),
        "latin1.txt": (_words(rng, 30).encode() + " caf\xe9".encode("latin-1"), "undecodable"),
    }
    for name, (data, reason) in cases.items():
        [d] = _docs(_one(tmp_path, name, data))
        assert (d.text, d.reason) == (None, reason), name
    [d] = _docs(_one(tmp_path, "latin1b.txt", b"abc \xe9 def"))
    assert "byte 4" in d.detail


def test_jsonl_records(tmp_path):
    rng = random.Random()
    good = [_words(rng, rng.randint(5, 40)) for _ in range(3)]
    lines = [
        json.dumps({"text": good[0], "id": 1}),
        "{not json",
        json.dumps({"body": "x"}),
        "",
        json.dumps({"text": 7}),
        json.dumps([1, 2]),
        json.dumps({"text": good[1]}),
        json.dumps({"text": "   "}),
        json.dumps({"text": None}),
        json.dumps({"text": good[2]}),
    ]
    item = _one(tmp_path, "d.jsonl", ("\n".join(lines) + "\n").encode())
    docs = _docs(item)
    assert [(d.doc_id.rsplit(":", 1)[1], d.reason) for d in docs] == [
        ("1", ""),
        ("2", "invalid_json"),
        ("3", "missing_text_column"),
        ("5", "not_text"),
        ("6", "not_an_object"),
        ("7", ""),
        ("8", "empty"),
        ("9", "empty"),
        ("10", ""),
    ]
    assert [d.text for d in docs if not d.reason] == good
    assert "has: body" in docs[2].detail
    # Other column name; gzip; a line with invalid UTF-8.
    gz = gzip.compress(("\n".join(json.dumps({"content": g}) for g in good) + "\n").encode() + b'{"content": "\xff"}\n')
    docs = _docs(_one(tmp_path, "d.jsonl.gz", gz), "content")
    assert [d.text for d in docs[:3]] == good and docs[3].reason == "undecodable"
    # Binary junk named .jsonl: one skip for the file, not one per "line".
    [d] = _docs(_one(tmp_path, "junk.jsonl", b"\x00\x01\x02" * 1000))
    assert d.reason == "binary"
    [d] = _docs(_one(tmp_path, "blank.jsonl", b"\n\n"))
    assert d.reason == "empty"


def test_json_layouts(tmp_path):
    rng = random.Random()
    a, b = _words(rng, 10), _words(rng, 12)
    docs = _docs(_one(tmp_path, "list.json", json.dumps([{"text": a}, {"title": "t"}, {"text": b}]).encode()))
    assert [(d.doc_id.rsplit(":", 1)[1], d.reason, d.text) for d in docs] == [
        ("0", "", a),
        ("1", "missing_text_column", None),
        ("2", "", b),
    ]
    docs = _docs(_one(tmp_path, "wrapped.json", json.dumps({"data": [{"text": a}]}).encode()))
    assert [d.text for d in docs] == [a]
    [d] = _docs(_one(tmp_path, "single.json", json.dumps({"text": b, "meta": 1}).encode()))
    assert d.text == b and d.doc_id.endswith("single.json")
    [d] = _docs(_one(tmp_path, "broken.json", b'{"text": '))
    assert d.reason == "invalid_json"
    [d] = _docs(_one(tmp_path, "nocol.json", json.dumps({"a": 1, "b": 2}).encode()))
    assert d.reason == "missing_text_column"


def test_parquet(tmp_path):
    rng = random.Random()
    good = [_words(rng, rng.randint(3, 30)) for _ in range(600)]  # > one 256-row read batch
    vals = good[:300] + [None] + good[300:]
    pq.write_table(pa.table({"text": vals, "n": list(range(len(vals)))}), tmp_path / "t.parquet", row_group_size=128)
    docs = _docs(resolve_sources([str(tmp_path / "t.parquet")])[0])
    assert len(docs) == 601 and docs[300].reason == "empty"
    assert [d.text for d in docs if not d.reason] == good
    assert docs[301].doc_id.endswith("t.parquet:301")

    pq.write_table(pa.table({"body": ["a", "b", "c"]}), tmp_path / "nocol.parquet")
    [d] = _docs(resolve_sources([str(tmp_path / "nocol.parquet")])[0])
    assert (d.reason, d.n_docs) == ("missing_text_column", 3)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    [d] = _docs(resolve_sources([str(tmp_path / "ints.parquet")])[0])
    assert (d.reason, d.n_docs) == ("not_text", 2)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    [d] = _docs(resolve_sources([str(tmp_path / "bad.parquet")])[0])
    assert d.reason == "unreadable"


# --------------------------------------------------------------------------- encodings


def _decoded(item, encoding="utf-8", errors="skip", column="text"):
    return list(iter_documents(item, column, sources.Decoding(encoding, errors)))


def test_latin1_text_is_read_with_data_encoding(tmp_path):
    text = "Le café est naïf. " * 20
    item = _one(tmp_path, "latin1.txt", text.encode("latin-1"))
    [skipped] = _decoded(item)
    assert (skipped.text, skipped.reason) == (None, "undecodable") and "not valid utf-8 at byte 6" in skipped.detail
    [doc] = _decoded(item, "latin-1")
    assert (doc.text, doc.reason, doc.replaced) == (text, "", 0)


def test_replace_counts_only_the_characters_it_replaced(tmp_path):
    # one é and one ï per sentence become U+FFFD; the U+FFFD already in the text is not counted
    data = ("Le café est naïf. " * 3).encode("latin-1") + "déjà \ufffd".encode()
    [doc] = _decoded(_one(tmp_path, "mixed.txt", data), errors="replace")
    assert doc.reason == "" and doc.replaced == 6 and doc.text.count("\ufffd") == 7
    assert doc.text.endswith("déjà \ufffd")


def test_jsonl_decodes_line_by_line(tmp_path):
    data = b'{"text": "caf\xe9 au lait"}\n{"text": "fine"}\n{"text": "na\xefve"}\n'
    item = _one(tmp_path, "l.jsonl", data)
    assert [(d.reason, d.replaced) for d in _decoded(item)] == [("undecodable", 0), ("", 0), ("undecodable", 0)]
    assert "of line 3" in _decoded(item)[2].detail
    assert [(d.text, d.replaced) for d in _decoded(item, errors="replace")] == [
        ("caf\ufffd au lait", 1),
        ("fine", 0),
        ("na\ufffdve", 1),
    ]
    assert [d.text for d in _decoded(item, "cp1252")] == ["café au lait", "fine", "naïve"]


def test_utf16_files_are_not_taken_for_binary(tmp_path):
    text = "Grüße aus Köln. " * 10
    [doc] = _decoded(_one(tmp_path, "w.txt", text.encode("utf-16")), "utf-16")
    assert doc.text == text
    lines = "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ("été", "hiver")) + "\n"
    docs = _decoded(_one(tmp_path, "w.jsonl", lines.encode("utf-16")), "utf-16")
    assert [d.text for d in docs] == ["été", "hiver"]


def test_encoding_fields_are_validated_and_change_the_config_hash():
    from linearard_ray.config import ConfigError, DataConfig, build_config
    from linearard_ray.data.manifest import config_payload, hash_payload

    for bad, message in (("utf-9", "unknown text encoding 'utf-9'"), ("rot13", "rot13")):
        with pytest.raises(ConfigError, match=rf"data.encoding: .*{message}"):
            build_config({"data": {"encoding": bad}})
    with pytest.raises(ConfigError, match="data.encoding_errors"):
        build_config({"data": {"encoding_errors": "ignore"}})
    with pytest.raises(
        ConfigError, match=r"data.pack: must be false \(per document\), true \(packed\) or best_fit, not 'bestfit'"
    ):
        build_config({"data": {"pack": "bestfit"}})
    assert [build_config({"data": {"pack": v}}).data.pack for v in (True, "off", "best_fit")] == [
        True,
        False,
        "best_fit",
    ]
    tok = {k: 0 for k in ("vocab_hash", "add_bos", "add_eos", "bos_id", "eos_id", "pad_id")}
    hashes = {
        hash_payload(config_payload(DataConfig(**kw), tok, "inputs"))
        for kw in ({}, {"encoding": "latin-1"}, {"encoding_errors": "replace"})
    }
    assert len(hashes) == 3


# --------------------------------------------------------------------------- the text column


def test_a_missing_column_names_the_columns_found_and_the_field(tmp_path):
    from linearard_ray.config import DataConfig
    from linearard_ray.data.preprocess import _no_block_error, _Stats

    p = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["some text"] * 3, "title": ["a", "b", "c"]}), p)
    [skip] = _docs(resolve_sources([str(p)])[0])
    assert skip.reason == "missing_text_column" and skip.n_docs == 3
    assert skip.detail == "no column 'text' (data.text_column); the file's columns: body, title"
    stats = _Stats()
    stats.skip(skip.doc_id, skip.reason, skip.detail, skip.n_docs)
    msg = str(_no_block_error(stats, DataConfig(sources=[str(p)])))
    assert f"{p}: no column 'text' (data.text_column); the file's columns: body, title" in msg
    assert "set data.text_column" in msg and "lower data.ctx_len" not in msg
    [rec] = _docs(_one(tmp_path, "w.jsonl", b'{"body": "x", "id": 1}\n'))
    assert rec.detail == "no column 'text' (has: body, id; data.text_column)"


# --------------------------------------------------------------------------- Hugging Face configurations

_CARD = """---
pretty_name: two languages
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: en/train-*.jsonl
  - split: validation
    path: en/valid.jsonl
- config_name: de
  data_files: de/*.txt
---
# A corpus in two languages
"""


def _hub(tmp_path):
    """A directory laid out as the hub (datasets/<owner>/<name>/...), read through fsspec as
    HfFileSystem reads the hub."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    return DirFileSystem(path=str(tmp_path / "hub"), fs=LocalFileSystem())


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def card_dataset(tmp_path):
    """A dataset whose card declares two configurations: "en" (the default; split patterns) and "de"
    (one flat pattern, which the hub reads as its train split)."""
    repo = tmp_path / "hub" / "datasets" / "org" / "corpus"
    _write(repo / "README.md", _CARD)
    for i in range(2):
        _write(repo / "en" / f"train-0000{i}.jsonl", json.dumps({"text": f"english train {i}"}) + "\n")
    _write(repo / "en" / "valid.jsonl", json.dumps({"text": "english validation"}) + "\n")
    _write(repo / "en" / "notes" / "train-extra.jsonl", json.dumps({"text": "one folder too deep"}) + "\n")
    _write(repo / "de" / "a.txt", "deutsch a")
    _write(repo / "de" / "b.txt", "deutsch b")
    return _hub(tmp_path)


def _texts(items):
    return sorted(d.text for it in items for d in _docs(it))


@pytest.mark.parametrize(
    "source,want",
    [
        ("hf:org/corpus", ["english train 0", "english train 1", "english validation"]),
        ("hf:org/corpus:validation", ["english validation"]),
        ("hf:org/corpus::validation", ["english validation"]),
        ("hf:org/corpus:en:train", ["english train 0", "english train 1"]),
        ("hf:org/corpus:de:", ["deutsch a", "deutsch b"]),
        ("hf:org/corpus:de:train", ["deutsch a", "deutsch b"]),
    ],
)
def test_hf_card_configurations_and_splits(card_dataset, source, want):
    items = sources.resolve_hf(0, source, hub=card_dataset)
    assert _texts(items) == want
    assert all(it.uri.startswith("hf://datasets/org/corpus/") and it.source == source for it in items)


def test_hf_unknown_configuration_or_split_names_what_there_is(card_dataset):
    with pytest.raises(DataError, match=r"data.sources\[2\]: .*no configuration 'fr'; the dataset has en, de"):
        sources.resolve_hf(2, "hf:org/corpus:fr:train", hub=card_dataset)
    with pytest.raises(DataError, match="configuration 'de' has no split 'test'; it has train"):
        sources.resolve_hf(0, "hf:org/corpus:de:test", hub=card_dataset)
    with pytest.raises(DataError, match="no split 'test'; it has train, validation"):
        sources.resolve_hf(0, "hf:org/corpus:test", hub=card_dataset)


def test_hf_several_configurations_without_a_default_must_be_named(tmp_path):
    repo = tmp_path / "hub" / "datasets" / "corpus"
    _write(repo / "README.md", _CARD.replace("  default: true\n", ""))
    _write(repo / "en" / "valid.jsonl", json.dumps({"text": "english validation"}) + "\n")
    _write(repo / "de" / "a.txt", "deutsch a")
    hub = _hub(tmp_path)
    with pytest.raises(DataError, match=r"configurations en, de and none is the default; name one: hf:corpus:<config>"):
        sources.resolve_hf(0, "hf:corpus", hub=hub)
    assert _texts(sources.resolve_hf(0, "hf:corpus:de:", hub=hub)) == ["deutsch a"]


def test_hf_parquet_conversion_by_configuration_and_split(tmp_path):
    """A dataset without data files of its own (a loading script) is read from the hub's parquet
    conversion, laid out <config>/<split>/NNNN.parquet."""
    repo = tmp_path / "hub" / "datasets" / "org" / "scripted"
    _write(repo / "scripted.py", "# a loading script: not a corpus file")
    converted = tmp_path / "hub" / "datasets" / "org" / "scripted@refs%2Fconvert%2Fparquet"
    for config in ("wiki", "books"):
        for split in ("train", "test"):
            (converted / config / split).mkdir(parents=True)
            table = pa.table({"text": [f"{config} {split} {i}" for i in range(2)]})
            pq.write_table(table, converted / config / split / "0000.parquet")
    hub = _hub(tmp_path)
    assert _texts(sources.resolve_hf(0, "hf:org/scripted:books:test", hub=hub)) == ["books test 0", "books test 1"]
    assert len(_texts(sources.resolve_hf(0, "hf:org/scripted:wiki:", hub=hub))) == 4
    assert len(_texts(sources.resolve_hf(0, "hf:org/scripted:test", hub=hub))) == 4  # no config: as before
    with pytest.raises(DataError, match="no text/jsonl/json/parquet files for configuration 'news' split 'train'"):
        sources.resolve_hf(0, "hf:org/scripted:news:train", hub=hub)


def test_hf_source_grammar():
    assert parse_hf("hf:org/name:wiki:train") == ("org/name", "wiki", "train")
    assert parse_hf("hf:org/name:wiki:") == ("org/name", "wiki", None)
    assert parse_hf("hf:org/name::train") == parse_hf("hf:org/name:train") == ("org/name", None, "train")
    for bad in ("hf:", "hf::train", "hf:org/name:a:b:c", "hf:org/name:wiki/x:train", "hf:a/b/c:train"):
        with pytest.raises(DataError, match=r"bad Hugging Face source .*hf:<dataset>:<config>:\[split\]"):
            parse_hf(bad)
