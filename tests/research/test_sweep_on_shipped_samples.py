"""research/sweep_on_shipped_samples.py: the genre sweep made to read the shipped teacher corpus
(every mix of its space and the base mix gain the file; nothing else changes), and refusing a
sweep that samples no teacher text or whose mix is not one list of choices."""

from __future__ import annotations

import pytest
import yaml

from tests.scripts import ROOT, load_script

GENRES_SWEEP = ROOT / "configs" / "sweep-smollm2-135m-genres.yaml"


def test_every_mix_reads_the_shipped_corpus_and_nothing_else_changes(tmp_path):
    mod = load_script("research/sweep_on_shipped_samples.py")
    samples = tmp_path / "teacher_samples.jsonl"
    samples.write_text('{"id": "teacher-0", "text": "a sampled line", "tokens": 4}\n')
    out = tmp_path / "sweep.yaml"
    assert mod.main(["--config", str(GENRES_SWEEP), "--samples", str(samples), "--out", str(out)]) == 0
    before, after = yaml.safe_load(GENRES_SWEEP.read_text()), yaml.safe_load(out.read_text())
    assert "teacher_samples" in before["data"] and "teacher_samples" not in after["data"]
    assert after["data"]["sources"] == [*before["data"]["sources"], str(samples)]
    mixes = before["tune"]["space"]["data.sources"]["choice"]
    assert after["tune"]["space"]["data.sources"]["choice"] == [[*m, str(samples)] for m in mixes]
    for cfg in (before, after):  # the rest of the sweep is the same
        del cfg["data"]["sources"], cfg["tune"]["space"]["data.sources"]
        cfg["data"].pop("teacher_samples", None)
    assert before == after


def test_refuses_what_it_cannot_rewrite(tmp_path):
    mod = load_script("research/sweep_on_shipped_samples.py")
    with pytest.raises(ValueError, match="samples no teacher text"):
        mod.with_shipped_samples({"data": {"sources": ["builtin:sotu/train"]}}, "s.jsonl")
    mixed = {"data": {"teacher_samples": {}}, "tune": {"space": {"data.sources": {"uniform": [0, 1]}}}}
    with pytest.raises(ValueError, match="one choice or grid list"):
        mod.with_shipped_samples(mixed, "s.jsonl")
    with pytest.raises(SystemExit, match="no teacher corpus at"):
        mod.main(["--config", str(GENRES_SWEEP), "--samples", str(tmp_path / "none.jsonl"), "--out", "x.yaml"])
