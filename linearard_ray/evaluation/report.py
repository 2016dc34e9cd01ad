"""The evaluation report's figures, computed from raw job results (sums, counts, passkey answers).

``build_report`` turns the jobs' results into the report dict (perplexity, restoration, relation KL,
passkey, with their comparisons against the unrestored baseline) and ``flat_metrics`` into the flat
metric names MLflow gets. The report is written by ``outputs`` (``report.json``, ``report.md``
from ``markdown``, PNG plots from ``plots``, the MLflow run).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Any

import numpy as np

from linearard_ray.evaluation.paired_stats import (
    answer_kinds,
    bootstrap_recovery,
    paired_comparison,
    paired_logprob,
    paired_windows,
    wilson_interval,
)

DEFINITIONS = {
    "nll": "mean next-token negative log-likelihood in nats over every predicted token of the windows "
    "(each window of L tokens predicts its last L-1 tokens)",
    "ppl": "perplexity = exp(nll)",
    "recovery_pct": "restoration, figure 1: 100 × teacher perplexity ÷ model perplexity at the same length "
    "and windows (100 = as good as the teacher; above 100 = better than the teacher on this text)",
    "gap_closed_pct": "restoration, figure 2: share of the scaled-vs-teacher gap closed, "
    "100 × (nll_scaled − nll_model) ÷ (nll_scaled − nll_teacher), in NLL (log-perplexity); "
    "0 = no better than the unrestored RoPE-scaled model, 100 = the teacher; undefined when "
    "the scaled model is as good as the teacher (|gap| < 1e-6)",
    "relation_kl": "mean over rows (batch × heads × positions) of KL(teacher ‖ model) between the causal "
    "softmax rows of the self-relation logits Q·Qᵀ/√D, K·Kᵀ/√D, V·Vᵀ/√D of each layer "
    "(post-RoPE q and k; yarn/longrope attention factor m² divided out when "
    "rope.yarn_logit_correction is 'divide'); Q/K (attention) is the same for the attention map, "
    "the causal softmax rows of Q·Kᵀ/√D the model reads positions with (m² kept: it is what the "
    "model attends with; absent from jobs evaluated before it was added)",
    "passkey_accuracy": "share of trials where the first number greedily generated after the question equals "
    "the 5-digit key hidden at that depth of a prompt of exactly that many tokens",
    "passkey_paired": "passkey against the unrestored baseline on the identical prompts: wins = prompts the "
    "model gets right and the baseline wrong, losses = the reverse; p = exact two-sided sign "
    "test on wins vs losses (McNemar), the chance of a split at least this uneven if neither "
    "model were better; the accuracy interval is Wilson's 95%",
    "passkey_forced_choice": "share of trials where the model gives the true key a higher log-probability right "
    "after the question (teacher-forced, summed over the key's tokens) than each of N-1 "
    "seeded distractor keys (eval.passkey_distractors: random five-digit keys, or keys "
    "one digit away from the true one); every candidate has the same form, so this is "
    "retrieval apart from how the model words its answer; chance is 1/N",
    "passkey_answers": "the greedy answers sorted: right, another number (retrieved wrong, a digit dropped "
    "included), or no number at all (answered in words: the wording failed, whatever the "
    "model retrieved)",
    "key_logprob_paired": "the true key's log-probability against the unrestored baseline's on the identical "
    "prompts: higher / lower = prompts where the model gives the key more / less "
    "probability; p = exact two-sided sign test on higher vs lower. It still orders models "
    "when both rank the true key first on every prompt",
    "nll_paired": "in the perplexity tables, 'better on k/n windows, p' compares a model with the unrestored "
    "baseline on the same windows: k = windows where its mean NLL is lower; p = exact two-sided "
    "sign-flip permutation test of the mean per-window NLL difference (with n windows the "
    "smallest possible p is 2/2^n)",
    "unseen_recovery": "recovery on unseen genres: for each held-out domain of eval.domains that is not of "
    "the training sources' genre, recovery = 100 × teacher perplexity ÷ model perplexity on the same windows; "
    "'mean' averages it over those domains, 'worst' is the lowest domain; the 95% intervals are percentile "
    "bootstrap intervals over windows (each domain's windows resampled with replacement, teacher and model "
    "paired window by window, seeded). Not comparable with a benchmark's accuracy share: it is a ratio of "
    "perplexities",
    "windows": "non-overlapping windows of exactly L tokens chosen with a seeded generator; cut from single "
    "documents when at least eval.max_windows such windows exist, otherwise from the documents "
    "joined in order with EOS separators ('concatenated documents')",
}


def restoration(nll_teacher: float, nll_scaled: float | None, nll_model: float, eps: float = 1e-6) -> dict:
    """The two restoration figures of a model at one length (see DEFINITIONS)."""
    out: dict[str, Any] = {"recovery_pct": 100.0 * math.exp(nll_teacher - nll_model)}
    if nll_scaled is None:
        out["gap_closed_pct"] = None
    else:
        gap = nll_scaled - nll_teacher
        out["gap_closed_pct"] = None if abs(gap) < eps else 100.0 * (nll_scaled - nll_model) / gap
    return out


def clean_json(x):
    """JSON-safe: NaN/inf become None, numpy scalars become Python ones."""
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def safe_name(name: str) -> str:
    """A model name as it may appear in a file or metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def domain_title(dom: str, info: dict) -> str:
    """How a text domain is named in tables and plots; "in-domain" when it is of the genre of the
    training sources (data.sources), so its figures are not read as general ability."""
    kind = {"main": "main texts (eval.texts)", "other": "second domain (eval.other_texts)"}.get(
        dom, f"held-out domain {dom} (eval.domains)"
    )
    return f"{kind}{', in-domain' if info.get('in_domain') else ''}: {', '.join(info['sources'])}"


CHOICE_FIELDS = ("choice_correct", "choice_rank", "key_logprob")
RELATION_KINDS = ("q", "k", "v", "qk")
RELATION_TITLES = {"q": "Q/Q", "k": "K/K", "v": "V/V", "qk": "Q/K (attention)"}


# --------------------------------------------------------------------------- perplexity


def _nll_figures(results: list[dict], domains: dict, names: list[str], scaled: str | None) -> dict:
    """nll[domain][model][length]: NLL, perplexity and tokens, and each model's window-by-window
    comparison with the unrestored baseline where both have per-window NLLs."""
    nll: dict = {d: {n: {} for n in names} for d in domains}
    for r in results:
        if r["kind"] == "nll":
            v = r["nll_sum"] / r["tokens"]
            nll[r["domain"]][r["model"]][str(r["length"])] = {
                "nll": v,
                "ppl": math.exp(v),
                "tokens": r["tokens"],
                **({"window_nll": r["window_nll"]} if "window_nll" in r else {}),
            }
    for d in domains:
        for n in names:
            for length, v in nll[d][n].items():
                base = nll[d].get(scaled, {}).get(length) if scaled and n != scaled else None
                if base and "window_nll" in v and "window_nll" in base:
                    v["vs_scaled"] = paired_windows(v["window_nll"], base["window_nll"])
    return nll


def _restoration_figures(
    nll: dict, domains: dict, names: list[str], teacher: str, scaled: str | None, short: list[int]
) -> dict:
    """restoration[domain][model][length] at the short lengths, for every model but the teacher."""
    rest: dict = {d: {} for d in domains}
    for d in domains:
        for n in names:
            if n == teacher:
                continue
            for length in short:
                t = nll[d][teacher].get(str(length))
                m = nll[d][n].get(str(length))
                if t is None or m is None:
                    continue
                s = nll[d][scaled].get(str(length)) if scaled else None
                rest[d].setdefault(n, {})[str(length)] = restoration(t["nll"], s["nll"] if s else None, m["nll"])
    return rest


def unseen_domains(domains: dict) -> list[str]:
    """The eval.domains that are not of the training sources' genre."""
    return [d for d, info in domains.items() if d not in ("main", "other") and not info.get("in_domain")]


def _unseen_figures(nll: dict, rest: dict, domains: dict, names: list[str], teacher: str, short: list[int]) -> dict:
    """unseen[model][length]: recovery on the unseen genres (mean, worst, each domain, with bootstrap
    intervals over windows) and, beside it, the recovery on each in-domain text."""
    unseen = unseen_domains(domains)
    out: dict = {}
    if not unseen:
        return out
    for n in names:
        if n == teacher:
            continue
        for length in map(str, short):
            pairs = {}
            for d in unseen:
                t, m = nll[d][teacher].get(length), nll[d][n].get(length)
                if t and m and "window_nll" in t and "window_nll" in m:
                    pairs[d] = (t["window_nll"], m["window_nll"])
            figures = bootstrap_recovery(pairs)
            if figures is None:
                continue
            figures["in_domain"] = {
                d: rest[d][n][length]["recovery_pct"]
                for d, info in domains.items()
                if info.get("in_domain") and length in rest.get(d, {}).get(n, {})
            }
            out.setdefault(n, {})[length] = figures
    return out


# --------------------------------------------------------------------------- relation KL


def _relation_kl_figures(results: list[dict], domains: dict) -> dict:
    """relation_kl[domain][model][length]: the mean KL per row of each relation, per layer and
    averaged over layers."""
    relkl: dict = {d: {} for d in domains}
    for r in results:
        if r["kind"] != "relkl":
            continue
        kinds = [k for k in RELATION_KINDS if k in r["rows"]]  # jobs from before the attention map lack "qk"
        per_layer = [
            {"layer": int(layer), **{k: v[k] / r["rows"][k] for k in kinds}}
            for layer, v in sorted(r["sums"].items(), key=lambda kv: int(kv[0]))
        ]
        mean = {k: float(np.mean([p[k] for p in per_layer])) for k in kinds}
        relkl[r["domain"]].setdefault(r["model"], {})[str(r["length"])] = {"mean": mean, "per_layer": per_layer}
    return relkl


# --------------------------------------------------------------------------- passkey


def _forced_choice(by_len: dict, lengths: list[int], choices: int, distractors: str = "random") -> dict:
    """The forced-choice figures of one model's passkey trials (see DEFINITIONS)."""
    hits = [bool(x["choice_correct"]) for rs in by_len.values() for x in rs]
    return {
        "choices": choices,
        "distractors": distractors,
        "correct": int(sum(hits)),
        "prompts": len(hits),
        "accuracy_overall": float(np.mean(hits)),
        "ci95": wilson_interval(int(sum(hits)), len(hits)),
        "accuracy_by_length": {
            str(L): float(np.mean([x["choice_correct"] for x in by_len[L]])) for L in lengths if L in by_len
        },
        "key_logprob_mean": float(np.mean([x["key_logprob"] for rs in by_len.values() for x in rs])),
    }


def _accuracy_grid(by_len: dict, depths: list[float], lengths: list[int]) -> list[list[float | None]]:
    """Accuracy per depth (rows) and prompt length (columns); None where no trial ran."""
    grid = []
    for d in depths:
        row = []
        for L in lengths:
            trials = [x for x in by_len.get(L, []) if x["depth"] == d]
            row.append(float(np.mean([x["correct"] for x in trials])) if trials else None)
        grid.append(row)
    return grid


def _passkey_scores(by_len: dict, ev, lengths: list[int]) -> dict:
    """One model's passkey figures from its trials by prompt length."""
    depths = list(ev.passkey_depths)
    allr = [x["correct"] for rs in by_len.values() for x in rs]
    per_len = {str(L): float(np.mean([x["correct"] for x in by_len[L]])) for L in lengths if L in by_len}
    forced = all("choice_correct" in x for rs in by_len.values() for x in rs)
    fields = ("depth", "key", "answer", "correct") + (CHOICE_FIELDS if forced else ())
    samples = {str(L): [{k: x[k] for k in fields} for x in by_len[L]] for L in lengths if L in by_len}
    scores = {
        "lengths": lengths,
        "depths": depths,
        "trials": ev.passkey_trials,
        "accuracy": _accuracy_grid(by_len, depths, lengths),
        "accuracy_by_length": per_len,
        "accuracy_overall": float(np.mean(allr)),
        "answers": samples,
        "correct": int(sum(allr)),
        "prompts": len(allr),
        "ci95": wilson_interval(int(sum(allr)), len(allr)),
        "answer_kinds": answer_kinds(x for rs in by_len.values() for x in rs),
    }
    if forced:
        scores["forced_choice"] = _forced_choice(by_len, lengths, ev.passkey_choices, ev.passkey_distractors)
    return scores


def _compare_passkey_with_baseline(passkey: dict, scaled: str | None) -> None:
    """Adds each model's prompt-by-prompt comparison with the unrestored baseline (in place)."""
    if scaled not in passkey:
        return
    base = passkey[scaled]
    for n, pk in passkey.items():
        if n != scaled:
            pk["vs_scaled"] = paired_comparison(pk["answers"], base["answers"])
            if "forced_choice" in pk and "forced_choice" in base:
                pk["forced_choice"]["vs_scaled"] = paired_comparison(
                    pk["answers"], base["answers"], field="choice_correct"
                )
                pk["forced_choice"]["logprob_vs_scaled"] = paired_logprob(pk["answers"], base["answers"])


def _passkey_figures(results: list[dict], names: list[str], ev, lengths: list[int], scaled: str | None) -> dict:
    """passkey[model]: the figures of every model that has passkey trials."""
    passkey: dict = {}
    for n in names:
        by_len = {r["length"]: r["results"] for r in results if r["kind"] == "passkey" and r["model"] == n}
        if by_len:
            passkey[n] = _passkey_scores(by_len, ev, lengths)
    _compare_passkey_with_baseline(passkey, scaled)
    return passkey


# --------------------------------------------------------------------------- the report


def _record_model_windows(models: list[dict], results: list[dict]) -> None:
    """Each model's max_position_embeddings, as its jobs reported it (in place)."""
    windows_max = {}
    for r in results:
        windows_max[r["model"]] = r.get("max_position_embeddings")
    for m in models:
        m["max_position_embeddings"] = windows_max.get(m["name"])


def _job_seconds(results: list[dict]) -> dict:
    seconds: dict = {}
    for r in results:
        seconds[r["model"]] = seconds.get(r["model"], 0.0) + r.get("seconds", 0.0)
    return seconds


def _all_skipped(skipped: list[dict], results: list[dict]) -> list[dict]:
    """What was skipped before the jobs ran, then what the jobs skipped."""
    return list(skipped) + [
        {k: r[k] for k in ("section", "model", "domain", "length", "reason")} for r in results if r["kind"] == "skip"
    ]


def build_report(
    cfg, models: list[dict], domains: dict, results: list[dict], skipped: list[dict], passkey_prompts: dict
) -> dict:
    """Assemble the report dict from raw job results (sums, counts, passkey answers)."""
    ev = cfg.eval
    names = [m["name"] for m in models]
    teacher = next(m["name"] for m in models if m["role"] == "teacher")
    scaled = next((m["name"] for m in models if m["role"] == "scaled"), None)
    short = sorted(set(ev.short_lengths))
    _record_model_windows(models, results)
    nll = _nll_figures(results, domains, names, scaled)
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "definitions": DEFINITIONS,
        "reference": {"teacher": teacher, "scaled": scaled},
        "config": {
            "model": cfg.model.model_dump(mode="json"),
            "rope": cfg.rope.model_dump(mode="json"),
            "eval": cfg.eval.model_dump(mode="json"),
        },
        "models": models,
        "domains": domains,
        "short_lengths": short,
        "long_lengths": sorted(set(ev.long_lengths)),
        "nll": nll,
        "restoration": (rest := _restoration_figures(nll, domains, names, teacher, scaled, short)),
        "unseen_recovery": _unseen_figures(nll, rest, domains, names, teacher, short),
        "relation_kl": _relation_kl_figures(results, domains),
        "passkey": _passkey_figures(results, names, ev, sorted(passkey_prompts), scaled),
        "skipped": _all_skipped(skipped, results),
        "job_seconds": _job_seconds(results),
    }
    report = clean_json(report)
    report["metrics"] = flat_metrics(report)  # the flat names MLflow gets, for sweeps and callers
    return report


# --------------------------------------------------------------------------- metric names


def flat_metrics(report: dict) -> dict[str, float]:
    """MLflow metric name -> value. Names: <domain>.<model>.<figure>_<length>, passkey.<model>.acc_<length>."""
    m: dict[str, float] = {}
    for dom, by_model in report["nll"].items():
        for n, by_len in by_model.items():
            for L, v in by_len.items():
                m[f"{dom}.{safe_name(n)}.nll_{L}"] = v["nll"]
                m[f"{dom}.{safe_name(n)}.ppl_{L}"] = v["ppl"]
                if v.get("vs_scaled"):
                    m[f"{dom}.{safe_name(n)}.p_vs_scaled_{L}"] = v["vs_scaled"]["p_value"]
    for dom, by_model in report["restoration"].items():
        for n, by_len in by_model.items():
            for L, v in by_len.items():
                for k in ("recovery_pct", "gap_closed_pct"):
                    if v.get(k) is not None:
                        m[f"{dom}.{safe_name(n)}.{k}_{L}"] = v[k]
    for n, by_len in report.get("unseen_recovery", {}).items():
        for L, u in by_len.items():
            m[f"unseen.{safe_name(n)}.recovery_pct_{L}"] = u["mean"]["recovery_pct"]
            m[f"unseen.{safe_name(n)}.recovery_ci_low_{L}"] = u["mean"]["ci"][0]
            m[f"unseen.{safe_name(n)}.recovery_ci_high_{L}"] = u["mean"]["ci"][1]
            m[f"unseen.{safe_name(n)}.worst_recovery_pct_{L}"] = u["worst"]["recovery_pct"]
    for dom, by_model in report["relation_kl"].items():
        for n, by_len in by_model.items():
            for L, v in by_len.items():
                for r, x in v["mean"].items():
                    m[f"{dom}.{safe_name(n)}.relkl_{r}_{L}"] = x
    for n, pk in report["passkey"].items():
        for L, a in pk["accuracy_by_length"].items():
            m[f"passkey.{safe_name(n)}.acc_{L}"] = a
        m[f"passkey.{safe_name(n)}.acc"] = pk["accuracy_overall"]
        if pk.get("vs_scaled"):
            m[f"passkey.{safe_name(n)}.wins_minus_losses_vs_scaled"] = (
                pk["vs_scaled"]["wins"] - pk["vs_scaled"]["losses"]
            )
            m[f"passkey.{safe_name(n)}.p_vs_scaled"] = pk["vs_scaled"]["p_value"]
        if pk.get("answer_kinds") and pk.get("prompts"):
            m[f"passkey.{safe_name(n)}.no_number_share"] = pk["answer_kinds"]["no_number"] / pk["prompts"]
        fc = pk.get("forced_choice")
        if fc:
            for L, a in fc["accuracy_by_length"].items():
                m[f"passkey.{safe_name(n)}.choice_acc_{L}"] = a
            m[f"passkey.{safe_name(n)}.choice_acc"] = fc["accuracy_overall"]
            m[f"passkey.{safe_name(n)}.key_logprob"] = fc["key_logprob_mean"]
            if fc.get("vs_scaled"):
                m[f"passkey.{safe_name(n)}.choice_p_vs_scaled"] = fc["vs_scaled"]["p_value"]
            if fc.get("logprob_vs_scaled"):
                m[f"passkey.{safe_name(n)}.key_logprob_diff_vs_scaled"] = fc["logprob_vs_scaled"]["mean_diff"]
                m[f"passkey.{safe_name(n)}.key_logprob_p_vs_scaled"] = fc["logprob_vs_scaled"]["p_value"]
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
