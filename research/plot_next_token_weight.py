#!/usr/bin/env python
"""Round 5 of the SmolLM2 study in one figure: what a next-token term on the KL terms' own blocks
buys and costs, against the 4.25M-token CPT baseline.

Reads only committed results: round 4's tsample-vmix (weight 0; short figures from its report,
long ones from the printed lines of its cut-short evaluation) and round 5's raw evaluation jobs
(weights 0.2 / 0.5 / 1 and CPT). All share the same windows and seeds.

    python research/plot_next_token_weight.py --out research/results/next-token-weight/next_token_weight.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_ROOT = RESULTS.parent.parent
for p in (_ROOT, _ROOT / "research"):  # runnable from a checkout that is not installed
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
TEACHER = {("main", 2048): 21.87, ("other", 2048): 8.19}  # fallback; read from the round-4 report below
RUNS = {0.0: "tsample-vmix", 0.2: "tsample-vmix-ce2", 0.5: "tsample-vmix-ce5", 1.0: "tsample-vmix-ce10"}


def round4_weight0(results: Path) -> dict[tuple[str, int], float]:
    report = json.loads((results / "teacher-text/report.json").read_text())
    ppl = {(d, int(L)): v["ppl"] for d in ("main", "other") for L, v in report["nll"][d]["tsample-vmix"].items()}
    for d in ("main", "other"):
        TEACHER[(d, 2048)] = report["nll"][d]["teacher"]["2048"]["ppl"]
    pat = re.compile(r"\[evaluate\] tsample-vmix (main|other) L=(\d+): ppl ([0-9.]+)")
    for m in pat.finditer((results / "teacher-text/long_partial.txt").read_text()):
        ppl[(m.group(1), int(m.group(2)))] = float(m.group(3))
    return ppl


def round5(results: Path) -> dict[str, dict[tuple[str, int], float]]:
    from restoration_study import job_figures, read_job_records

    out: dict[str, dict] = {}
    for (m, d, L), v in job_figures(read_job_records([results / "next-token-weight/jobs.jsonl"]))[0].items():
        out.setdefault(m, {})[(d, L)] = v
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = Path(a.results)
    ppl = round5(res)
    ppl["tsample-vmix"] = round4_weight0(res)
    missing = [name for name in [*RUNS.values(), "cpt"] if name not in ppl]
    if missing:
        print(f"plot_next_token_weight.py: no figures for {missing} under {res}", file=sys.stderr)
        return 2
    w = sorted(RUNS)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for d, label, c in (("main", "SOTU (training domain)", "tab:blue"), ("other", "pydocs (unseen)", "tab:orange")):
        ax1.plot(w, [100 * TEACHER[(d, 2048)] / ppl[RUNS[x]][(d, 2048)] for x in w], "o-", color=c, label=label)
        ax1.axhline(
            100 * TEACHER[(d, 2048)] / ppl["cpt"][(d, 2048)],
            color=c,
            ls=":",
            lw=1,
            label=f"CPT 4.25M, {label.split()[0]}",
        )
    ax1.axhspan(98, 102, color="tab:blue", alpha=0.08, label="SOTU within 2%")
    ax1.axhline(95, color="tab:orange", ls="--", lw=1, label="pydocs target 95%")
    ax1.set(xlabel="next-token weight", ylabel="recovery @2048 (teacher ppl ÷ model ppl, %)", title="Short text")
    ax1.legend(fontsize=7)
    for L, mk in ((16384, "o-"), (32768, "s-")):
        ax2.plot(w, [ppl[RUNS[x]][("main", L)] for x in w], mk, color="tab:blue", label=f"SOTU {L // 1024}K")
        ax2.axhline(
            ppl["cpt"][("main", L)],
            color="tab:red",
            ls=":" if L == 16384 else "--",
            lw=1,
            label=f"CPT 4.25M, SOTU {L // 1024}K",
        )
    ax2.set(xlabel="next-token weight", ylabel="perplexity", title="Long context, SOTU 1990–2016")
    ax2.legend(fontsize=7)
    fig.suptitle(
        "SmolLM2-135M PI×4: relation KL (V-heavy) + logit KL + next-token on the same 2K blocks, "
        "SOTU + teacher samples, 4.25M tokens",
        fontsize=8,
    )
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
