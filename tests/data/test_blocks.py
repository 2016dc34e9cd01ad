"""Cutting, packing, special tokens, seeded shuffle and shard writing (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linearard_ray.data.blocks import (
    BestFitPacker,
    Packer,
    cut_document,
    frame_document,
    resolve_token_spec,
    tokenizer_adds_bos,
    vocab_hash,
)
from linearard_ray.data.shards import BLOCK_SCHEMA, ShardWriter, Shuffler, blocks_table, shuffle_keys


def _rand_doc(rng, n):
    return rng.integers(3, 500, size=n).astype(np.int32)


@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_cut_document_matches_direct_slicing(tail):
    rng = np.random.default_rng()
    ctx = int(rng.integers(5, 40))
    for n in [1, ctx - 1, ctx, ctx + 1, 3 * ctx, int(rng.integers(1, 10 * ctx))]:
        ids = _rand_doc(rng, n)
        blocks, dropped = cut_document(ids, "d", ctx, tail, pad_id=-7)
        n_full = n // ctx
        rest = n - n_full * ctx
        assert len(blocks) == n_full + (1 if tail == "pad" and rest else 0)
        assert dropped == (rest if tail == "drop" else 0)
        for i, b in enumerate(blocks):
            assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int8
            assert len(b.input_ids) == ctx and b.block_index == i and b.doc_id == "d"
            want = ids[i * ctx : (i + 1) * ctx]
            k = len(want)
            np.testing.assert_array_equal(b.input_ids[:k], want)
            np.testing.assert_array_equal(b.input_ids[k:], np.full(ctx - k, -7))
            np.testing.assert_array_equal(b.attention_mask, (np.arange(ctx) < k).astype(np.int8))
        assert sum(int(b.attention_mask.sum()) for b in blocks) + dropped == n


@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_packer_equals_cutting_the_concatenation(tail):
    rng = np.random.default_rng()
    ctx = int(rng.integers(4, 50))
    docs = [_rand_doc(rng, int(rng.integers(1, 3 * ctx))) for _ in range(int(rng.integers(5, 30)))]
    names = [f"doc{i}" for i in range(len(docs))]
    p = Packer(ctx, tail, pad_id=0)
    out = [b for name, d in zip(names, docs, strict=False) for b in p.add(name, d)]
    last, dropped = p.finish()
    out += last
    ref, ref_dropped = cut_document(np.concatenate(docs), "all", ctx, tail, 0)
    assert dropped == ref_dropped and len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref, strict=False)):
        assert a.block_index == i
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
    # Each block names exactly the documents whose tokens it holds, in order.
    bounds = np.cumsum([0] + [len(d) for d in docs])
    starts, ends = bounds[:-1], bounds[1:] - 1  # first and last token of each document in the stream
    assert p.docs_split == sum(e - s < ctx and s // ctx != e // ctx for s, e in zip(starts, ends, strict=True))
    for i, blk in enumerate(out):
        lo, hi = i * ctx, min((i + 1) * ctx, bounds[-1])
        want = [names[j] for j in range(len(docs)) if bounds[j] < hi and bounds[j + 1] > lo]
        got = blk.doc_id.split("+")
        if len(want) > 8:
            assert got[:8] == want[:8] and got[8] == f"…({len(want) - 8} more)"
        else:
            assert got == want


def _best_fit(docs: dict[str, np.ndarray], ctx: int, max_open: int = 64) -> list:
    p = BestFitPacker(ctx, pad_id=-1, max_open=max_open)
    out = [b for name, d in docs.items() for b in p.add(name, d)]
    last, dropped = p.finish()
    assert dropped == 0 and p.docs_split == 0
    return out + last


def test_best_fit_keeps_every_token_and_splits_no_short_document():
    rng = np.random.default_rng()
    ctx = int(rng.integers(8, 60))
    max_open = int(rng.integers(1, 6))
    # Every token id is unique, so each token's place in the blocks tells which document it is from.
    lengths = [int(rng.integers(1, 4 * ctx)) for _ in range(int(rng.integers(5, 60)))]
    ids = rng.permutation(sum(lengths)).astype(np.int32) + 10
    bounds = np.cumsum([0, *lengths])
    docs = {f"doc{i}": ids[bounds[i] : bounds[i + 1]] for i in range(len(lengths))}
    out = _best_fit(docs, ctx, max_open)
    assert [b.block_index for b in out] == list(range(len(out)))
    where = {}  # token -> (block, position)
    for k, b in enumerate(out):
        n = int(b.attention_mask.sum())
        assert len(b.input_ids) == ctx and b.input_ids.dtype == np.int32
        np.testing.assert_array_equal(b.attention_mask, (np.arange(ctx) < n).astype(np.int8))
        assert (b.input_ids[n:] == -1).all()
        where.update({int(t): (k, j) for j, t in enumerate(b.input_ids[:n])})
    assert sorted(where) == sorted(ids.tolist())  # nothing dropped, nothing twice
    for name, d in docs.items():
        n_full = len(d) // ctx
        for i in range(n_full):  # a long document's full blocks: its own, cut from its start
            block = out[where[int(d[i * ctx])][0]]
            assert block.doc_id == name
            np.testing.assert_array_equal(block.input_ids, d[i * ctx : (i + 1) * ctx])
        rest = d[n_full * ctx :]
        if len(rest):  # the remainder (or a short document) lies whole, in order, in one block
            k, j = where[int(rest[0])]
            np.testing.assert_array_equal(out[k].input_ids[j : j + len(rest)], rest)
            assert name in out[k].doc_id.split("+") or "more)" in out[k].doc_id


def test_best_fit_chooses_the_tightest_open_block_and_closes_the_fullest_when_full():
    doc = lambda n, first: np.arange(first, first + n, dtype=np.int32)  # noqa: E731
    # ctx 10: a (5) and b (6) open two blocks; c (4) fills b's 4 free exactly, not the older a's 5.
    out = _best_fit({"a": doc(5, 100), "b": doc(6, 200), "c": doc(4, 300)}, ctx=10)
    assert [(b.doc_id, int(b.attention_mask.sum())) for b in out] == [("b+c", 10), ("a", 5)]
    # One open block at most: b does not fit a's block, which is closed padded first.
    out = _best_fit({"a": doc(5, 100), "b": doc(6, 200), "c": doc(4, 300)}, ctx=10, max_open=1)
    assert [(b.doc_id, int(b.attention_mask.sum())) for b in out] == [("a", 5), ("b+c", 10)]
    # A long document gives its own full blocks; its remainder is packed like a short document.
    out = _best_fit({"a": doc(3, 100), "long": doc(27, 200)}, ctx=10)
    assert [b.doc_id for b in out] == ["long", "long", "a+long"]
    np.testing.assert_array_equal(out[2].input_ids[:10], np.r_[doc(3, 100), doc(7, 220)])


def test_frame_document_and_token_spec(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    content = np.array([10, 11, 12], dtype=np.int32)
    spec = resolve_token_spec(tok, None, True, pack=False)
    assert spec.add_bos == tokenizer_adds_bos(tok)
    assert (spec.eos_id, spec.pad_id) == (tok.eos_token_id, tok.pad_token_id)
    spec = resolve_token_spec(tok, True, False, pack=False)
    np.testing.assert_array_equal(frame_document(content, spec), [tok.bos_token_id, 10, 11, 12])
    # Packing always separates documents with EOS.
    spec = resolve_token_spec(tok, False, False, pack=True)
    np.testing.assert_array_equal(frame_document(content, spec), [10, 11, 12, tok.eos_token_id])
    tok.eos_token = None
    with pytest.raises(ValueError, match="packing needs an EOS"):
        resolve_token_spec(tok, False, False, pack=True)
    h1 = vocab_hash(tok)
    tok.add_tokens(["<brand_new_token>"])
    assert vocab_hash(tok) != h1


def test_shuffle_keys_are_a_seeded_permutation():
    pos = np.arange(100_000, dtype=np.uint64)
    k0, k0b, k1 = shuffle_keys(pos, 0), shuffle_keys(pos, 0), shuffle_keys(pos, 1)
    assert len(np.unique(k0)) == len(pos)
    np.testing.assert_array_equal(k0, k0b)
    assert (k0 != k1).mean() > 0.999
    # Order by key is far from the identity (a real shuffle): rank correlation near 0.
    r = np.argsort(np.argsort(k0))
    assert abs(np.corrcoef(r, np.arange(len(pos)))[0, 1]) < 0.02


def _table(rng, start, n, ctx):
    ids = [rng.integers(0, 1000, ctx).astype(np.int32) for _ in range(n)]
    masks = [np.ones(ctx, np.int8) for _ in range(n)]
    return blocks_table(ids, masks, [f"d{start + i}" for i in range(n)], list(range(start, start + n)))


@pytest.mark.parametrize("n_buckets", [1, 4, 16])
def test_shuffler_sorts_by_key_whatever_the_chunking(tmp_path, n_buckets):
    rng = np.random.default_rng()
    ctx, total = 8, int(rng.integers(50, 400))
    full = _table(rng, 0, total, ctx)

    def run(sizes, sub):
        sh = Shuffler(tmp_path / sub, seed=3, n_buckets=n_buckets)
        pos = 0
        for s in sizes:
            sh.add(full.slice(pos, s))
            pos += s
        return pa.concat_tables(list(sh.sorted_tables()))

    cuts = sorted(rng.choice(np.arange(1, total), size=5, replace=False).tolist())
    a = run(np.diff([0] + cuts + [total]).tolist(), "a")
    b = run([total], "b")
    assert a.equals(b) and a.schema == BLOCK_SCHEMA
    order = np.argsort(shuffle_keys(np.arange(total, dtype=np.uint64), 3), kind="stable")
    assert a.column("block_index").to_pylist() == order.tolist()
    assert not (tmp_path / "a").exists()


def test_shard_writer_boundaries_and_bytes(tmp_path):
    rng = np.random.default_rng()
    ctx, rows_per_shard = 16, int(rng.integers(3, 20))
    total = int(rng.integers(2 * rows_per_shard, 6 * rows_per_shard))
    full = _table(rng, 0, total, ctx)

    def write(sub, sizes):
        d = tmp_path / sub
        d.mkdir()
        w = ShardWriter(d, rows_per_shard, ctx)
        w.group_rows = 4  # several row groups per shard
        pos = 0
        for s in sizes:
            w.write(full.slice(pos, s))
            pos += s
        return d, w.close()

    d1, s1 = write("one", [total])
    d2, s2 = write("many", [1] * total)
    assert s1 == s2  # same files, rows and sha256 whatever the input chunking
    assert [s["rows"] for s in s1] == [min(rows_per_shard, total - i) for i in range(0, total, rows_per_shard)]
    back = pa.concat_tables([pq.read_table(d1 / s["file"]) for s in s1])
    assert back.cast(BLOCK_SCHEMA).equals(full)
    assert (d1 / s1[0]["file"]).read_bytes() == (d2 / s2[0]["file"]).read_bytes()
