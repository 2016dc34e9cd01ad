"""The report's PNG plots: perplexity against context length, a passkey heatmap per model, and
the passkey summary (accuracies with their intervals, the forced choice, the key's log-probability)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linearard_ray.evaluation.report import domain_title


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
        ax.set_title(domain_title(dom, report["domains"][dom]), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_passkey(report: dict, name: str, path: Path) -> Path:
    """One model's passkey accuracy as a heatmap over key depth and prompt length."""
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
