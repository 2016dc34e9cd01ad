"""The evaluation report: figures computed from raw job results, ``report.json``, ``report.md``
(tables), PNG plots (perplexity against context length; a passkey heatmap per model) and the
MLflow run that carries them."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from linearard_ray.evaluation.paired_stats import (
    answer_kinds,
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


def _clean(x):
    """JSON-safe: NaN/inf become None, numpy scalars become Python ones."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


CHOICE_FIELDS = ("choice_correct", "choice_rank", "key_logprob")
RELATION_KINDS = ("q", "k", "v", "qk")
RELATION_TITLES = {"q": "Q/Q", "k": "K/K", "v": "V/V", "qk": "Q/K (attention)"}


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


def build_report(
    cfg, models: list[dict], domains: dict, results: list[dict], skipped: list[dict], passkey_prompts: dict
) -> dict:
    """Assemble the report dict from raw job results (sums, counts, passkey answers)."""
    ev = cfg.eval
    names = [m["name"] for m in models]
    teacher = next(m["name"] for m in models if m["role"] == "teacher")
    scaled = next((m["name"] for m in models if m["role"] == "scaled"), None)
    short = sorted(set(ev.short_lengths))
    windows_max = {}
    for r in results:
        windows_max[r["model"]] = r.get("max_position_embeddings")
    for m in models:
        m["max_position_embeddings"] = windows_max.get(m["name"])

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
            for L, v in nll[d][n].items():
                base = nll[d].get(scaled, {}).get(L) if scaled and n != scaled else None
                if base and "window_nll" in v and "window_nll" in base:
                    v["vs_scaled"] = paired_windows(v["window_nll"], base["window_nll"])

    rest: dict = {d: {} for d in domains}
    for d in domains:
        for n in names:
            if n == teacher:
                continue
            for L in short:
                t = nll[d][teacher].get(str(L))
                m = nll[d][n].get(str(L))
                if t is None or m is None:
                    continue
                s = nll[d][scaled].get(str(L)) if scaled else None
                rest[d].setdefault(n, {})[str(L)] = restoration(t["nll"], s["nll"] if s else None, m["nll"])

    relkl: dict = {d: {} for d in domains}
    for r in results:
        if r["kind"] != "relkl":
            continue
        kinds = [k for k in RELATION_KINDS if k in r["rows"]]  # jobs from before the attention map lack "qk"
        per_layer = [
            {"layer": int(l), **{k: v[k] / r["rows"][k] for k in kinds}}
            for l, v in sorted(r["sums"].items(), key=lambda kv: int(kv[0]))
        ]
        mean = {k: float(np.mean([p[k] for p in per_layer])) for k in kinds}
        relkl[r["domain"]].setdefault(r["model"], {})[str(r["length"])] = {"mean": mean, "per_layer": per_layer}

    depths = list(ev.passkey_depths)
    pk_lengths = sorted(passkey_prompts)
    passkey: dict = {}
    for n in names:
        by_len = {r["length"]: r["results"] for r in results if r["kind"] == "passkey" and r["model"] == n}
        if not by_len:
            continue
        grid = []
        for d in depths:
            row = []
            for L in pk_lengths:
                trials = [x for x in by_len.get(L, []) if x["depth"] == d]
                row.append(float(np.mean([x["correct"] for x in trials])) if trials else None)
            grid.append(row)
        allr = [x["correct"] for rs in by_len.values() for x in rs]
        per_len = {str(L): float(np.mean([x["correct"] for x in by_len[L]])) for L in pk_lengths if L in by_len}
        forced = all("choice_correct" in x for rs in by_len.values() for x in rs)
        fields = ("depth", "key", "answer", "correct") + (CHOICE_FIELDS if forced else ())
        samples = {str(L): [{k: x[k] for k in fields} for x in by_len[L]] for L in pk_lengths if L in by_len}
        passkey[n] = {
            "lengths": pk_lengths,
            "depths": depths,
            "trials": ev.passkey_trials,
            "accuracy": grid,
            "accuracy_by_length": per_len,
            "accuracy_overall": float(np.mean(allr)),
            "answers": samples,
            "correct": int(sum(allr)),
            "prompts": len(allr),
            "ci95": wilson_interval(int(sum(allr)), len(allr)),
            "answer_kinds": answer_kinds(x for rs in by_len.values() for x in rs),
        }
        if forced:
            passkey[n]["forced_choice"] = _forced_choice(by_len, pk_lengths, ev.passkey_choices, ev.passkey_distractors)
    if scaled in passkey:
        for n, pk in passkey.items():
            if n != scaled:
                pk["vs_scaled"] = paired_comparison(pk["answers"], passkey[scaled]["answers"])
                if "forced_choice" in pk and "forced_choice" in passkey[scaled]:
                    pk["forced_choice"]["vs_scaled"] = paired_comparison(
                        pk["answers"], passkey[scaled]["answers"], field="choice_correct"
                    )
                    pk["forced_choice"]["logprob_vs_scaled"] = paired_logprob(pk["answers"], passkey[scaled]["answers"])

    seconds: dict = {}
    for r in results:
        seconds[r["model"]] = seconds.get(r["model"], 0.0) + r.get("seconds", 0.0)

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
        "restoration": rest,
        "relation_kl": relkl,
        "passkey": passkey,
        "skipped": list(skipped)
        + [
            {k: r[k] for k in ("section", "model", "domain", "length", "reason")}
            for r in results
            if r["kind"] == "skip"
        ],
        "job_seconds": seconds,
    }
    report = _clean(report)
    report["metrics"] = flat_metrics(report)  # the flat names MLflow gets, for sweeps and callers
    return report


# --------------------------------------------------------------------------- files


def write_json(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(_clean(report), indent=2, ensure_ascii=False, allow_nan=False))
    return path


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def _domain_title(dom: str, info: dict) -> str:
    kind = "main texts (eval.texts)" if dom == "main" else "second domain (eval.other_texts)"
    return f"{kind}: {', '.join(info['sources'])}"


def _forced_choice_table(report: dict, base: str | None) -> list[str]:
    """Markdown lines for the forced-choice passkey figures; none when no model has them."""
    fc = {n: pk["forced_choice"] for n, pk in report["passkey"].items() if "forced_choice" in pk}
    if not fc:
        return []
    Ls = list(next(iter(fc.values()))["accuracy_by_length"])
    paired = base in fc
    choices = next(iter(fc.values()))["choices"]
    near = next(iter(fc.values())).get("distractors") == "one_digit"
    lines = [
        "",
        f"Forced choice among {choices} keys{', the distractors one digit away' if near else ''} "
        f"(retrieval apart from the answer's wording; chance {1 / choices:.2f}):",
        "",
        "| model | correct / prompts | accuracy (95% interval) | "
        + " | ".join(Ls)
        + " | mean log P(key) |"
        + (
            f" vs {base}: wins / losses / ties | p (sign test) | log P(key) vs {base}: higher / lower (mean diff) | p |"
            if paired
            else ""
        ),
        "|---|---|---|" + "---|" * (len(Ls) + 1) + ("---|---|---|---|" if paired else ""),
    ]
    for n, f in fc.items():
        lines.append(
            f"| {n} | {_accuracy_cells(f)} | "
            + " | ".join(_f(f["accuracy_by_length"].get(L), "{:.2f}") for L in Ls)
            + f" | {f['key_logprob_mean']:.2f} |"
            + (
                _paired_cells(n, base, f.get("vs_scaled")) + _logprob_cells(n, base, f.get("logprob_vs_scaled"))
                if paired
                else ""
            )
        )
    return lines


def _logprob_cells(n: str, base: str, v: dict | None) -> str:
    """The two cells of a model's key log-probability against the baseline's, prompt by prompt."""
    if n == base:
        return " | |"
    return (
        f" {v['higher']} / {v['lower']} ({v['mean_diff']:+.2f}) | {v['p_value']:.3g} |"
        if v
        else " no shared prompts | |"
    )


def _kinds_cell(pk: dict) -> str:
    k = pk.get("answer_kinds")
    return f" {k['right']} / {k['other_number']} / {k['no_number']} |" if k else " – |"


def _accuracy_cells(st: dict) -> str:
    """'correct / prompts | accuracy (95% interval)' of a passkey score (greedy or forced choice)."""
    ci = st.get("ci95")
    return f"{st.get('correct', '–')} / {st.get('prompts', '–')} | {st['accuracy_overall']:.2f}" + (
        f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
    )


def _paired_cells(n: str, base: str, v: dict | None) -> str:
    """The two cells after a passkey row: wins / losses / ties against the baseline, and p."""
    if n == base:
        return " (the baseline) | |"
    return f" {v['wins']} / {v['losses']} / {v['ties']} | {v['p_value']:.3g} |" if v else " no shared prompts | |"


def render_markdown(report: dict) -> str:
    lines: list[str] = ["# Evaluation report", ""]
    ref = report["reference"]
    lines += [
        f"Created {report['created']}. Reference model: **{ref['teacher']}**"
        + (
            f"; unrestored baseline: **{ref['scaled']}**."
            if ref["scaled"]
            else "; no unrestored baseline (gap closed not computed)."
        ),
        "",
    ]
    lines += ["## Models", "", "| name | role | path | RoPE | max_position_embeddings |", "|---|---|---|---|---|"]
    for m in report["models"]:
        rope = (
            m["rope"]
            if isinstance(m["rope"], str)
            else ", ".join(
                f"{k}={v}" for k, v in m["rope"].items() if k in ("type", "factor", "max_position_embeddings")
            )
        )
        lines.append(
            f"| {m['name']} | {m['role']} | `{m['path']}` | {rope} | {_f(m.get('max_position_embeddings'), '{}')} |"
        )
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()] + [""]

    names = [m["name"] for m in report["models"]]
    for dom, info in report["domains"].items():
        lines += [
            f"## Texts: {_domain_title(dom, info)}",
            "",
            f"{info['documents']} documents, {info['tokens']} tokens"
            + (
                f" ({info['empty_documents_skipped']} empty documents skipped)"
                if info["empty_documents_skipped"]
                else ""
            )
            + ".",
            "",
            "| length | windows | built from | documents per window |",
            "|---|---|---|---|",
        ]
        for L, w in info["lengths"].items():
            if w["skipped"]:
                lines.append(f"| {L} | skipped | {w.get('reason', '')} | |")
            else:
                note = "" if w["n_windows"] == w["requested_windows"] else f" of {w['requested_windows']} requested"
                lines.append(f"| {L} | {w['n_windows']}{note} | {w['construction']} | {w['docs_per_window']:.2f} |")
        concat = [
            L for L, w in info["lengths"].items() if not w["skipped"] and w["construction"] == "concatenated documents"
        ]
        if concat:
            lines += [
                "",
                f"Windows of {', '.join(concat)} tokens were cut from **concatenated documents** (the documents "
                "joined in order, EOS-separated), because fewer than eval.max_windows single documents are that long.",
            ]
        short = [str(L) for L in report["short_lengths"]]
        long = [str(L) for L in report["long_lengths"] if str(L) not in short]
        for title, lengths in (
            ("Short text: perplexity (mean NLL in nats)", short),
            ("Long context: perplexity (mean NLL in nats)", long),
        ):
            if not lengths:
                continue
            lines += [
                "",
                f"### {title}",
                "",
                "| model | " + " | ".join(lengths) + " |",
                "|---|" + "---|" * len(lengths),
            ]
            for n in names:
                cells = []
                for L in lengths:
                    v = report["nll"][dom].get(n, {}).get(L)
                    w = (v or {}).get("vs_scaled")
                    cells.append(
                        "skipped"
                        if v is None
                        else f"{v['ppl']:.3f} ({v['nll']:.4f})"
                        + (f"; better on {w['better']}/{w['windows']} windows, p {w['p_value']:.2g}" if w else "")
                    )
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        rest = report["restoration"].get(dom, {})
        if rest:
            sl = [str(L) for L in report["short_lengths"]]
            lines += [
                "",
                f"### Restoration on {'the main texts' if dom == 'main' else 'the second domain'} "
                "(recovery % = teacher ppl ÷ model ppl; gap closed % in NLL)",
                "",
                "| model | " + " | ".join(f"recovery {L} | gap closed {L}" for L in sl) + " |",
                "|---|" + "---|---|" * len(sl),
            ]
            for n, by_len in rest.items():
                cells = []
                for L in sl:
                    r = by_len.get(L)
                    cells += (
                        ["–", "–"]
                        if r is None
                        else [_f(r["recovery_pct"], "{:.1f}%"), _f(r["gap_closed_pct"], "{:.1f}%")]
                    )
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        rk = report["relation_kl"].get(dom, {})
        if rk:
            kinds = [
                k for k in RELATION_KINDS if any(k in v["mean"] for by_len in rk.values() for v in by_len.values())
            ]
            head = " | ".join(RELATION_TITLES[k] for k in kinds)
            lines += [
                "",
                "### Relation KL to the teacher (mean over layers)",
                "",
                f"| model | length | {head} |",
                "|---|---|" + "---|" * len(kinds),
            ]
            for n, by_len in rk.items():
                for L, v in by_len.items():
                    lines.append(f"| {n} | {L} | " + " | ".join(_f(v["mean"].get(k), "{:.4g}") for k in kinds) + " |")
            lines += ["", "Per layer (first short length):", ""]
            for n, by_len in rk.items():
                L, v = next(iter(by_len.items()))
                lines += [f"{n} at {L} tokens:", "", f"| layer | {head} |", "|---|" + "---|" * len(kinds)]
                lines += [
                    f"| {p['layer']} | " + " | ".join(_f(p.get(k), "{:.4g}") for k in kinds) + " |"
                    for p in v["per_layer"]
                ]
                lines.append("")
        lines.append("")

    if report["passkey"]:
        base = report["reference"].get("scaled")
        paired = base in report["passkey"]
        head = "| model | correct / prompts | accuracy (95% interval) | answers: right / other number / no number |"
        lines += [
            "## Passkey retrieval",
            "",
            head + (f" vs {base}: wins / losses / ties | p (sign test) |" if paired else ""),
            "|---|---|---|---|" + ("---|---|" if paired else ""),
        ]
        for n, pk in report["passkey"].items():
            lines.append(
                f"| {n} | {_accuracy_cells(pk)} |"
                + _kinds_cell(pk)
                + (_paired_cells(n, base, pk.get("vs_scaled")) if paired else "")
            )
        lines += _forced_choice_table(report, base)
        lines += ["", "Accuracy per depth × length:", ""]
        for n, pk in report["passkey"].items():
            Ls = [str(L) for L in pk["lengths"]]
            lines += [
                f"**{n}** ({pk['trials']} trials per cell; overall {pk['accuracy_overall']:.2f})",
                "",
                "| depth | " + " | ".join(Ls) + " |",
                "|---|" + "---|" * len(Ls),
            ]
            for d, row in zip(pk["depths"], pk["accuracy"], strict=False):
                lines.append(f"| {d:g} | " + " | ".join(_f(x, "{:.2f}") for x in row) + " |")
            lines.append("")

    if report.get("lm_eval"):
        lines += ["## lm-evaluation-harness", "", "```", json.dumps(report["lm_eval"], indent=1), "```", ""]

    lines += ["## Skipped", ""]
    if report["skipped"]:
        for s in report["skipped"]:
            where = (
                " ".join(str(x) for x in (s["section"], s.get("model"), s.get("domain")) if x)
                + f" length {s['length']}"
            )
            lines.append(f"- {where}: {s['reason']}")
    else:
        lines.append("Nothing was skipped.")
    lines.append("")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_ppl_vs_length(report: dict, path: Path) -> Path:
    """One panel per text domain: perplexity against context length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    doms = list(report["domains"])
    fig, axes = plt.subplots(1, max(len(doms), 1), figsize=(6 * max(len(doms), 1), 4.2), squeeze=False)
    native = {m["name"]: m.get("max_position_embeddings") for m in report["models"]}
    for ax, dom in zip(axes[0], doms, strict=False):
        for n, by_len in report["nll"][dom].items():
            pts = sorted((int(L), v["ppl"]) for L, v in by_len.items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n} (window {native.get(n)})")
        tw = native.get(report["reference"]["teacher"])
        Ls = [int(L) for by_len in report["nll"][dom].values() for L in by_len]
        if tw and Ls and min(Ls) <= tw <= max(Ls):
            ax.axvline(tw, color="gray", ls=":", lw=1)
            ax.annotate(
                "teacher window",
                (tw, 1),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="gray",
                rotation=90,
                va="top",
                ha="right",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(_domain_title(dom, report["domains"][dom]), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_passkey(report: dict, name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pk = report["passkey"][name]
    grid = np.array([[np.nan if x is None else x for x in row] for row in pk["accuracy"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(pk["lengths"]) + 2.5, 0.6 * len(pk["depths"]) + 1.8))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(pk["lengths"])), [str(L) for L in pk["lengths"]])
    ax.set_yticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey accuracy: {name}")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def _summary_panel(
    ax, names: list[str], stats: list[dict], base: str | None, xlabel: str, title: str, chance: float | None = None
) -> None:
    """Bars of overall accuracy with Wilson intervals, the baseline's interval shaded, p per model."""
    acc = np.array([st["accuracy_overall"] for st in stats])
    ci = np.array([st.get("ci95") or (a, a) for st, a in zip(stats, acc, strict=False)], dtype=float)
    y = np.arange(len(names))
    ax.barh(y, acc, color=["tab:gray" if n == base else "tab:blue" for n in names], alpha=0.7)
    ax.errorbar(acc, y, xerr=[acc - ci[:, 0], ci[:, 1] - acc], fmt="none", ecolor="black", capsize=3, lw=1)
    if base in names:
        lo, hi = ci[names.index(base)]
        ax.axvspan(lo, hi, color="tab:gray", alpha=0.12, label=f"{base}: 95% interval")
    if chance is not None:
        ax.axvline(chance, color="tab:red", ls=":", lw=1, label=f"chance: {chance:.2f}")
    if base in names or chance is not None:
        ax.legend(fontsize=7, loc="best")
    for i, st in enumerate(stats):
        v = st.get("vs_scaled")
        label = f"{st.get('correct', '?')}/{st.get('prompts', '?')}" + (f", p {v['p_value']:.2g}" if v else "")
        ax.annotate(label, (min(ci[i, 1], 1.0), i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)


def _logprob_panel(ax, names: list[str], pks: list[dict], base: str | None) -> None:
    """Each prompt's log P(true key) as a faint dot, the model's mean as a bar tick, and the paired
    sign test against the baseline: it keeps ordering models where the accuracies sit at 0 or 1."""
    rng = np.random.default_rng(0)  # jitter only, so the figure is the same every run
    per_model = [np.array([x["key_logprob"] for rs in pk["answers"].values() for x in rs], dtype=float) for pk in pks]
    for i, (n, pk, vals) in enumerate(zip(names, pks, per_model, strict=False)):
        color = "tab:gray" if n == base else "tab:blue"
        ax.scatter(vals, i + rng.uniform(-0.18, 0.18, vals.size), s=6, color=color, alpha=0.35, lw=0)
        ax.plot([vals.mean()] * 2, [i - 0.3, i + 0.3], color=color, lw=2.5)
        v = pk["forced_choice"].get("logprob_vs_scaled")
        label = f"{vals.mean():.2f}" + (f", {v['higher']}↑/{v['lower']}↓ p {v['p_value']:.2g}" if v else "")
        ax.annotate(label, (vals.mean(), i - 0.32), ha="center", va="bottom", fontsize=7)
    if base in names:
        ax.axvline(float(per_model[names.index(base)].mean()), color="tab:gray", ls="--", lw=1, label=f"{base}: mean")
        ax.legend(fontsize=7, loc="best")
    # symlog: a model outside its window sits tens of nats down, while trained models differ by one
    # or two; a linear axis would squash those together
    ax.set_xscale("symlog", linthresh=1.0)
    lowest = min(float(vals.min()) for vals in per_model)
    ax.set_xlim(1.5 * min(lowest, -1.0), 0.0)  # log-probabilities are <= 0; room for the lowest label
    ax.set_yticks(np.arange(len(names)), [""] * len(names))
    ax.set_ylim(len(names) - 0.5, -0.6)
    ax.set_xlabel("log P(true key), nats, symlog (dots: prompts; ↑/↓: prompts above / below the baseline)", fontsize=8)
    ax.set_title("passkey retrieval: the key's log-probability", fontsize=9)


def plot_passkey_summary(report: dict, path: Path) -> Path:
    """One bar per model: overall passkey accuracy with its Wilson 95% interval, the unrestored
    baseline's interval shaded, and each model's sign-test p against it, so overlapping intervals
    and a weak p are seen before a ranking is read off the bars. With the forced choice, a second
    panel gives the same for it: a gap between the panels is the answer's wording, not retrieval.
    A third shows the true key's log-probability prompt by prompt, which still orders models once
    both accuracies saturate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["passkey"])
    pks = [report["passkey"][n] for n in names]
    base = report["reference"].get("scaled")
    forced = all("forced_choice" in pk for pk in pks)
    fig, axes = plt.subplots(
        1, 3 if forced else 1, figsize=(19 if forced else 7.5, 0.45 * len(names) + 1.6), squeeze=False
    )
    _summary_panel(
        axes[0, 0],
        names,
        pks,
        base,
        "greedy answer correct, over all prompts (bars: Wilson 95% interval; p: sign test vs the baseline)",
        "passkey retrieval: greedy answer",
    )
    if forced:
        k = pks[0]["forced_choice"]["choices"]
        near = " one digit away" if pks[0]["forced_choice"].get("distractors") == "one_digit" else ""
        _summary_panel(
            axes[0, 1],
            names,
            [pk["forced_choice"] for pk in pks],
            base,
            f"true key scored above {k - 1} distractors{near} (teacher-forced)",
            f"passkey retrieval: forced choice among {k} keys",
            chance=1 / k,
        )
        axes[0, 1].set_yticks(np.arange(len(names)), [""] * len(names))
        _logprob_panel(axes[0, 2], names, pks, base)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """report.json, report.md, ppl_vs_length.png, passkey_summary.png and passkey_<model>.png; the
    report lists its plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ppl_plot = out_dir / "ppl_vs_length.png"
    if any(by_len for by_model in report["nll"].values() for by_len in by_model.values()):
        plots = [plot_ppl_vs_length(report, ppl_plot)]
    else:
        # A passkey-only evaluation has no perplexity to draw; an earlier run's figure in the same
        # directory would otherwise pass for this report's.
        ppl_plot.unlink(missing_ok=True)
        plots = []
    if report["passkey"]:
        plots.append(plot_passkey_summary(report, out_dir / "passkey_summary.png"))
    for n in report["passkey"]:
        plots.append(plot_passkey(report, n, out_dir / f"passkey_{_safe(n)}.png"))
    report["plots"] = [p.name for p in plots]
    md = out_dir / "report.md"
    md.write_text(
        render_markdown(report) + "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    )
    return [write_json(report, out_dir / "report.json"), md, *plots]


# --------------------------------------------------------------------------- MLflow


def flat_metrics(report: dict) -> dict[str, float]:
    """MLflow metric name -> value. Names: <domain>.<model>.<figure>_<length>, passkey.<model>.acc_<length>."""
    m: dict[str, float] = {}
    for dom, by_model in report["nll"].items():
        for n, by_len in by_model.items():
            for L, v in by_len.items():
                m[f"{dom}.{_safe(n)}.nll_{L}"] = v["nll"]
                m[f"{dom}.{_safe(n)}.ppl_{L}"] = v["ppl"]
                if v.get("vs_scaled"):
                    m[f"{dom}.{_safe(n)}.p_vs_scaled_{L}"] = v["vs_scaled"]["p_value"]
    for dom, by_model in report["restoration"].items():
        for n, by_len in by_model.items():
            for L, v in by_len.items():
                for k in ("recovery_pct", "gap_closed_pct"):
                    if v.get(k) is not None:
                        m[f"{dom}.{_safe(n)}.{k}_{L}"] = v[k]
    for dom, by_model in report["relation_kl"].items():
        for n, by_len in by_model.items():
            for L, v in by_len.items():
                for r, x in v["mean"].items():
                    m[f"{dom}.{_safe(n)}.relkl_{r}_{L}"] = x
    for n, pk in report["passkey"].items():
        for L, a in pk["accuracy_by_length"].items():
            m[f"passkey.{_safe(n)}.acc_{L}"] = a
        m[f"passkey.{_safe(n)}.acc"] = pk["accuracy_overall"]
        if pk.get("vs_scaled"):
            m[f"passkey.{_safe(n)}.wins_minus_losses_vs_scaled"] = pk["vs_scaled"]["wins"] - pk["vs_scaled"]["losses"]
            m[f"passkey.{_safe(n)}.p_vs_scaled"] = pk["vs_scaled"]["p_value"]
        if pk.get("answer_kinds") and pk.get("prompts"):
            m[f"passkey.{_safe(n)}.no_number_share"] = pk["answer_kinds"]["no_number"] / pk["prompts"]
        fc = pk.get("forced_choice")
        if fc:
            for L, a in fc["accuracy_by_length"].items():
                m[f"passkey.{_safe(n)}.choice_acc_{L}"] = a
            m[f"passkey.{_safe(n)}.choice_acc"] = fc["accuracy_overall"]
            m[f"passkey.{_safe(n)}.key_logprob"] = fc["key_logprob_mean"]
            if fc.get("vs_scaled"):
                m[f"passkey.{_safe(n)}.choice_p_vs_scaled"] = fc["vs_scaled"]["p_value"]
            if fc.get("logprob_vs_scaled"):
                m[f"passkey.{_safe(n)}.key_logprob_diff_vs_scaled"] = fc["logprob_vs_scaled"]["mean_diff"]
                m[f"passkey.{_safe(n)}.key_logprob_p_vs_scaled"] = fc["logprob_vs_scaled"]["p_value"]
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}


def log_mlflow(cfg, report: dict, out_dir: Path) -> dict:
    """One MLflow run with the config, every figure as a metric (perplexity also as a curve over
    length: metric <domain>.<model>.ppl with step = length) and the report files as artifacts."""
    from linearard_ray.config import flatten
    from linearard_ray.tracking import RunLogger, create_run, ensure_experiment

    uri = cfg.tracking.resolved_uri()
    exp = ensure_experiment(uri, cfg.tracking.experiment)
    names = "+".join(m["name"] for m in report["models"])
    run_id = create_run(uri, exp, f"eval-{names}", tags={"linearard.stage": "evaluate"})
    log = RunLogger(uri, run_id)
    try:
        params = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] in ("model", "rope", "eval")}
        log.log_params(params)
        log.log_metrics(flat_metrics(report), step=0)
        for dom, by_model in report["nll"].items():
            for n, by_len in by_model.items():
                for L, v in by_len.items():
                    log.log_metrics({f"{dom}.{_safe(n)}.ppl": v["ppl"]}, step=int(L))
        log.log_artifact(out_dir, "eval")
        log.finish("FINISHED")
    except Exception:
        log.finish("FAILED")
        raise
    return {"tracking_uri": uri, "experiment_id": exp, "run_id": run_id}
