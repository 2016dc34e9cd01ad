"""Report figures from raw job results, report files and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from linearard_ray.config import build_config
from linearard_ray.evaluation.markdown import render_markdown
from linearard_ray.evaluation.outputs import write_report
from linearard_ray.evaluation.report import build_report, flat_metrics, restoration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_restoration_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, s, m = rng.uniform(2, 6, size=3)
        r = restoration(t, s, m)
        assert r["recovery_pct"] == pytest.approx(100 * math.exp(t) / math.exp(m), rel=1e-12)
        assert r["gap_closed_pct"] == pytest.approx(100 * (s - m) / (s - t), rel=1e-12)
    # the baseline itself closes 0%, the teacher 100%
    assert restoration(3.0, 4.0, 4.0)["gap_closed_pct"] == 0.0
    assert restoration(3.0, 4.0, 3.0)["gap_closed_pct"] == pytest.approx(100.0)
    assert restoration(3.0, 4.0, 3.0)["recovery_pct"] == pytest.approx(100.0)
    # no gap to close (e.g. dynamic NTK below the native window): undefined, not a division by ~0
    assert restoration(3.0, 3.0 + 1e-9, 2.5)["gap_closed_pct"] is None
    assert restoration(3.0, None, 2.5)["gap_closed_pct"] is None


def _synthetic_domains() -> dict:
    """Two text domains: windows of 16, 32 (single documents) and 64 (concatenated), 128 skipped."""
    domains = {
        d: {
            "sources": [f"src-{d}"],
            "documents": 5,
            "empty_documents_skipped": 1,
            "tokens": 1000,
            "lengths": {
                str(L): {
                    "length": L,
                    "requested_windows": 4,
                    "n_windows": 4,
                    "construction": "single documents" if L < 64 else "concatenated documents",
                    "docs_per_window": 1.0 if L < 64 else 2.5,
                    "candidate_windows": 9,
                    "available_tokens": 1000,
                    "skipped": False,
                }
                for L in (16, 32, 64)
            },
        }
        for d in ("main", "other")
    }
    for d in domains.values():
        d["lengths"]["128"] = {
            "length": 128,
            "requested_windows": 4,
            "n_windows": 0,
            "construction": "concatenated documents",
            "docs_per_window": 1.0,
            "candidate_windows": 0,
            "available_tokens": 1000,
            "skipped": True,
            "reason": "needs 128 tokens but all 5 documents together hold only 100",
        }
    return domains


def _synthetic_results(rng, models: list[dict], domains: dict, forced: bool) -> list[dict]:
    """Raw job results: NLL per model, domain and length; relation KL at the short lengths;
    passkey answers (with the forced choice when `forced`)."""
    results = []
    for m in models:
        for d in domains:
            for L in (16, 32, 64):
                tokens = int(rng.integers(50, 500))
                results.append(
                    {
                        "kind": "nll",
                        "model": m["name"],
                        "domain": d,
                        "length": L,
                        "nll_sum": float(rng.uniform(2, 6) * tokens),
                        "tokens": tokens,
                        "seconds": 0.1,
                        "max_position_embeddings": 256,
                    }
                )
                if m["role"] != "teacher" and L in (16, 32):
                    sums = {str(layer): {r: float(rng.uniform(0, 50)) for r in "qkv"} for layer in range(3)}
                    rows = {
                        "q": int(rng.integers(10, 100)),
                        "k": int(rng.integers(10, 100)),
                        "v": int(rng.integers(10, 100)),
                    }
                    results.append(
                        {
                            "kind": "relkl",
                            "model": m["name"],
                            "domain": d,
                            "length": L,
                            "sums": sums,
                            "rows": rows,
                            "seconds": 0.1,
                        }
                    )
        for L in (100, 200):
            answers = []
            for dp in (0.0, 0.5, 1.0):
                for _ in range(4):
                    right, words = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
                    answer = "12345" if right else None if words else "1234"
                    answers.append(
                        {"depth": dp, "key": "12345", "answer": answer, "output": answer or "the key", "correct": right}
                    )
            if forced:
                for a in answers:
                    rank = int(rng.integers(0, 3))
                    a.update(choice_rank=rank, choice_correct=rank == 0, key_logprob=float(rng.uniform(-12, -1)))
            results.append({"kind": "passkey", "model": m["name"], "length": L, "results": answers, "seconds": 0.1})
    return results


def _synthetic(seed=0, forced=False):
    rng = np.random.default_rng(seed)
    cfg = build_config(
        {
            "eval": {
                "short_lengths": [16, 32],
                "long_lengths": [64, 128],
                "passkey_lengths": [100, 200],
                "passkey_depths": [0.0, 0.5, 1.0],
                "passkey_trials": 4,
                "passkey_choices": 6,
            }
        }
    )
    models = [
        {"name": "teacher", "path": "t", "role": "teacher", "rope": "from checkpoint"},
        {"name": "scaled", "path": "t", "role": "scaled", "rope": {"type": "linear", "factor": 4.0}},
        {"name": "restored", "path": "s", "role": "restored", "rope": "from checkpoint"},
    ]
    domains = _synthetic_domains()
    results = _synthetic_results(rng, models, domains, forced)
    skipped = [
        {"section": "nll", "domain": d, "length": 128, "reason": domains[d]["lengths"]["128"]["reason"]}
        for d in domains
    ]
    return cfg, models, domains, results, skipped


def test_attention_map_column_reads_old_and_new_relation_jobs():
    """Relation-KL jobs from before the attention map (no "qk") and after it sit in one report: the
    table gets a Q/K (attention) column with "–" for the old jobs, MLflow a relkl_qk metric only
    where it was measured, and the Q/Q-V/V figures are unchanged."""
    cfg, models, domains, results, skipped = _synthetic(seed=5)
    rel = [r for r in results if r["kind"] == "relkl"]
    new = [r for r in rel if r["model"] == "restored"]
    assert new and len(new) < len(rel)
    for r in new:
        for layer, v in r["sums"].items():
            v["qk"] = 3.0 * (int(layer) + 1)
        r["rows"]["qk"] = 60
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    got = rep["relation_kl"]["main"]
    assert got["restored"]["16"]["mean"]["qk"] == pytest.approx(np.mean([3.0 * (layer + 1) / 60 for layer in range(3)]))
    assert "qk" not in got["scaled"]["16"]["mean"]
    old = next(r for r in rel if r["model"] == "scaled" and r["domain"] == "main" and r["length"] == 16)
    assert got["scaled"]["16"]["mean"]["v"] == pytest.approx(
        np.mean([old["sums"][str(layer)]["v"] / old["rows"]["v"] for layer in range(3)])
    )
    md = render_markdown(rep)
    assert "| model | length | Q/Q | K/K | V/V | Q/K (attention) |" in md
    restored_row = next(x for x in md.splitlines() if x.startswith("| restored | 16 |"))
    scaled_row = next(x for x in md.splitlines() if x.startswith("| scaled | 16 |"))
    assert restored_row.endswith(f"| {got['restored']['16']['mean']['qk']:.4g} |") and scaled_row.endswith("| – |")
    m = flat_metrics(rep)
    assert m["main.restored.relkl_qk_16"] == pytest.approx(got["restored"]["16"]["mean"]["qk"])
    assert "main.scaled.relkl_qk_16" not in m and "main.scaled.relkl_v_16" in m


def test_build_report_figures_match_results():
    cfg, models, domains, results, skipped = _synthetic()
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    for r in results:
        if r["kind"] == "nll":
            v = rep["nll"][r["domain"]][r["model"]][str(r["length"])]
            assert v["nll"] == pytest.approx(r["nll_sum"] / r["tokens"])
            assert v["ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["tokens"]))
        elif r["kind"] == "relkl":
            got = rep["relation_kl"][r["domain"]][r["model"]][str(r["length"])]
            for p in got["per_layer"]:
                for k in "qkv":
                    assert p[k] == pytest.approx(r["sums"][str(p["layer"])][k] / r["rows"][k])
            for k in "qkv":
                assert got["mean"][k] == pytest.approx(
                    np.mean([r["sums"][str(layer)][k] / r["rows"][k] for layer in range(3)])
                )
        else:
            pk = rep["passkey"][r["model"]]
            j = pk["lengths"].index(r["length"])
            for i, dp in enumerate(pk["depths"]):
                want = np.mean([a["correct"] for a in r["results"] if a["depth"] == dp])
                assert pk["accuracy"][i][j] == pytest.approx(want)
    for d in domains:
        for m in ("scaled", "restored"):
            for L in ("16", "32"):
                n = rep["nll"][d]
                want = restoration(n["teacher"][L]["nll"], n["scaled"][L]["nll"], n[m][L]["nll"])
                assert rep["restoration"][d][m][L] == pytest.approx(want)
        assert "teacher" not in rep["restoration"][d]
        assert "64" not in rep["restoration"][d]["restored"]  # restoration is a short-text figure
    assert rep["skipped"] == skipped


def test_report_files_and_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cfg, models, domains, results, skipped = _synthetic(1)
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    files = write_report(rep, tmp_path)
    names = {p.name for p in files}
    assert {
        "report.json",
        "report.md",
        "ppl_vs_length.png",
        "passkey_summary.png",
        "passkey_teacher.png",
        "passkey_scaled.png",
        "passkey_restored.png",
    } <= names
    for p in files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC
            with Image.open(p) as im:
                im.verify()
            assert plt.imread(p).ndim == 3
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["nll"] == rep["nll"] and loaded["plots"] == rep["plots"]
    md = (tmp_path / "report.md").read_text()
    for d in ("src-main", "src-other"):
        assert d in md
    assert md.count("### Restoration") == 2  # one table per domain
    assert "concatenated documents" in md and "Windows of 64 tokens" in md
    assert "needs 128 tokens but all 5 documents together hold only 100" in md
    assert "![ppl_vs_length](ppl_vs_length.png)" in md


def test_passkey_only_report_draws_no_empty_perplexity_plot(tmp_path):
    cfg, models, domains, results, skipped = _synthetic(4)
    write_report(build_report(cfg, models, domains, results, skipped, {100: [], 200: []}), tmp_path)
    assert (tmp_path / "ppl_vs_length.png").exists()
    passkey_only = [r for r in results if r["kind"] == "passkey"]
    rep = build_report(cfg, models, domains, passkey_only, skipped, {100: [], 200: []})
    names = {p.name for p in write_report(rep, tmp_path)}
    assert "ppl_vs_length.png" not in names and not (tmp_path / "ppl_vs_length.png").exists()
    assert {"passkey_teacher.png", "passkey_scaled.png", "passkey_restored.png"} <= names
    assert "ppl_vs_length" not in (tmp_path / "report.md").read_text()


def test_json_has_no_nan(tmp_path):
    cfg, models, domains, results, skipped = _synthetic(2)
    # A passkey length no trial of one model ran: a None cell, not NaN, in strict JSON.
    results = [r for r in results if not (r["kind"] == "passkey" and r["model"] == "scaled" and r["length"] == 200)]
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    assert rep["passkey"]["scaled"]["accuracy"][0][1] is None
    write_report(rep, tmp_path)
    json.loads((tmp_path / "report.json").read_text())  # strict: allow_nan=False on write


def test_markdown_without_baseline_and_flat_metrics():
    cfg, models, domains, results, skipped = _synthetic(3)
    models = [m for m in models if m["role"] != "scaled"]
    results = [r for r in results if r["model"] != "scaled"]
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    assert rep["restoration"]["main"]["restored"]["16"]["gap_closed_pct"] is None
    assert "no unrestored baseline" in render_markdown(rep)
    m = flat_metrics(rep)
    assert rep["metrics"] == m
    assert m["main.restored.ppl_16"] == pytest.approx(rep["nll"]["main"]["restored"]["16"]["ppl"])
    assert m["other.restored.recovery_pct_32"] == pytest.approx(
        rep["restoration"]["other"]["restored"]["32"]["recovery_pct"]
    )
    assert "main.restored.gap_closed_pct_16" not in m
    assert m["passkey.teacher.acc"] == pytest.approx(rep["passkey"]["teacher"]["accuracy_overall"])
    assert m["main.restored.relkl_k_32"] == pytest.approx(rep["relation_kl"]["main"]["restored"]["32"]["mean"]["k"])


def test_passkey_against_the_baseline_prompt_by_prompt():
    """Every model answers the same prompts, so the report pairs them with the unrestored baseline's:
    counts from the raw answers, the sign test's p, a Wilson interval, a markdown row and metrics."""
    from linearard_ray.evaluation.paired_stats import sign_test_p, wilson_interval

    cfg, models, domains, results, skipped = _synthetic(5)
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    answers = {(r["model"], r["length"]): r["results"] for r in results if r["kind"] == "passkey"}
    md = render_markdown(rep)
    m = flat_metrics(rep)
    assert "vs_scaled" not in rep["passkey"]["scaled"]
    for name in ("teacher", "restored"):
        pk = rep["passkey"][name]
        mine = [a["correct"] for L in (100, 200) for a in answers[(name, L)]]
        base = [a["correct"] for L in (100, 200) for a in answers[("scaled", L)]]
        wins = sum(x and not y for x, y in zip(mine, base, strict=False))
        losses = sum(y and not x for x, y in zip(mine, base, strict=False))
        assert (pk["correct"], pk["prompts"]) == (sum(mine), len(mine))
        assert pk["ci95"] == pytest.approx(wilson_interval(sum(mine), len(mine)))
        assert pk["vs_scaled"] == {
            "paired": len(mine),
            "wins": wins,
            "losses": losses,
            "ties": len(mine) - wins - losses,
            "p_value": sign_test_p(wins, losses),
        }
        assert f"| {name} | {sum(mine)} / {len(mine)} |" in md
        assert f"{wins} / {losses} / {len(mine) - wins - losses} | {sign_test_p(wins, losses):.3g} |" in md
        assert m[f"passkey.{name}.wins_minus_losses_vs_scaled"] == wins - losses
    assert "| scaled |" in md and "(the baseline)" in md and "p (sign test)" in md
    # without a baseline there is nothing to pair with: accuracy and interval only
    no_base = [r for r in results if r["model"] != "scaled"]
    rep2 = build_report(
        cfg, [x for x in models if x["role"] != "scaled"], domains, no_base, skipped, {100: [], 200: []}
    )
    assert "vs_scaled" not in rep2["passkey"]["restored"] and "p (sign test)" not in render_markdown(rep2)


def test_perplexity_against_the_baseline_window_by_window():
    """Records that carry per-window NLL get a window-by-window comparison with the baseline: the
    count of windows won, the mean difference and the permutation p, in report.json, report.md and
    the metrics; records from before (no per-window NLL) get none."""
    from linearard_ray.evaluation.paired_stats import paired_windows

    cfg, models, domains, results, skipped = _synthetic(6)
    rng = np.random.default_rng(6)
    for r in results:
        if r["kind"] == "nll" and not (r["domain"] == "other" and r["length"] == 16):
            r["window_nll"] = list(rng.uniform(2, 4, 4))
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    md, m = render_markdown(rep), flat_metrics(rep)
    by = {(r["model"], r["domain"], r["length"]): r for r in results if r["kind"] == "nll"}
    for (name, dom, L), r in by.items():
        got = rep["nll"][dom][name][str(L)].get("vs_scaled")
        if name == "scaled" or (dom == "other" and L == 16):
            assert got is None
            continue
        want = paired_windows(r["window_nll"], by[("scaled", dom, L)]["window_nll"])
        assert got == want
        assert m[f"{dom}.{name}.p_vs_scaled_{L}"] == want["p_value"]
        assert f"better on {want['better']}/4 windows, p {want['p_value']:.2g}" in md


def test_forced_choice_figures_table_metrics_and_plot(tmp_path):
    """The forced choice is reported beside the greedy answer: its own counts, interval, per-length
    accuracy, mean key log-probability and pairing with the baseline, all from the raw trials."""
    from PIL import Image

    from linearard_ray.evaluation.paired_stats import sign_test_p, wilson_interval

    cfg, models, domains, results, skipped = _synthetic(7, forced=True)
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    rows = {(r["model"], r["length"]): r["results"] for r in results if r["kind"] == "passkey"}
    md = render_markdown(rep)
    m = flat_metrics(rep)
    assert "Forced choice among 6 keys" in md
    for name in ("teacher", "scaled", "restored"):
        fc = rep["passkey"][name]["forced_choice"]
        mine = [a["choice_correct"] for L in (100, 200) for a in rows[(name, L)]]
        assert (fc["correct"], fc["prompts"], fc["choices"]) == (sum(mine), 24, 6)
        assert fc["ci95"] == pytest.approx(wilson_interval(sum(mine), 24))
        assert fc["accuracy_by_length"]["200"] == pytest.approx(
            np.mean([a["choice_correct"] for a in rows[(name, 200)]])
        )
        assert fc["key_logprob_mean"] == pytest.approx(
            np.mean([a["key_logprob"] for L in (100, 200) for a in rows[(name, L)]])
        )
        assert m[f"passkey.{name}.choice_acc"] == pytest.approx(sum(mine) / 24)
        assert f"| {name} | {sum(mine)} / 24 |" in md
        if name != "scaled":
            base = [a["choice_correct"] for L in (100, 200) for a in rows[("scaled", L)]]
            wins = sum(x and not y for x, y in zip(mine, base, strict=False))
            losses = sum(y and not x for x, y in zip(mine, base, strict=False))
            assert fc["vs_scaled"]["wins"] == wins and fc["vs_scaled"]["losses"] == losses
            assert m[f"passkey.{name}.choice_p_vs_scaled"] == pytest.approx(sign_test_p(wins, losses))
            # the key's log-probability, prompt by prompt (same order: one key, told apart by repeat)
            lp = [a["key_logprob"] for L in (100, 200) for a in rows[(name, L)]]
            lp_base = [a["key_logprob"] for L in (100, 200) for a in rows[("scaled", L)]]
            higher = sum(x > y for x, y in zip(lp, lp_base, strict=False))
            lower = sum(x < y for x, y in zip(lp, lp_base, strict=False))
            v = fc["logprob_vs_scaled"]
            assert (v["paired"], v["higher"], v["lower"]) == (24, higher, lower) and 0 < higher < 24
            assert v["mean_diff"] == pytest.approx(np.mean(lp) - np.mean(lp_base))
            assert m[f"passkey.{name}.key_logprob_p_vs_scaled"] == pytest.approx(sign_test_p(higher, lower))
            assert f"{higher} / {lower} ({v['mean_diff']:+.2f})" in md
    files = write_report(rep, tmp_path)
    summary = next(p for p in files if p.name == "passkey_summary.png")
    with Image.open(summary) as im:
        with_forced = im.size[1]
    plain = build_report(cfg, models, domains, _synthetic(7)[3], skipped, {100: [], 200: []})
    assert "forced_choice" not in plain["passkey"]["restored"] and "Forced choice" not in render_markdown(plain)
    with Image.open(next(p for p in write_report(plain, tmp_path / "plain") if p.name == "passkey_summary.png")) as im:
        # greedy alone: one panel; with the forced choice also its panel and the key's log-probability,
        # stacked below it
        assert with_forced > 2.2 * im.size[1]


def test_greedy_answers_are_sorted_into_right_other_number_and_no_number():
    """A miss in words (no number) is told apart from a wrong number: the report counts both, per
    model, from the raw answers, and MLflow gets the share without a number."""
    cfg, models, domains, results, skipped = _synthetic(3)
    rep = build_report(cfg, models, domains, results, skipped, {100: [], 200: []})
    md, m = render_markdown(rep), flat_metrics(rep)
    for name in ("teacher", "scaled", "restored"):
        trials = [a for r in results if r["kind"] == "passkey" and r["model"] == name for a in r["results"]]
        want = {
            "right": sum(a["correct"] for a in trials),
            "other_number": sum(not a["correct"] and a["answer"] is not None for a in trials),
            "no_number": sum(a["answer"] is None for a in trials),
        }
        assert rep["passkey"][name]["answer_kinds"] == want and min(want.values()) > 0
        assert f"| {want['right']} / {want['other_number']} / {want['no_number']} |" in md
        assert m[f"passkey.{name}.no_number_share"] == pytest.approx(want["no_number"] / len(trials))
