"""research/block_context.py: each token's own-document context in its block, on hand-made blocks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.scripts import load_script

EOS = 2


def _mod():
    return load_script("research/block_context.py")


def test_own_context_restarts_after_each_eos_and_stops_at_padding():
    m = _mod()
    ids = np.array([5, 5, EOS, 7, 7, 7, EOS, 0])
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0])
    assert m.own_context(ids, mask, EOS).tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert m.own_context(np.array([9, 9, 9, EOS]), np.ones(4), EOS).tolist() == [0, 1, 2, 3]


def test_block_context_per_source_and_for_the_mix(tmp_path):
    m = _mod()
    blocks = {
        "input_ids": [[4] * 8, [5, 5, EOS, 7, 7, 7, EOS, 0]],
        "attention_mask": [[1] * 8, [1] * 7 + [0]],
        "doc_id": ["sotu/1790_x", "/data/samples.jsonl:1+/data/samples.jsonl:2"],
    }
    pq.write_table(pa.table(blocks), tmp_path / "shard-00000.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"eos_id": EOS}, "ctx_len": 8}))
    m.LONG_CONTEXT = 3
    got = m.block_context(tmp_path)
    assert set(got) == {"sotu", "samples", "all"}
    assert got["sotu"] == {
        "blocks": 1,
        "docs_per_block": 1.0,
        "one_document_blocks_pct": 100.0,
        "mean_own_context": 3.5,
        "tokens_with_3_pct": 62.5,
        "padding_pct": 0.0,
    }
    assert got["samples"]["docs_per_block"] == 2.0 and got["samples"]["mean_own_context"] == round(9 / 7, 1)
    assert got["samples"]["padding_pct"] == 12.5 and got["samples"]["tokens_with_3_pct"] == round(100 / 7, 1)
    assert got["all"]["mean_own_context"] == round((28 + 9) / 15, 1) and got["all"]["padding_pct"] == 6.25
