"""The report's PNG plots: perplexity against context length, the recovery on unseen genres, a
passkey heatmap per model, and the passkey summary (accuracies with their intervals, the forced
choice, the key's log-probability).

Each plot is built by a ``*_figure`` function (what the readability test draws) and saved at
``DPI`` by its ``plot_*`` function. Sizes and fonts are chosen for the saved PNG at its real size:
no wider than about 1300 px, so a report viewer shows it unscaled, and no text under 8 pt (12 px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linearard_ray.evaluation.report import domain_title

DPI = 110
TITLE_PT = 11
LABEL_PT = 10
TEXT_PT = 9  # tick labels, legends, cell values
NOTE_PT = 8  # annotations beside bars and points


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    _pyplot().close(fig)
    return path


def _length_axis(ax, lengths: list[int]) -> None:
    """Context lengths on a log2 axis, labelled where there is data and nowhere else."""
    import matplotlib.ticker as mticker

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(mticker.FixedLocator(lengths))
    ax.xaxis.set_major_formatter(mticker.FixedFormatter([str(L) for L in lengths]))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    if len(lengths) == 1:  # a log axis around a single point: a factor of two either side
        ax.set_xlim(lengths[0] / 2, lengths[0] * 2)


def _perplexity_axis(ax, values: list[float]) -> None:
    """Perplexity on a log axis when it spans more than a factor of 10 (a model outside its window
    sits orders of magnitude above the rest), else linear; plain-number labels either way, at
    least a few of them."""
    import matplotlib.ticker as mticker

    lo, hi = min(values), max(values)
    if hi / lo > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(mticker.NullLocator())
    else:
        ax.yaxis.set_major_locator(mticker.MaxNLocator(nbins=6, min_n_ticks=3))
        pad = max(0.05 * (hi - lo), 0.02 * hi)
        ax.set_ylim(lo - pad, hi + pad)


def ppl_figure(report: dict):
    """One panel per text domain: perplexity against context length, one line per model."""
    plt = _pyplot()
    doms = list(report["domains"])
    n = max(len(doms), 1)
    fig, axes = plt.subplots(1, n, figsize=(min(6.0 * n, 12.0), 4.6), squeeze=False)
    native = {m["name"]: m.get("max_position_embeddings") for m in report["models"]}
    for ax, dom in zip(axes[0], doms, strict=False):
        lengths: set[int] = set()
        values: list[float] = []
        for name, by_len in report["nll"][dom].items():
            pts = sorted((int(L), v["ppl"]) for L, v in by_len.items())
            if not pts:
                continue
            window = f" (window {native[name]})" if native.get(name) else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}{window}")
            lengths.update(p[0] for p in pts)
            values += [p[1] for p in pts]
        if not values:
            continue
        _length_axis(ax, sorted(lengths))
        _perplexity_axis(ax, values)
        tw = native.get(report["reference"]["teacher"])
        if tw and min(lengths) <= tw <= max(lengths):
            ax.axvline(tw, color="gray", ls=":", lw=1)
            ax.annotate(
                "teacher window",
                (tw, 0.98),
                xycoords=("data", "axes fraction"),
                fontsize=NOTE_PT,
                color="gray",
                rotation=90,
                va="top",
                ha="right",
            )
        ax.tick_params(labelsize=TEXT_PT)
        ax.set_xlabel("context length (tokens)", fontsize=LABEL_PT)
        ax.set_ylabel("perplexity", fontsize=LABEL_PT)
        ax.set_title(domain_title(dom, report["domains"][dom]), fontsize=TITLE_PT, wrap=True)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=TEXT_PT)
    fig.tight_layout()
    return fig


def plot_ppl_vs_length(report: dict, path: Path) -> Path:
    """ppl_vs_length.png (see ``ppl_figure``)."""
    return _save(ppl_figure(report), path)


def passkey_figure(report: dict, name: str):
    """One model's passkey accuracy as a heatmap over key depth and prompt length."""
    plt = _pyplot()
    pk = report["passkey"][name]
    grid = np.array([[np.nan if x is None else x for x in row] for row in pk["accuracy"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(pk["lengths"]) + 3.2, 0.6 * len(pk["depths"]) + 2.0))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(pk["lengths"])), [str(L) for L in pk["lengths"]], fontsize=TEXT_PT)
    ax.set_yticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]], fontsize=TEXT_PT)
    ax.set_xlabel("prompt length (tokens)", fontsize=LABEL_PT)
    ax.set_ylabel("key depth", fontsize=LABEL_PT)
    ax.set_title(f"passkey accuracy: {name}", fontsize=TITLE_PT)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            cell = "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
            ax.text(j, i, cell, ha="center", va="center", fontsize=TEXT_PT)
    bar = fig.colorbar(im, ax=ax)
    bar.ax.tick_params(labelsize=TEXT_PT)
    fig.tight_layout()
    return fig


def plot_passkey(report: dict, name: str, path: Path) -> Path:
    """passkey_<model>.png (see ``passkey_figure``)."""
    return _save(passkey_figure(report, name), path)


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
        _legend_above(ax)
    for i, st in enumerate(stats):
        v = st.get("vs_scaled")
        label = f"{st.get('correct', '?')}/{st.get('prompts', '?')}" + (f", p {v['p_value']:.2g}" if v else "")
        ax.annotate(
            label, (min(ci[i, 1], 1.0), i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=NOTE_PT
        )
    ax.set_yticks(y, names, fontsize=TEXT_PT)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)  # room right of a full bar for its count and p
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.tick_params(axis="x", labelsize=TEXT_PT)
    ax.set_xlabel(xlabel, fontsize=LABEL_PT)
    ax.set_title(title, fontsize=TITLE_PT, loc="left")


def _legend_above(ax) -> None:
    """The legend above the panel, right of its left-aligned title: inside, it would cover the
    bars' counts or the points."""
    ax.legend(fontsize=TEXT_PT, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, borderaxespad=0.2)


def _nats_ticks(lowest: float) -> list[float]:
    """Plain-number ticks for the symlog log-probability axis, from ``lowest`` up to 0."""
    steps = [-1000.0, -500.0, -200.0, -100.0, -50.0, -20.0, -10.0, -5.0, -2.0, -1.0, 0.0]
    ticks = [t for t in steps if t >= lowest]
    # every other one on a wide axis, so labels never collide; 0 always stays
    return ticks if len(ticks) <= 7 else ticks[len(ticks) % 2 :: 2]


def _logprob_panel(ax, names: list[str], pks: list[dict], base: str | None) -> None:
    """Each prompt's log P(true key) as a faint dot, the model's mean as a bar tick, and the paired
    sign test against the baseline: it keeps ordering models where the accuracies sit at 0 or 1."""
    import matplotlib.ticker as mticker

    rng = np.random.default_rng(0)  # jitter only, so the figure is the same every run
    per_model = [np.array([x["key_logprob"] for rs in pk["answers"].values() for x in rs], dtype=float) for pk in pks]
    for i, (n, pk, vals) in enumerate(zip(names, pks, per_model, strict=False)):
        color = "tab:gray" if n == base else "tab:blue"
        ax.scatter(vals, i + rng.uniform(-0.18, 0.18, vals.size), s=8, color=color, alpha=0.35, lw=0)
        ax.plot([vals.mean()] * 2, [i - 0.3, i + 0.3], color=color, lw=2.5)
        v = pk["forced_choice"].get("logprob_vs_scaled")
        label = f"mean {vals.mean():.2f}" + (f", {v['higher']}↑/{v['lower']}↓ p {v['p_value']:.2g}" if v else "")
        ax.annotate(label, (vals.mean(), i - 0.32), ha="center", va="bottom", fontsize=NOTE_PT)
    if base in names:
        ax.axvline(float(per_model[names.index(base)].mean()), color="tab:gray", ls="--", lw=1, label=f"{base}: mean")
        _legend_above(ax)
    # symlog: a model outside its window sits tens of nats down, while trained models differ by one
    # or two; a linear axis would squash those together. Ticks as plain numbers, not powers of ten.
    ax.set_xscale("symlog", linthresh=1.0)
    lowest = 1.5 * min(min(float(vals.min()) for vals in per_model), -1.0)
    ax.set_xlim(lowest, 0.0)  # log-probabilities are <= 0; room for the lowest label
    ax.xaxis.set_major_locator(mticker.FixedLocator(_nats_ticks(lowest)))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.tick_params(axis="x", labelsize=TEXT_PT)
    ax.set_yticks(np.arange(len(names)), names, fontsize=TEXT_PT)
    ax.set_ylim(len(names) - 0.5, -0.7)
    ax.set_xlabel(
        "log P(true key), nats, symlog (dots: prompts; ↑/↓: prompts above / below the baseline)", fontsize=LABEL_PT
    )
    ax.set_title("passkey retrieval: the key's log-probability", fontsize=TITLE_PT, loc="left")


def passkey_summary_figure(report: dict):
    """One bar per model: overall passkey accuracy with its Wilson 95% interval, the unrestored
    baseline's interval shaded, and each model's sign-test p against it, so overlapping intervals
    and a weak p are seen before a ranking is read off the bars. With the forced choice, a second
    panel gives the same for it: a gap between the panels is the answer's wording, not retrieval.
    A third shows the true key's log-probability prompt by prompt, which still orders models once
    both accuracies saturate. Panels are stacked, each with the model names, so the figure stays
    narrow enough to read at its saved size."""
    plt = _pyplot()
    names = list(report["passkey"])
    pks = [report["passkey"][n] for n in names]
    base = report["reference"].get("scaled")
    forced = all("forced_choice" in pk for pk in pks)
    rows = 3 if forced else 1
    panel_h = 0.5 * len(names) + 1.9
    fig, axes = plt.subplots(rows, 1, figsize=(9.5, rows * panel_h), squeeze=False)
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
            axes[1, 0],
            names,
            [pk["forced_choice"] for pk in pks],
            base,
            f"true key scored above {k - 1} distractors{near} (teacher-forced)",
            f"passkey retrieval: forced choice among {k} keys",
            chance=1 / k,
        )
        _logprob_panel(axes[2, 0], names, pks, base)
    fig.tight_layout()
    return fig


def plot_passkey_summary(report: dict, path: Path) -> Path:
    """passkey_summary.png (see ``passkey_summary_figure``)."""
    return _save(passkey_summary_figure(report), path)


def unseen_figure(report: dict):
    """One panel per short length: each model's recovery on every unseen genre and their mean, as
    bars with the bootstrap interval over windows, against the teacher's 100%. The worst genre is
    where a recipe falls short, so each model's worst bar is outlined; the mean alone hides it."""
    plt = _pyplot()
    unseen = report["unseen_recovery"]
    lengths = sorted({int(L) for by_len in unseen.values() for L in by_len})
    genres = sorted({d for by_len in unseen.values() for u in by_len.values() for d in u["domains"]})
    fig, axes = plt.subplots(len(lengths), 1, figsize=(9.5, 2.9 * len(lengths) + 0.6), squeeze=False)
    for ax, length in zip(axes[:, 0], lengths, strict=True):
        _unseen_panel(ax, {n: by_len[str(length)] for n, by_len in unseen.items() if str(length) in by_len}, genres)
        ax.set_title(f"recovery on unseen genres at {length} tokens", fontsize=TITLE_PT)
    fig.suptitle(
        "teacher perplexity ÷ model perplexity (dashed: the teacher; bars: bootstrap interval; outlined: "
        "each model's worst genre)",
        fontsize=NOTE_PT,
    )
    fig.tight_layout()
    return fig


def _unseen_panel(ax, by_model: dict, genres: list[str]) -> None:
    """Grouped bars: one group per genre and one for the mean, one bar per model."""
    from matplotlib.patches import Patch

    groups = [*genres, "mean"]
    width = 0.8 / len(by_model)
    tops = [100.0]
    for i, (name, u) in enumerate(by_model.items()):
        figures = {**u["domains"], "mean": u["mean"]}
        shown = [g for g in groups if g in figures]
        xs = [groups.index(g) + (i - (len(by_model) - 1) / 2) * width for g in shown]
        ys = [figures[g]["recovery_pct"] for g in shown]
        errs = [[y - figures[g]["ci"][0] for g, y in zip(shown, ys, strict=True)]]
        errs.append([figures[g]["ci"][1] - y for g, y in zip(shown, ys, strict=True)])
        bars = ax.bar(xs, ys, width * 0.9, yerr=errs, capsize=2, label=name)
        worst = bars[shown.index(u["worst"]["domain"])]
        worst.set_edgecolor("black")
        worst.set_linewidth(1.5)
        tops += [figures[g]["ci"][1] for g in shown]
    ax.axhline(100.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=TEXT_PT)
    ax.tick_params(axis="y", labelsize=TEXT_PT)
    ax.set_ylim(0, max(tops) * 1.08)
    ax.set_ylabel("recovery %", fontsize=LABEL_PT)
    # plain swatches: a legend drawn from the bars would copy a worst bar's outline
    bar_sets = [c for c in ax.containers if hasattr(c, "patches")]  # not the error bars
    handles = [Patch(facecolor=c.patches[0].get_facecolor(), label=c.get_label()) for c in bar_sets]
    ax.legend(handles=handles, fontsize=TEXT_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_unseen(report: dict, path: Path) -> Path:
    """unseen_recovery.png (see ``unseen_figure``)."""
    return _save(unseen_figure(report), path)
