"""End-to-end preprocessing through Ray Data (2 CPUs, one cluster for the module).

Expected counts and block contents are computed directly from the files written by the test and
an independent tokenization (the tokenizer's own __call__), not from the pipeline.
"""

from __future__ import annotations

import gzip
import json
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linearard_ray.config import DataConfig, build_config
from linearard_ray.data.preprocess import (
    DataError,
    ensure_preprocessed,
    format_report,
    load_blocks,
    preprocess,
    read_manifest,
)
from tests.local_ray import local_ray

pytestmark = pytest.mark.slow

CTX, MIN, ROWS = 64, 12, 30


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2, log_to_driver=False):
        yield


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from linearard_ray.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(n))


class Corpus:
    """Files on disk plus what each document in them should become."""

    def __init__(self, root: Path):
        self.root = root
        self.docs: list[tuple[str, str | None, str, int]] = []  # doc_id, text, expected skip reason, docs

    def add(self, doc_id: str, text: str | None, reason: str = "", n: int = 1) -> None:
        self.docs.append((doc_id, text, reason, n))


def _make_corpus(root: Path) -> Corpus:
    rng = random.Random()
    root.mkdir()
    c = Corpus(root)

    def long():
        return _words(rng, rng.randint(150, 400))

    def medium():  # enough tokens for min_doc_tokens, not for one block: no_full_block
        return _words(rng, rng.randint(6, 9))

    def short():
        return _words(rng, 1)

    for name, text in (("a_long.txt", long()), ("b_medium.txt", medium()), ("c_short.txt", short())):
        (root / name).write_text(text)
        c.add(str(root / name), text)
    (root / "empty.txt").write_bytes(b"")
    c.add(str(root / "empty.txt"), None, "empty")
    (root / "junk.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)) + b"\x00")
    c.add(str(root / "junk.txt"), None, "binary")
    (root / "latin1.txt").write_bytes(_words(rng, 200).encode() + " caf\xe9".encode("latin-1"))
    c.add(str(root / "latin1.txt"), None, "undecodable")
    (root / "notes.bin").write_bytes(b"\x01\x02")
    c.add(str(root / "notes.bin"), None, "unsupported_file_type")

    lines, p = [], root / "sub" / "d.jsonl"
    p.parent.mkdir()
    recs = [
        ({"text": long()}, ""),
        ("{broken", "invalid_json"),
        ({"body": long()}, "missing_text_column"),
        ({"text": 3}, "not_text"),
        ({"text": short()}, ""),
        ({"text": long()}, ""),
        ({"text": medium()}, ""),
    ]
    rng.shuffle(recs)
    for i, (rec, reason) in enumerate(recs, start=1):
        lines.append(rec if isinstance(rec, str) else json.dumps(rec))
        c.add(f"{p}:{i}", None if reason else rec["text"], reason)
    p.write_text("\n".join(lines) + "\n")

    p = root / "sub" / "e.jsonl.gz"
    texts = [long(), long()]
    p.write_bytes(gzip.compress(("\n".join(json.dumps({"text": t}) for t in texts) + "\n").encode()))
    for i, t in enumerate(texts, start=1):
        c.add(f"{p}:{i}", t)

    p = root / "f.json"
    recs = [{"text": long()}, {"title": "no text"}, {"text": long()}]
    p.write_text(json.dumps(recs))
    for i, r in enumerate(recs):
        c.add(f"{p}:{i}", r.get("text"), "" if "text" in r else "missing_text_column")

    p = root / "g.parquet"
    vals = [long(), None, medium(), long()]
    pq.write_table(pa.table({"text": vals}), p)
    for i, v in enumerate(vals):
        c.add(f"{p}:{i}", v, "" if v else "empty")

    p = root / "h.parquet"
    pq.write_table(pa.table({"body": [long() for _ in range(5)]}), p)
    c.add(str(p), None, "missing_text_column", 5)
    c.docs.sort(key=lambda d: d[0])
    return c


def _expected(corpus: Corpus, tok, ctx: int, min_tokens: int, tail: str = "drop") -> dict:
    """What the manifest must say and each used document's token ids (EOS appended, no BOS)."""
    out = {"docs_read": 0, "docs_used": 0, "by_reason": {}, "tokens": 0, "blocks": 0, "dropped": 0, "ids": {}}
    for doc_id, text, reason, n in corpus.docs:
        out["docs_read"] += n
        if not reason:
            content = tok(text, add_special_tokens=False)["input_ids"]
            ids = content + [tok.eos_token_id]
            if len(content) < min_tokens:
                reason = "too_short"
            elif len(ids) < ctx and tail == "drop":
                reason = "no_full_block"
            else:
                out["docs_used"] += 1
                out["tokens"] += len(ids)
                out["blocks"] += len(ids) // ctx + (1 if tail == "pad" and len(ids) % ctx else 0)
                out["dropped"] += len(ids) % ctx if tail == "drop" else 0
                out["ids"][doc_id] = ids
        if reason:
            out["by_reason"][reason] = out["by_reason"].get(reason, 0) + n
    return out


def _read_shards(out: Path) -> pa.Table:
    m = read_manifest(out)
    return pa.concat_tables([pq.read_table(out / s["file"]) for s in m["shards"]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _make_corpus(tmp_path_factory.mktemp("corpus") / "c")


def _cfg(sources, out, **kw) -> DataConfig:
    base = dict(
        sources=[str(s) for s in sources],
        ctx_len=CTX,
        min_doc_tokens=MIN,
        output_dir=str(out),
        rows_per_shard=ROWS,
        tokenizer_batch_size=4,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def first_run(ray_cluster, corpus, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "first"
    return preprocess(_cfg([corpus.root], out), tok_dir, progress=False)


def test_end_to_end_counts_and_blocks(first_run, corpus, tok):
    exp = _expected(corpus, tok, CTX, MIN)
    # Every kind of bad input is in the corpus, so each count below is exercised.
    assert set(exp["by_reason"]) == {
        "empty",
        "binary",
        "undecodable",
        "unsupported_file_type",
        "invalid_json",
        "missing_text_column",
        "not_text",
        "too_short",
        "no_full_block",
    }
    m = read_manifest(first_run)
    assert m["docs_read"] == exp["docs_read"]
    assert m["docs_used"] == exp["docs_used"]
    assert m["docs_skipped"] == exp["docs_read"] - exp["docs_used"]
    assert m["skipped_by_reason"] == dict(sorted(exp["by_reason"].items()))
    assert m["tokens"] == exp["tokens"] and m["blocks"] == exp["blocks"] and m["tokens_dropped"] == exp["dropped"]
    assert m["tokens_in_blocks"] == m["tokens"] - m["tokens_dropped"] and m["pad_tokens"] == 0
    assert sum(s.get("docs", 1) for s in m["skipped"]) == m["docs_skipped"]
    assert {s["doc_id"] for s in m["skipped"]} >= {d[0] for d in corpus.docs if d[2]}
    n_files = sum(1 for p in corpus.root.rglob("*") if p.is_file())
    assert (m["ctx_len"], m["seed"], m["input_files"]) == (CTX, 0, n_files)
    assert m["tokenizer"]["vocab_size"] == len(tok.get_vocab()) and m["wall_time_s"] > 0

    t = _read_shards(first_run)
    assert t.schema.field("input_ids").type == pa.list_(pa.int32())
    assert t.schema.field("attention_mask").type == pa.list_(pa.int8())
    assert t.schema.field("block_index").type == pa.int32() and t.num_rows == exp["blocks"]
    assert exp["blocks"] > ROWS  # several shards
    assert [s["rows"] for s in m["shards"]] == [min(ROWS, exp["blocks"] - i) for i in range(0, exp["blocks"], ROWS)]
    rows = t.to_pylist()
    by_doc: dict[str, dict[int, list[int]]] = {}
    for r in rows:
        assert len(r["input_ids"]) == CTX and r["attention_mask"] == [1] * CTX
        by_doc.setdefault(r["doc_id"], {})[r["block_index"]] = r["input_ids"]
    assert set(by_doc) == set(exp["ids"])
    for doc_id, blocks in by_doc.items():
        ids = exp["ids"][doc_id]
        assert sorted(blocks) == list(range(len(ids) // CTX))
        assert sum((blocks[i] for i in sorted(blocks)), []) == ids[: len(ids) // CTX * CTX]
    # Shuffled: not in document order.
    assert [(r["doc_id"], r["block_index"]) for r in rows] != sorted((r["doc_id"], r["block_index"]) for r in rows)


def test_same_input_and_config_give_identical_bytes(first_run, corpus, tok_dir, tmp_path):
    again = preprocess(_cfg([corpus.root], tmp_path / "again", tokenizer_actors=2), tok_dir, progress=False)
    m1, m2 = read_manifest(first_run), read_manifest(again)
    assert m1["config_hash"] == m2["config_hash"]
    assert [s["file"] for s in m1["shards"]] == [s["file"] for s in m2["shards"]]
    for s in m1["shards"]:
        assert (first_run / s["file"]).read_bytes() == (again / s["file"]).read_bytes()
    # Another seed: the same blocks in another order.
    other = preprocess(_cfg([corpus.root], tmp_path / "seed1", seed=1), tok_dir, progress=False)
    a, b = _read_shards(first_run).to_pylist(), _read_shards(other).to_pylist()
    key = lambda r: (r["doc_id"], r["block_index"])  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key) and [key(r) for r in a] != [key(r) for r in b]
    assert read_manifest(other)["config_hash"] != m1["config_hash"]


def test_load_blocks(first_run):
    ds = load_blocks(first_run)
    got = [(r["doc_id"], int(r["block_index"]), [int(x) for x in r["input_ids"]]) for r in ds.iter_rows()]
    want = [(r["doc_id"], r["block_index"], r["input_ids"]) for r in _read_shards(first_run).to_pylist()]
    assert got == want and len(got) == read_manifest(first_run)["blocks"]  # every block, in the order written
    assert set(ds.schema().names) == {"input_ids", "attention_mask", "doc_id", "block_index"}


def test_pack_and_pad(ray_cluster, corpus, tok, tok_dir, tmp_path):
    exp = _expected(corpus, tok, CTX, MIN, tail="pad")
    out = preprocess(_cfg([corpus.root], tmp_path / "pad", tail="pad", shuffle=False), tok_dir, progress=False)
    m = read_manifest(out)
    assert (m["docs_used"], m["blocks"], m["tokens"]) == (exp["docs_used"], exp["blocks"], exp["tokens"])
    assert "no_full_block" not in m["skipped_by_reason"] and m["tokens_dropped"] == 0
    rows = _read_shards(out).to_pylist()
    # Unshuffled: document order, blocks in order; the tail block padded with the pad id, mask 0.
    assert [r["doc_id"] for r in rows] == sorted((r["doc_id"] for r in rows), key=[d[0] for d in corpus.docs].index)
    assert sum(sum(r["attention_mask"]) for r in rows) == m["tokens_in_blocks"] == exp["tokens"]
    assert m["pad_tokens"] == m["blocks"] * CTX - exp["tokens"]
    for doc_id, ids in exp["ids"].items():
        mine = [r for r in rows if r["doc_id"] == doc_id]
        flat = [t for r in mine for t, k in zip(r["input_ids"], r["attention_mask"], strict=False) if k]
        assert flat == ids
        pad = [t for r in mine for t, k in zip(r["input_ids"], r["attention_mask"], strict=False) if not k]
        assert pad == [tok.pad_token_id] * (-len(ids) % CTX)

    packed = preprocess(_cfg([corpus.root], tmp_path / "pack", pack=True, shuffle=False), tok_dir, progress=False)
    m = read_manifest(packed)
    exp = _expected(corpus, tok, 1, MIN)  # packing keeps every document long enough for min_doc_tokens
    stream = [t for d in corpus.docs if d[0] in exp["ids"] for t in exp["ids"][d[0]]]
    rows = _read_shards(packed).to_pylist()
    assert m["docs_used"] == exp["docs_used"] and m["tokens"] == len(stream)
    assert m["blocks"] == len(stream) // CTX and m["tokens_dropped"] == len(stream) % CTX
    assert [r["block_index"] for r in rows] == list(range(len(rows)))
    assert [t for r in rows for t in r["input_ids"]] == stream[: len(rows) * CTX]
    assert any("+" in r["doc_id"] for r in rows)  # blocks cross document boundaries
    bounds = np.cumsum([0] + [len(exp["ids"][d[0]]) for d in corpus.docs if d[0] in exp["ids"]])
    split = sum(b - a <= CTX and a // CTX != (b - 1) // CTX for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert m["docs_split"] == split > 0 and f"split: {split} documents no longer than a block" in format_report(m)

    fitted = preprocess(_cfg([corpus.root], tmp_path / "fit", pack="best_fit", shuffle=False), tok_dir, progress=False)
    m = read_manifest(fitted)
    rows = _read_shards(fitted).to_pylist()
    assert (m["pack"], m["docs_used"], m["tokens"]) == ("best_fit", exp["docs_used"], len(stream))
    assert m["tokens_in_blocks"] == len(stream) and m["tokens_dropped"] == 0 and m["docs_split"] == 0
    assert "best-fit packed)" in format_report(m) and "split:" not in format_report(m)
    assert m["pad_tokens"] == sum(CTX - sum(r["attention_mask"]) for r in rows) and len(rows) == m["blocks"]
    held = [[t for t, k in zip(r["input_ids"], r["attention_mask"], strict=False) if k] for r in rows]
    for doc_id, ids in exp["ids"].items():  # whole: full blocks from its start, then its remainder in one block
        n_full = len(ids) // CTX
        for i in range(n_full):
            assert ids[i * CTX : (i + 1) * CTX] in held
        rest = ids[n_full * CTX :]
        assert not rest or any(_holds(h, rest) for h in held), doc_id


def _holds(seq: list, part: list) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_no_usable_block_is_an_error(ray_cluster, corpus, tok_dir, tmp_path):
    out = tmp_path / "none"
    with pytest.raises(DataError, match=r"no usable block.*too_short"):
        preprocess(_cfg([corpus.root / "c_short.txt", corpus.root / "empty.txt"], out), tok_dir, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".none*"))


def test_encoding_replace_keeps_and_counts_what_skip_drops(ray_cluster, tok_dir, tmp_path):
    """A latin-1 file: skipped and counted under the default (utf-8, skip), read whole with
    data.encoding=latin-1, kept with its undecodable bytes as U+FFFD (counted) under replace; each
    setting has its own config hash, so no run reuses another's blocks."""
    rng = random.Random(1)
    src = tmp_path / "latin1.txt"
    body = " ".join(_words(rng, 60) + " caf\xe9 na\xefve" for _ in range(4))
    src.write_bytes(body.encode("latin-1"))
    runs = {}
    for name, kw in {"latin": {"encoding": "latin-1"}, "replace": {"encoding_errors": "replace"}}.items():
        out = preprocess(_cfg([src], tmp_path / name, **kw), tok_dir, progress=False)
        runs[name] = read_manifest(out)
    assert runs["latin"]["docs_used"] == 1 and runs["latin"]["chars_replaced"] == 0
    assert runs["replace"]["docs_used"] == 1 and runs["replace"]["docs_replaced"] == 1
    assert runs["replace"]["chars_replaced"] == 8  # é and ï in each of the 4 pieces
    assert runs["replace"]["encoding_errors"] == "replace" and runs["latin"]["encoding"] == "latin-1"
    assert runs["latin"]["config_hash"] != runs["replace"]["config_hash"]
    assert "8 undecodable characters replaced with U+FFFD in 1 used documents" in format_report(runs["replace"])
    with pytest.raises(DataError, match=r"(?s)undecodable: 1.*not valid utf-8 at byte .*set data.encoding"):
        preprocess(_cfg([src], tmp_path / "skip"), tok_dir, progress=False)


def test_wrong_text_column_names_the_file_its_columns_and_the_field(ray_cluster, tok_dir, tmp_path):
    p = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["x " * 300], "title": ["t"]}), p)
    with pytest.raises(DataError) as err:
        preprocess(_cfg([p], tmp_path / "out"), tok_dir, progress=False)
    msg = str(err.value)
    assert str(p) in msg and "no column 'text' (data.text_column)" in msg and "columns: body, title" in msg
    assert "set data.text_column" in msg and "lower data.ctx_len" not in msg


def test_missing_source_fails_before_work(tok_dir, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(DataError, match=r"data.sources\[1\]: .*missing.txt' does not exist"):
        preprocess(_cfg(["builtin:sotu/extra", tmp_path / "missing.txt"], out), tok_dir, progress=False)
    assert not out.exists()


def test_output_dir_with_foreign_files_is_refused(corpus, tok_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        preprocess(_cfg([corpus.root], tmp_path / "busy"), tok_dir, progress=False)


def test_ensure_preprocessed_reuses_and_lm_stream(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_model_dir("llama")
    cfg = build_config(
        {
            "model": {"teacher": "tiny:llama"},
            "data": {"sources": ["builtin:sotu/extra"], "ctx_len": 256, "lm_ctx_len": 512},
        }
    )
    main = ensure_preprocessed(cfg, progress=False)
    # the default directory, relative to the working directory, made absolute for the workers
    assert main.parent == (tmp_path / "outputs" / "data").resolve() and read_manifest(main)["ctx_len"] == 256
    stamp = (main / "manifest.json").stat().st_mtime_ns
    assert ensure_preprocessed(cfg, progress=False) == main
    assert (main / "manifest.json").stat().st_mtime_ns == stamp  # reused, not redone
    lm = ensure_preprocessed(cfg, stream="lm", progress=False)
    assert lm != main and read_manifest(lm)["ctx_len"] == 512
    # Pointing data.preprocessed at it uses it as it is.
    cfg2 = build_config({"model": {"teacher": "tiny:llama"}, "data": {"preprocessed": str(main)}})
    assert ensure_preprocessed(cfg2, progress=False) == main
    with pytest.raises(DataError, match="has no manifest.json"):
        ensure_preprocessed(build_config({"model": {"teacher": "tiny:llama"}, "data": {"preprocessed": str(tmp_path)}}))


def test_cli(ray_cluster, tiny_model_dir, tmp_path, capsys):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "pipelines"))
    try:
        import preprocess as cli
    finally:
        sys.path.pop(0)
    tiny_model_dir("llama")
    out = tmp_path / "cli"
    rc = cli.main(
        [
            "--quiet",
            "--set",
            "model.teacher=tiny:llama",
            "--set",
            "data.sources=[builtin:sotu/extra]",
            "--set",
            "data.ctx_len=128",
            "--set",
            f"data.output_dir={out}",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"preprocessed data: {out}" in printed and f"{read_manifest(out)['blocks']} x 128 tokens" in printed
    rc = cli.main(["--quiet", "--set", "model.teacher=tiny:llama", "--set", f"data.sources=[{tmp_path}/none*.txt]"])
    assert rc == 2 and "matches no file" in capsys.readouterr().err  # the user's data: exit 2
    help_text = subprocess.run(
        [sys.executable, "pipelines/preprocess.py", "--help"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert "data.ctx_len" in help_text and "data.pack" in help_text and "train.lr" not in help_text
