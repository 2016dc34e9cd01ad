"""Evaluation texts: loading every source kind, seeded non-overlapping windows, concatenation and
skips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from linearard_ray.evaluation.texts import TextsError, load_documents, make_windows


def _rand_docs(rng, lengths):
    return [rng.integers(3, 500, size=n).astype(np.int64) for n in lengths]


def test_load_every_source_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("first text document")
    (tmp_path / "txt" / "b.txt").write_text("   \n")  # empty: counted, not kept
    (tmp_path / "txt" / "ignored.bin").write_bytes(b"\x00")
    with open(tmp_path / "d.jsonl", "w") as f:
        f.write(json.dumps({"id": "j1", "body": "jsonl one"}) + "\n\n" + json.dumps({"body": "jsonl two"}) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "json one"}, {"body": ""}]))
    pq.write_table(pa.table({"body": ["pq one", "pq two"], "id": ["p1", "p2"]}), tmp_path / "d.parquet")
    ds = load_documents(
        [str(tmp_path / "txt"), str(tmp_path / "d.jsonl"), str(tmp_path / "*.json"), str(tmp_path / "d.parquet")],
        text_column="body",
    )
    assert [d.text for d in ds.documents] == [
        "first text document",
        "jsonl one",
        "jsonl two",
        "json one",
        "pq one",
        "pq two",
    ]
    assert [d.id for d in ds.documents][:2] == ["a", "j1"] and ds.documents[-1].id == "p2"
    assert ds.empty_skipped == 2


def test_builtin_sources():
    faq = load_documents(["builtin:pydocs/faq"])
    assert len(faq.documents) >= 5 and all(len(d.text) > 1000 for d in faq.documents)
    assert "Python" in faq.documents[0].text
    sotu = load_documents(["builtin:sotu/eval"])
    assert len(sotu.documents) == 27  # 1990–2016


def test_bad_sources(tmp_path):
    with pytest.raises(TextsError, match="no such file"):
        load_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(TextsError, match="unknown built-in corpus"):
        load_documents(["builtin:nope"])
    with pytest.raises(TextsError, match="only local paths"):
        load_documents(["s3://bucket/x.txt"])
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "a"}) + "\n")
    with pytest.raises(TextsError, match="no field 'text'"):
        load_documents([str(tmp_path / "x.jsonl")])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(TextsError, match="no non-empty document"):
        load_documents([str(tmp_path / "e.txt")])
    with pytest.raises(TextsError, match="no evaluation text"):
        load_documents([])


def test_single_document_windows_are_exact_non_overlapping_and_seeded():
    rng = np.random.default_rng(0)
    docs = _rand_docs(rng, [300, 95, 410, 64, 250])
    ids = [f"d{i}" for i in range(len(docs))]
    L, n = 64, 6
    ws = make_windows(docs, ids, L, n, seed=5)
    assert ws.construction == "single documents" and ws.n == n and ws.windows.shape == (n, L)
    seen = set()
    for w, d, s in zip(ws.windows, ws.doc_ids, ws.starts, strict=False):
        src = docs[ids.index(d[0])]
        assert s % L == 0 and s + L <= len(src)
        np.testing.assert_array_equal(w, src[s : s + L])
        seen.add((d[0], s))
    assert len(seen) == n  # non-overlapping: distinct aligned slots
    assert ws.pool == sum(len(t) // L for t in docs)
    again = make_windows(docs, ids, L, n, seed=5)
    np.testing.assert_array_equal(again.windows, ws.windows)
    other = [make_windows(docs, ids, L, n, seed=s).starts for s in range(6, 12)]
    assert any(o != ws.starts for o in other)


def test_concatenated_windows_when_documents_are_short():
    rng = np.random.default_rng(1)
    docs = _rand_docs(rng, [40, 55, 30, 70, 45, 60])
    ids = [f"d{i}" for i in range(len(docs))]
    sep = 1
    ws = make_windows(docs, ids, 100, 2, seed=0, separator=sep)
    assert ws.construction == "concatenated documents"
    stream = np.concatenate([np.concatenate([[sep], t]) if i else t for i, t in enumerate(docs)])
    for w, s in zip(ws.windows, ws.starts, strict=False):
        np.testing.assert_array_equal(w, stream[s : s + 100])
    assert ws.docs_per_window > 1 and all(len(d) >= 2 for d in ws.doc_ids)


def test_fewer_windows_than_asked_and_skip():
    rng = np.random.default_rng(2)
    docs = _rand_docs(rng, [50, 50, 50])
    ids = ["a", "b", "c"]
    ws = make_windows(docs, ids, 70, 8, seed=0, separator=1)
    assert ws.n == 2 and ws.requested == 8 and not ws.skipped  # 152 joined tokens hold two windows
    sk = make_windows(docs, ids, 1000, 8, seed=0, separator=1)
    assert sk.skipped and sk.windows is None and "needs 1000 tokens" in sk.skipped_reason
    assert sk.describe()["skipped"] is True and "reason" in sk.describe()


def test_prefix_counts_toward_length():
    rng = np.random.default_rng(3)
    docs = _rand_docs(rng, [500])
    ws = make_windows(docs, ["a"], 33, 4, seed=0, prefix=[0])
    assert ws.windows.shape == (4, 33) and (ws.windows[:, 0] == 0).all()
    for w, s in zip(ws.windows, ws.starts, strict=False):
        np.testing.assert_array_equal(w[1:], docs[0][s : s + 32])
