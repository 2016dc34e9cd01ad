"""The tokenizer actor and the manifest helpers, without Ray (the end-to-end runs are in test_preprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from linearard_ray.data.blocks import cut_document, frame_document, resolve_token_spec
from linearard_ray.data.manifest import MANIFEST, check_output_dir, format_report, staged_output
from linearard_ray.data.sources import DataError
from linearard_ray.data.tokenization import (
    KIND_BLOCK,
    KIND_DOC,
    KIND_SKIP,
    TokenizeCut,
    encode_texts,
    plain_backend,
    tokenizer_payload,
)

CTX, MIN = 16, 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from linearard_ray.models.loading import load_tokenizer
    from linearard_ray.models.tiny import build_tiny_tokenizer

    return plain_backend(load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def _batch(docs: list[tuple[str, str | None, str]]) -> pa.Table:
    return pa.table(
        {
            "doc_id": [d for d, _, _ in docs],
            "text": pa.array([t for _, t, _ in docs], type=pa.large_string()),
            "reason": [r for _, _, r in docs],
            "detail": ["why" if r else "" for _, _, r in docs],
            "n_docs": [1] * len(docs),
        }
    )


def _actor(tok, pack: bool) -> TokenizeCut:
    spec = resolve_token_spec(tok, None, True, pack)
    return TokenizeCut(tokenizer_payload(tok, "unused"), spec.to_dict(), CTX, "drop", MIN, pack)


LONG = "the state of the union is strong and the people know it " * 6
DOCS = [("bad", None, "binary"), ("short", "hi", ""), ("medium", "the people of the union", ""), ("long", LONG, "")]


def test_actor_rows_skip_and_cut_like_the_block_functions(tok):
    out = _actor(tok, pack=False)(_batch(DOCS))
    rows = out.to_pylist()
    skips = {r["doc_id"]: r["reason"] for r in rows if r["kind"] == KIND_SKIP}
    assert skips == {"bad": "binary", "short": "too_short", "medium": "no_full_block"}
    spec = resolve_token_spec(tok, None, True, False)
    ids = frame_document(encode_texts(tok, [LONG])[0], spec)
    blocks, dropped = cut_document(ids, "long", CTX, "drop", spec.pad_id)
    got = [r for r in rows if r["kind"] == KIND_BLOCK]
    assert [r["block_index"] for r in got] == [b.block_index for b in blocks]
    assert [r["input_ids"] for r in got] == [b.input_ids.tolist() for b in blocks]
    assert [r["attention_mask"] for r in got] == [b.attention_mask.tolist() for b in blocks]
    # Only block 0 carries the document's token and dropped counts.
    assert [(r["n_tokens"], r["dropped"]) for r in got] == [(len(ids), dropped)] + [(0, 0)] * (len(got) - 1)


def test_actor_passes_framed_documents_on_when_packing(tok):
    rows = _actor(tok, pack=True)(_batch(DOCS)).to_pylist()
    docs = [r for r in rows if r["kind"] == KIND_DOC]
    spec = resolve_token_spec(tok, None, True, True)
    want = [frame_document(e, spec).tolist() for e in encode_texts(tok, ["the people of the union", LONG])]
    assert [r["doc_id"] for r in docs] == ["medium", "long"]
    assert [r["input_ids"] for r in docs] == want
    assert [r["n_tokens"] for r in docs] == [len(w) for w in want]


def test_staged_output_replaces_the_directory_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00000.parquet").write_text("old")
    with pytest.raises(RuntimeError), staged_output(out) as staging:
        (staging / "shard-00000.parquet").write_text("new")
        raise RuntimeError("interrupted")
    assert (out / "shard-00000.parquet").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_output(out) as staging:
        (staging / MANIFEST).write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


def test_output_dir_refuses_foreign_files_and_object_stores(tmp_path):
    check_output_dir(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds other files"):
        check_output_dir(tmp_path)
    with pytest.raises(DataError, match="object-store"):
        check_output_dir(Path("s3://bucket/out"))


def test_report_lists_skips_and_counts_the_rest():
    m = {
        "sources": ["a"],
        "input_files": 1,
        "tokenizer": {"name": "t", "vocab_size": 9, "add_bos": False, "add_eos": True},
        "docs_read": 5,
        "docs_used": 1,
        "docs_skipped": 4,
        "tokens": 10,
        "tokens_in_blocks": 8,
        "tokens_dropped": 2,
        "pad_tokens": 0,
        "blocks": 1,
        "ctx_len": 8,
        "pack": False,
        "tail": "drop",
        "shards": [{}],
        "wall_time_s": 1.0,
        "tokens_per_s": 10.0,
        "skipped_by_reason": {"empty": 4},
        "skipped": [{"doc_id": "p.parquet", "detail": "unreadable", "docs": 3}, {"doc_id": "e", "detail": "empty"}],
    }
    text = format_report(json.loads(json.dumps(m)), "dir", max_skips=1)
    assert text.splitlines()[0] == "preprocessed data: dir"
    assert "    - p.parquet: unreadable (3 documents)" in text
    assert text.endswith("… and 1 more (see manifest.json)")
