"""The teacher-sample corpus shipped for the restoration study reads through the training reader
as the draw that produced it: every record a document, none skipped, round 5's counts."""

import json
import lzma
from pathlib import Path

from linearard_ray.data.sources import iter_documents, resolve_sources

SAMPLES = Path(__file__).resolve().parents[2] / "research" / "data" / "smollm2_teacher_samples.jsonl.xz"


def test_shipped_teacher_samples_read_whole():
    items = resolve_sources([str(SAMPLES)])
    assert len(items) == 1 and items[0].fmt == "jsonl"
    docs = list(iter_documents(items[0]))
    skipped = [d for d in docs if d.reason]
    assert not skipped, skipped[:3]
    assert len(docs) == 1849  # pipelines/sample_teacher.py's report for this draw: 1,849 kept
    with lzma.open(SAMPLES, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert sum(r["tokens"] for r in records) == 2_687_381
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert all(r["tokens"] >= 64 for r in records)  # shorter samples were dropped when drawn
