#!/usr/bin/env python
"""Rounds 5 to 13 of the SmolLM2 study in one figure: the two tensions the open targets sit on.

Left (the unseen-domain target): short-text recovery on the unseen pydocs against pydocs perplexity at 32K. The
target corner is ≥ 95% and below the CPT baseline's 32K figure; documentation-genre training text
(unixdocs) on 2K blocks reaches the first and loses the second (round 6); on 8K blocks, or with an
8K next-token stream, it reaches both (round 7). CPT on the same text (cpt-unix) is drawn too.
Right (the long-context target): SOTU perplexity at 32K against passkey accuracy (mean over 8K / 16K / 30K, the
lengths every round scored; round 13 added 4K). The target corner is below CPT's 32K and above
YaRN×4's passkey. The five trainings of the weight-2 recipe (round 6, its repeat and seeds 1-3 in
round 8) are drawn in orange, the nine of weight 2.2 (round 8, seeds 1-5 in round 9, seeds 0-2
again in round 10) in green, the same recipe on the YaRN×4 student (round 10, seeds 0-2) in cyan,
weight 2.2 plus the attention-map term (round 11 seed 0, round 12 seeds 1-3, round 13 seeds 0-1
again) in magenta, and CPT's trainings as red squares: their spread is how far one training is
from the next.

It also prints each recipe over all its trainings (mean and range at SOTU 16K / 32K and of greedy
passkey) with the exact permutation p over trainings against CPT's
(linearard_ray.evaluation.paired_stats.trainings_permutation_p): the trainings are the draws there, where the
window and prompt tests of `restoration_study.py table` take the evaluation text as the draws.

Reads only the committed evaluation jobs (same windows, seeds and prompts in every round); passkey
uses the 24-prompt records where a model has them, else the 9-prompt ones. A trained model that a
later round trained again keeps both points, the later one named "<model> (r8)"
(restoration_study.read_job_records(..., apart=True)); the untrained references evaluate the same
every round.

    python research/plot_study_tradeoffs.py --out research/results/pi4-restore-long/tradeoffs.png
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_ROOT = RESULTS.parent.parent
for p in (_ROOT, _ROOT / "research"):  # runnable from a checkout that is not installed
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
JOBS = [
    "next-token-weight/jobs.jsonl",
    "docs-genre/jobs.jsonl",
    "next-token-weight-4/jobs.jsonl",
    "pi4-restore-docs/jobs.jsonl",
    "retraining-spread/jobs.jsonl",
    "pi4-ce22-seeds/jobs.jsonl",
    "yarn4-restore/jobs.jsonl",
    "attention-map/jobs.jsonl",
    "attention-map-seeds/jobs.jsonl",
    "pi4-restore-long/jobs.jsonl",
]
PASSKEY_LENGTHS = (8192, 16384, 30000)
BASELINES = {"cpt", "cpt-unix", "YaRN×4", "PI×4", "teacher"}
WEIGHT2 = re.compile(r"^tsample-vmix-ce20(-s\d)?( \(r\d+a?\))?$")  # the five trainings of one recipe
WEIGHT22 = re.compile(r"^tsample-vmix-ce22(-s\d)?( \(r\d+\))?$")  # its nine trainings at weight 2.2
YARN22 = re.compile(r"^tsample-vmix-ce22-yarn(-s\d)?$")  # the same recipe on the YaRN×4 student
QK22 = re.compile(r"^tsample-vmix-ce22-qk(-s\d)?( \(r\d+\))?$")  # weight 2.2 plus the attention-map term at weight 1
CPT = re.compile(r"^cpt(-s\d)?( \(r\d+\))?$")
RECIPES = {"ce22 on PI×4": WEIGHT22, "ce22 + attention map (qk 1) on PI×4": QK22, "ce22 on YaRN×4": YARN22, "CPT": CPT}


def figures(results: Path) -> tuple[dict, dict, dict]:
    """ppl[(model, domain, length)], passkey mean accuracy per model (most prompts wins) and the
    prompts per length that accuracy rests on (the fewest over its lengths)."""
    from restoration_study import job_figures, read_job_records

    ppl, acc = job_figures(read_job_records([results / j for j in JOBS], apart=True))
    pk: dict[str, dict[int, tuple[int, float]]] = {}
    for (m, n, L), a in acc.items():
        if L not in PASSKEY_LENGTHS:  # the three every round since round 4 scored (round 13 added 4K)
            continue
        cur = pk.setdefault(m, {}).get(L)
        if cur is None or n > cur[0]:
            pk[m][L] = (n, a)
    mean_pk = {m: sum(a for _, a in by_len.values()) / len(by_len) for m, by_len in pk.items() if len(by_len) == 3}
    return ppl, mean_pk, {m: min(n for n, _ in pk[m].values()) for m in mean_pk}


def recipe_summary(ppl: dict, pk: dict, prompts: dict) -> list[str]:
    """Markdown lines: each recipe of RECIPES over its trainings (mean and range of SOTU 16K / 32K
    perplexity and of greedy passkey prompts answered, from the trainings scored on 72 prompts), and
    the exact permutation p over trainings of its 16K / 32K mean against CPT's trainings."""
    from restoration_study import spread

    from linearard_ray.evaluation.paired_stats import trainings_permutation_p

    models = sorted({k[0] for k in ppl})
    groups = {name: [m for m in models if rx.match(m)] for name, rx in RECIPES.items()}

    def at(ms: list[str], L: int) -> list[float]:
        return [ppl[(m, "main", L)] for m in ms if (m, "main", L) in ppl]

    out = [
        "| recipe | trainings | SOTU @16K | 16K vs CPT, p over trainings | SOTU @32K | 32K vs CPT, p over trainings "
        "| passkey greedy of 72 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ms in groups.items():
        cells = [name, str(len(ms))]
        for L in (16384, 32768):
            xs, base = at(ms, L), at(groups["CPT"], L)
            cells += [
                spread(xs),
                "–" if name == "CPT" or not xs or not base else f"{trainings_permutation_p(xs, base):.2g}",
            ]
        scored = [m for m in ms if prompts.get(m) == 24]
        cells.append(
            spread([72 * pk[m] for m in scored], "{:.1f}")
            + ("" if len(scored) == len(ms) else f"; {len(scored)} trainings")
        )
        out.append("| " + " | ".join(cells) + " |")
    return out


def _scatter(ax, points: dict[str, tuple[float, float]]) -> None:
    """One labelled point per model; the baselines (any training of them) as red squares."""
    from restoration_study import recipe_of

    for m, (x, y) in points.items():
        base = recipe_of(m) in BASELINES
        color = (
            "tab:red"
            if base
            else "tab:orange"
            if WEIGHT2.match(m)
            else "tab:green"
            if WEIGHT22.match(m)
            else "tab:cyan"
            if YARN22.match(m)
            else "magenta"
            if QK22.match(m)
            else "tab:blue"
        )
        ax.scatter(x, y, marker="s" if base else "o", color=color)
        ax.annotate(m, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl, pk, prompts = figures(Path(a.results))
    need = [("teacher", "other", 2048), ("cpt", "other", 32768), ("cpt", "main", 32768)]
    missing = [k for k in need if k not in ppl] + [m for m in ("YaRN×4",) if m not in pk]
    if missing:
        print(f"plot_study_tradeoffs.py: no figures for {missing} under {a.results}", file=sys.stderr)
        return 2
    teacher_other = ppl[("teacher", "other", 2048)]
    models = sorted({k[0] for k in ppl} - {"teacher", "PI×4", "YaRN×4"})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 4.8))

    _scatter(
        ax1,
        {
            m: (100 * teacher_other / ppl[(m, "other", 2048)], ppl[(m, "other", 32768)])
            for m in models
            if (m, "other", 32768) in ppl and (m, "other", 2048) in ppl
        },
    )
    cpt32 = ppl[("cpt", "other", 32768)]
    ax1.axhline(cpt32, color="tab:red", ls="--", lw=1, label=f"CPT (SOTU, 4.25M) 32K: {cpt32:.2f}")
    if ("cpt-unix", "other", 32768) in ppl:
        fair = ppl[("cpt-unix", "other", 32768)]
        ax1.axhline(fair, color="tab:red", ls=":", lw=1, label=f"CPT (SOTU + unixdocs) 32K: {fair:.2f}")
    ax1.axvline(95, color="tab:green", ls="--", lw=1, label="target: 95% of the teacher")
    (x0, x1), (y0, _) = ax1.get_xlim(), ax1.get_ylim()
    ax1.fill_between([95, x1], [y0] * 2, [cpt32] * 2, color="tab:green", alpha=0.08, label="target corner")
    ax1.set_xlim(x0, x1)
    ax1.set(
        xlabel="pydocs @2048: recovery (teacher ppl ÷ model ppl, %)",
        ylabel="pydocs @32K: perplexity",
        title="Unseen domain: short text vs 32K",
    )
    ax1.legend(fontsize=7, loc="upper left")

    _scatter(ax2, {m: (ppl[(m, "main", 32768)], pk[m]) for m in models if (m, "main", 32768) in ppl and m in pk})
    sotu32 = ppl[("cpt", "main", 32768)]
    ax2.axvline(sotu32, color="tab:red", ls="--", lw=1, label=f"CPT (SOTU, 4.25M) 32K: {sotu32:.2f}")
    ax2.axhline(pk["YaRN×4"], color="tab:purple", ls="--", lw=1, label=f"YaRN×4 passkey: {pk['YaRN×4']:.2f}")
    ax2.scatter([], [], color="tab:orange", label="weight 2, five trainings (rounds 6, 8)")
    ax2.scatter([], [], color="tab:green", label="weight 2.2, nine trainings (rounds 8, 9, 10)")
    ax2.scatter([], [], color="tab:cyan", label="weight 2.2 on the YaRN×4 student (round 10)")
    ax2.scatter([], [], color="magenta", label="weight 2.2 + attention map, six trainings (rounds 11-13)")
    ax2.set(
        xlabel="SOTU @32K: perplexity",
        ylabel="passkey accuracy, mean of 8K / 16K / 30K",
        title="Training domain 32K vs passkey",
    )
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the top is where the points are
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print("\n".join(recipe_summary(ppl, pk, prompts)))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
