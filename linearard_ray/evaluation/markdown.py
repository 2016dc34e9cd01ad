"""``report.md``: the report dict as Markdown tables (models, definitions, per text domain the
windows, perplexity, restoration and relation KL; passkey retrieval; lm-eval; what was skipped)."""

from __future__ import annotations

import json

from linearard_ray.evaluation.report import RELATION_KINDS, RELATION_TITLES, domain_title


def _or_dash(x, fmt="{:.3f}") -> str:
    """x formatted, or a dash where the figure is missing."""
    return "–" if x is None else fmt.format(x)


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
            + " | ".join(_or_dash(f["accuracy_by_length"].get(L), "{:.2f}") for L in Ls)
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


def _header_lines(report: dict) -> list[str]:
    ref = report["reference"]
    return [
        "# Evaluation report",
        "",
        f"Created {report['created']}. Reference model: **{ref['teacher']}**"
        + (
            f"; unrestored baseline: **{ref['scaled']}**."
            if ref["scaled"]
            else "; no unrestored baseline (gap closed not computed)."
        ),
        "",
    ]


def _models_lines(report: dict) -> list[str]:
    """The models table, then the definitions."""
    lines = ["## Models", "", "| name | role | path | RoPE | max_position_embeddings |", "|---|---|---|---|---|"]
    for m in report["models"]:
        rope = (
            m["rope"]
            if isinstance(m["rope"], str)
            else ", ".join(
                f"{k}={v}" for k, v in m["rope"].items() if k in ("type", "factor", "max_position_embeddings")
            )
        )
        window = _or_dash(m.get("max_position_embeddings"), "{}")
        lines.append(f"| {m['name']} | {m['role']} | `{m['path']}` | {rope} | {window} |")
    return lines + ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()] + [""]


def _windows_lines(dom: str, info: dict) -> list[str]:
    """A text domain's heading and how its windows were built, length by length."""
    lines = [
        f"## Texts: {domain_title(dom, info)}",
        "",
        f"{info['documents']} documents, {info['tokens']} tokens"
        + (f" ({info['empty_documents_skipped']} empty documents skipped)" if info["empty_documents_skipped"] else "")
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
    return lines


def _perplexity_cell(v: dict | None) -> str:
    """Perplexity (NLL) at one length, with the window-by-window comparison against the baseline."""
    if v is None:
        return "skipped"
    w = v.get("vs_scaled")
    return f"{v['ppl']:.3f} ({v['nll']:.4f})" + (
        f"; better on {w['better']}/{w['windows']} windows, p {w['p_value']:.2g}" if w else ""
    )


def _perplexity_lines(report: dict, dom: str) -> list[str]:
    """The short-text and the long-context perplexity tables of one domain."""
    names = [m["name"] for m in report["models"]]
    short = [str(L) for L in report["short_lengths"]]
    long = [str(L) for L in report["long_lengths"] if str(L) not in short]
    lines: list[str] = []
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
            *_table_head("model", lengths),
        ]
        for n in names:
            cells = [_perplexity_cell(report["nll"][dom].get(n, {}).get(L)) for L in lengths]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _table_head(first: str, columns: list[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]


def _domain_phrase(dom: str, info: dict) -> str:
    where = {"main": "the main texts", "other": "the second domain"}.get(dom, f"held-out domain {dom}")
    return where + (" (in-domain)" if info.get("in_domain") else "")


def _restoration_lines(report: dict, dom: str) -> list[str]:
    rest = report["restoration"].get(dom, {})
    if not rest:
        return []
    sl = [str(L) for L in report["short_lengths"]]
    lines = [
        "",
        f"### Restoration on {_domain_phrase(dom, report['domains'].get(dom, {}))} "
        "(recovery % = teacher ppl ÷ model ppl; gap closed % in NLL)",
        "",
        *_table_head("model", [c for L in sl for c in (f"recovery {L}", f"gap closed {L}")]),
    ]
    for n, by_len in rest.items():
        cells = []
        for L in sl:
            r = by_len.get(L)
            cells += (
                ["–", "–"]
                if r is None
                else [_or_dash(r["recovery_pct"], "{:.1f}%"), _or_dash(r["gap_closed_pct"], "{:.1f}%")]
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _relation_kl_lines(report: dict, dom: str) -> list[str]:
    """Relation KL per model and length (mean over layers), then per layer at the first length."""
    rk = report["relation_kl"].get(dom, {})
    if not rk:
        return []
    kinds = [k for k in RELATION_KINDS if any(k in v["mean"] for by_len in rk.values() for v in by_len.values())]
    head = " | ".join(RELATION_TITLES[k] for k in kinds)
    lines = [
        "",
        "### Relation KL to the teacher (mean over layers)",
        "",
        f"| model | length | {head} |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for n, by_len in rk.items():
        for L, v in by_len.items():
            lines.append(f"| {n} | {L} | " + " | ".join(_or_dash(v["mean"].get(k), "{:.4g}") for k in kinds) + " |")
    lines += ["", "Per layer (first short length):", ""]
    for n, by_len in rk.items():
        L, v = next(iter(by_len.items()))
        lines += [f"{n} at {L} tokens:", "", f"| layer | {head} |", "|---|" + "---|" * len(kinds)]
        lines += [
            f"| {p['layer']} | " + " | ".join(_or_dash(p.get(k), "{:.4g}") for k in kinds) + " |"
            for p in v["per_layer"]
        ]
        lines.append("")
    return lines


def _domain_lines(report: dict, dom: str, info: dict) -> list[str]:
    return (
        _windows_lines(dom, info)
        + _perplexity_lines(report, dom)
        + _restoration_lines(report, dom)
        + _relation_kl_lines(report, dom)
        + [""]
    )


def _passkey_lines(report: dict) -> list[str]:
    """The passkey summary against the baseline, the forced choice, and accuracy per depth × length."""
    if not report["passkey"]:
        return []
    base = report["reference"].get("scaled")
    paired = base in report["passkey"]
    head = "| model | correct / prompts | accuracy (95% interval) | answers: right / other number / no number |"
    lines = [
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
            *_table_head("depth", Ls),
        ]
        for d, row in zip(pk["depths"], pk["accuracy"], strict=False):
            lines.append(f"| {d:g} | " + " | ".join(_or_dash(x, "{:.2f}") for x in row) + " |")
        lines.append("")
    return lines


def _ci(ci) -> str:
    return f" ({ci[0]:.1f}–{ci[1]:.1f})" if ci else ""


def _unseen_lines(report: dict) -> list[str]:
    """Recovery on the unseen genres (mean and worst, with intervals) beside the in-domain figure."""
    unseen = report.get("unseen_recovery") or {}
    if not unseen:
        return []
    first = next(iter(next(iter(unseen.values())).values()))
    conf = round(100 * first["confidence"])
    lines = [
        "## Recovery on unseen genres",
        "",
        f"Recovery % = teacher perplexity ÷ model perplexity on held-out genres (eval.domains) that are not "
        f"of the training sources' genre; {conf}% bootstrap intervals over windows. In-domain: the same ratio "
        "on text of the training genre, which measures fitting the training text, not general ability. "
        "A perplexity ratio is not a benchmark's accuracy share.",
        "",
        "| model | length | mean over unseen genres | worst (genre) | each unseen genre | in-domain |",
        "|---|---|---|---|---|---|",
    ]
    for n, by_len in unseen.items():
        for L, u in by_len.items():
            each = "; ".join(
                f"{d} {v['recovery_pct']:.1f}%{_ci(v['ci'])} ({v['windows']} windows)" for d, v in u["domains"].items()
            )
            ind = "; ".join(f"{d} {v:.1f}%" for d, v in u["in_domain"].items()) or "–"
            w = u["worst"]
            lines.append(
                f"| {n} | {L} | {u['mean']['recovery_pct']:.1f}%{_ci(u['mean']['ci'])} | "
                f"{w['recovery_pct']:.1f}%{_ci(w['ci'])} ({w['domain']}) | {each} | {ind} |"
            )
    return lines + [""]


def _lm_eval_lines(report: dict) -> list[str]:
    if not report.get("lm_eval"):
        return []
    return ["## lm-evaluation-harness", "", "```", json.dumps(report["lm_eval"], indent=1), "```", ""]


def _skipped_lines(report: dict) -> list[str]:
    lines = ["## Skipped", ""]
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
    return lines


def render_markdown(report: dict) -> str:
    """The report as Markdown (without the plots, which ``outputs.write_report`` appends)."""
    lines = _header_lines(report) + _unseen_lines(report) + _models_lines(report)
    for dom, info in report["domains"].items():
        lines += _domain_lines(report, dom, info)
    lines += _passkey_lines(report) + _lm_eval_lines(report) + _skipped_lines(report)
    return "\n".join(lines)
