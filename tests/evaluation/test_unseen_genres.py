"""Held-out evaluation domains (eval.domains) and the report's recovery on unseen genres: config
parsing and the study preset, the bootstrap intervals against scipy's own bootstrap, the report and
its Markdown on synthetic per-window NLLs, and one evaluation of a tiny model on two tiny genres."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from scipy import stats

from linearard_ray.config import ConfigError, build_config
from linearard_ray.evaluation.paired_stats import bootstrap_recovery, recovery_pct


def test_domains_parse_and_the_study_preset():
    cfg = build_config({"eval": {"domains": {"legal": ["genre:legal"], "mine": ["notes/*.txt", "builtin:pydocs"]}}})
    assert cfg.eval.domains["mine"] == ["notes/*.txt", "builtin:pydocs"]
    study = build_config({"eval": {"preset": "study"}}).eval
    assert study.windows_at(512) >= 48 and study.windows_at(2048) >= 24 and study.windows_at(4096) == 8
    assert set(study.domains) == {"legal", "standards", "history"}
    assert build_config({"eval": {"preset": "study", "domains": {}}}).eval.domains == {}  # the config wins
    for bad, msg in (
        ({"main": ["genre:legal"]}, "not a domain name"),
        ({"a.b": ["genre:legal"]}, "not a domain name"),
        ({"x": []}, "no sources"),
        ({"x": ["genre:novels"]}, "unknown genre 'novels'"),
        ({"x": ["genre:legal/train"]}, "has parts eval"),
        ({"x": ["builtin:nope"]}, "unknown built-in corpus"),
    ):
        with pytest.raises(ConfigError, match=msg):
            build_config({"eval": {"domains": bad}})
    with pytest.raises(ConfigError, match="at least one window"):
        build_config({"eval": {"windows_by_length": {512: 0}}})


def _windows(rng, n, gap):
    teacher = rng.normal(3.0, 0.3, n)
    return teacher, teacher + gap + rng.normal(0, 0.05, n)


def test_bootstrap_recovery_matches_scipy_and_names_the_worst_domain():
    rng = np.random.default_rng(1)
    domains = {"a": _windows(rng, 48, 0.02), "b": _windows(rng, 48, 0.10), "c": _windows(rng, 24, 0.05)}
    got = bootstrap_recovery(domains, samples=20_000, seed=3)
    assert got["worst"]["domain"] == "b"
    for name, (t, m) in domains.items():
        d = got["domains"][name]
        assert d["recovery_pct"] == pytest.approx(100 * math.exp(t.mean() - m.mean()))
        # independent: scipy's paired percentile bootstrap of the mean NLL difference, mapped to recovery
        ref = stats.bootstrap(
            (t, m),
            lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            paired=True,
            vectorized=True,
            method="percentile",
            n_resamples=20_000,
            rng=np.random.default_rng(7),
        ).confidence_interval
        assert d["ci"][0] == pytest.approx(100 * math.exp(ref.low), abs=0.06)
        assert d["ci"][1] == pytest.approx(100 * math.exp(ref.high), abs=0.06)
        assert d["ci"][0] < d["recovery_pct"] < d["ci"][1]
    mean = got["mean"]
    assert mean["recovery_pct"] == pytest.approx(np.mean([recovery_pct(t, m) for t, m in domains.values()]))
    # the mean of independent domains: its spread is the root of the summed variances over k²
    se = math.sqrt(sum(((d["ci"][1] - d["ci"][0]) / (2 * 1.96)) ** 2 for d in got["domains"].values())) / 3
    assert (mean["ci"][1] - mean["ci"][0]) / (2 * 1.96) == pytest.approx(se, rel=0.08)
    assert bootstrap_recovery({}) is None


def _nll_results(domains: dict, rng) -> list[dict]:
    results = []
    for dom, gap in domains.items():
        for L in (512, 2048):
            n = 48 if L == 512 else 24
            t, m = _windows(rng, n, gap)
            for model, w in (("teacher", t), ("restored", m), ("scaled", m + 0.2)):
                results.append(
                    {
                        "kind": "nll",
                        "model": model,
                        "domain": dom,
                        "length": L,
                        "nll_sum": float(np.sum(w) * (L - 1)),
                        "tokens": n * (L - 1),
                        "window_nll": w.tolist(),
                    }
                )
    return results


GAPS = {"main": 0.0, "legal": 0.03, "standards": 0.08, "history": 0.05}


def _report_on_three_genres() -> dict:
    """A report of the study preset on synthetic windows: main in-domain, three unseen genres with
    the restored model 0.03, 0.08 and 0.05 nats behind the teacher, the scaled one 0.2 further."""
    from linearard_ray.evaluation.report import build_report

    cfg = build_config({"eval": {"preset": "study", "passkey_lengths": [], "relation_kl": False}})
    info = {
        d: {
            "sources": [d],
            "documents": 1,
            "empty_documents_skipped": 0,
            "tokens": 1,
            "lengths": {},
            "in_domain": d == "main",
        }
        for d in GAPS
    }
    models = [
        {"name": "teacher", "role": "teacher", "path": "t", "rope": "native"},
        {"name": "scaled", "role": "scaled", "path": "t", "rope": "native"},
        {"name": "restored", "role": "model", "path": "s", "rope": "native"},
    ]
    return build_report(cfg, models, info, _nll_results(GAPS, np.random.default_rng(0)), [], {})


def test_report_gives_unseen_recovery_beside_the_in_domain_figure():
    from linearard_ray.evaluation.markdown import render_markdown

    rep = _report_on_three_genres()
    u = rep["unseen_recovery"]["restored"]["512"]
    assert set(u["domains"]) == {"legal", "standards", "history"}  # main is in-domain, left out
    assert u["worst"]["domain"] == "standards"
    want = np.mean([rep["restoration"][d]["restored"]["512"]["recovery_pct"] for d in u["domains"]])
    assert u["mean"]["recovery_pct"] == pytest.approx(want)
    assert u["in_domain"] == {"main": pytest.approx(rep["restoration"]["main"]["restored"]["512"]["recovery_pct"])}
    assert rep["metrics"]["unseen.restored.worst_recovery_pct_2048"] == pytest.approx(
        rep["unseen_recovery"]["restored"]["2048"]["worst"]["recovery_pct"]
    )
    assert rep["nll"]["legal"]["restored"]["512"]["vs_scaled"]["windows"] == 48  # margins window by window
    md = render_markdown(rep)
    assert "## Recovery on unseen genres" in md and "(standards)" in md
    assert "main texts (eval.texts), in-domain" in md and "held-out domain legal (eval.domains)" in md


def _tiny_genres(cache_dir) -> None:
    """Two evaluation genres, legal and history, built from synthetic package trees."""
    from linearard_ray.data import genres as G
    from linearard_ray.data.corpus import iter_builtin

    docs = [d["text"][:3000] for d in iter_builtin("builtin:pydocs/tutorial")]
    root = cache_dir / "unpacked"
    lic = root / "base-files_1" / "usr/share/common-licenses"
    lic.mkdir(parents=True)
    for k, text in enumerate(docs[:4]):
        (lic / f"L{k}").write_text(text)
    doc = root / "doc-debian_1" / "usr/share/doc/debian"
    doc.mkdir(parents=True)
    (doc / "constitution.txt.gz").write_bytes(gzip.compress(docs[4].encode()))
    hist = root / "debian-history_1" / "usr/share/doc/debian-history/docs"
    hist.mkdir(parents=True)
    (hist / "project-history.en.txt.gz").write_bytes(gzip.compress("\n".join(docs[5:9]).encode()))
    nations = root / "freeciv-data_1" / G.NATION_DIR
    nations.mkdir(parents=True)
    legend = docs[9][:500].replace("\\", "").replace('"', "'")  # no escapes in the ruleset string
    (nations / "x.ruleset").write_text(f'[nation_x]\nlegend=_("{legend}")\n')
    G.build_genres(["legal", "history"], G.trees_from_dir(root), G.genres_root())


def test_tiny_evaluation_on_two_held_out_genres(tmp_path, tiny_model_dir, cache_dir):
    from linearard_ray.evaluation.evaluate import evaluate

    teacher = str(tiny_model_dir("llama"))
    over = {
        "model": {"teacher": teacher, "dtype": "float32"},
        "eval": {
            "models": [
                {"name": "teacher", "path": teacher},
                {"name": "scaled", "path": teacher, "rope": {"type": "linear", "factor": 2.0}},
            ],
            "texts": ["builtin:sotu/extra"],
            "other_texts": [],
            "domains": {"legal": ["genre:legal"], "history": "genre:history"},
            "short_lengths": [32],
            "long_lengths": [],
            "max_windows": 2,
            "windows_by_length": {32: 5},
            "passkey_lengths": [],
            "relation_kl": False,
            "device": "cpu",
            "output_dir": str(tmp_path / "out"),
        },
        "tracking": {"enabled": False},
    }
    with pytest.raises(ConfigError, match=r"eval.domains.legal: .*build_genre_corpora.py \(every genre at once"):
        evaluate(build_config(over))  # not built yet: named before any model loads
    _tiny_genres(cache_dir)
    rep = evaluate(build_config(over))
    assert rep["domains"]["main"]["in_domain"] and not rep["domains"]["legal"]["in_domain"]
    for dom in ("legal", "history"):
        assert rep["domains"][dom]["lengths"]["32"]["n_windows"] == 5
        assert len(rep["nll"][dom]["scaled"]["32"]["window_nll"]) == 5
    u = rep["unseen_recovery"]["scaled"]["32"]
    assert set(u["domains"]) == {"legal", "history"}
    for dom, d in u["domains"].items():
        assert d["recovery_pct"] == pytest.approx(rep["restoration"][dom]["scaled"]["32"]["recovery_pct"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Recovery on unseen genres" in md and "![unseen_recovery](unseen_recovery.png)" in md
    assert (tmp_path / "out" / "unseen_recovery.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["unseen_recovery"]["scaled"]["32"]["worst"]
