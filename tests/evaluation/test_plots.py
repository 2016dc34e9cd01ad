"""Every PNG the product writes is readable at its saved size: the evaluation's perplexity plot,
passkey heatmaps and passkey summary, the recovery on unseen genres, and the sweep's objective
plot, drawn from small synthetic inputs. Checked on the figure as drawn at the saved DPI: the PNG's
pixel size, text of at least MIN_TEXT_PX pixels, every text (titles included) inside the figure,
and at least two labelled ticks on every axis that shows data."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from linearard_ray.evaluation import plots
from linearard_ray.evaluation.report import build_report
from tests.evaluation.test_report import _synthetic

MIN_TEXT_PX = 10.0  # font size in points × DPI / 72 at the saved size
MAX_WIDTH_PX = 1400  # wider than this, a report viewer shrinks the image and its text with it


def _labelled_ticks(axis) -> list[str]:
    """The tick labels drawn inside the axis' view, major and minor."""
    lo, hi = sorted(axis.get_view_interval())
    span = hi - lo
    out = []
    for which in ("major", "minor"):
        locs = axis.get_majorticklocs() if which == "major" else axis.get_minorticklocs()
        labels = axis.get_majorticklabels() if which == "major" else axis.get_minorticklabels()
        for loc, lab in zip(locs, labels, strict=False):
            if lab.get_visible() and lab.get_text().strip() and lo - 1e-9 * span <= loc <= hi + 1e-9 * span:
                out.append(lab.get_text())
    return out


def _has_data(ax) -> bool:
    return bool(ax.lines or ax.collections or ax.patches or ax.images)


def check_readable(fig, png: bytes, dpi: float) -> None:
    """The figure as saved at ``dpi`` (``png``) is readable at that size."""
    import matplotlib.text

    with Image.open(io.BytesIO(png)) as im:
        size = im.size
    want = tuple(int(round(v * dpi)) for v in fig.get_size_inches())
    assert all(abs(a - b) <= 1 for a, b in zip(size, want, strict=True)), (size, want)
    assert size[0] <= MAX_WIDTH_PX, f"{size[0]} px wide: text shrinks when it is displayed"
    fig.set_dpi(dpi)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_majorticklabels()  # brings the tick labels up to date
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    assert texts
    for t in texts:
        px = t.get_fontsize() * dpi / 72
        assert px >= MIN_TEXT_PX, f"{t.get_text()!r}: {t.get_fontsize()} pt is {px:.1f} px"
    drawn = {id(lab) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for lab in _drawn_tick_labels(axis)}
    tick_labels = {id(lab) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for lab in _all_tick_labels(axis)}
    for t in texts:
        if id(t) in tick_labels and id(t) not in drawn:
            continue  # a tick outside the view: not drawn
        ext = t.get_window_extent(renderer)
        inside = ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1 and ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1
        assert inside, f"{t.get_text()!r} at {ext} is cut off by the figure ({box})"
    for ax in fig.axes:
        if not _has_data(ax) or hasattr(ax, "_colorbar"):
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _labelled_ticks(axis)
            assert len(labels) >= 2, f"{ax.get_title()!r}: {name} axis has labelled ticks {labels}"


def _all_tick_labels(axis):
    return [*axis.get_majorticklabels(), *axis.get_minorticklabels()]


def _drawn_tick_labels(axis):
    lo, hi = sorted(axis.get_view_interval())
    pairs = [
        *zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=False),
        *zip(axis.get_minorticklocs(), axis.get_minorticklabels(), strict=False),
    ]
    return [lab for loc, lab in pairs if lo - 1e-9 * (hi - lo) <= loc <= hi + 1e-9 * (hi - lo)]


def _saved(tmp_path, plot, *args) -> bytes:
    """What ``plot`` (a plots.plot_* function) writes."""
    path = tmp_path / "plot.png"
    plot(*args, path)
    return path.read_bytes()


def _report(forced: bool) -> dict:
    cfg, models, domains, results, skipped = _synthetic(7, forced=forced)
    return build_report(cfg, models, domains, results, skipped, {100: [], 200: []})


def _ppl_report(lengths: list[int], ppl: dict[str, list[float]], domains: int) -> dict:
    """A report with only what the perplexity plot reads: real context lengths and windows."""
    doms = ["main", "other"][:domains]
    windows = {"teacher": 8192, "scaled": 32768, "restored": 32768}
    return {
        "domains": {d: {"sources": [f"builtin:{d}"]} for d in doms},
        "models": [{"name": n, "max_position_embeddings": windows[n]} for n in ppl],
        "reference": {"teacher": "teacher", "scaled": "scaled"},
        "nll": {
            d: {n: {str(L): {"ppl": v} for L, v in zip(lengths, vals, strict=True)} for n, vals in ppl.items()}
            for d in doms
        },
    }


@pytest.mark.parametrize(
    "lengths, ppl, domains",
    [
        # within a factor of 10: a linear axis with several labels (a log axis labelled one tick)
        ([512, 2048, 4096, 8192], {"teacher": [22.5, 21.9, 21.7, 21.8], "scaled": [24.1, 23.0, 22.6, 22.9]}, 2),
        # a model far outside its window: a log axis, still labelled in plain numbers
        (
            [512, 2048, 16384],
            {"teacher": [22.5, 21.9, 3.1e4], "scaled": [24.1, 23.0, 25.0], "restored": [23.0, 22.0, 22.4]},
            1,
        ),
        ([1024], {"teacher": [22.5], "scaled": [24.0]}, 1),
    ],
)
def test_ppl_vs_length_is_readable_and_ticks_only_where_there_is_data(tmp_path, lengths, ppl, domains):
    rep = _ppl_report(lengths, ppl, domains)
    fig = plots.ppl_figure(rep)
    for ax in fig.axes:
        ticks = [float(t.replace(",", "")) for t in _labelled_ticks(ax.xaxis)]
        assert ticks == [float(L) for L in lengths]  # no tick at a length that has no data
    if len(lengths) > 1:
        check_readable(fig, _saved(tmp_path, plots.plot_ppl_vs_length, rep), plots.DPI)
    else:  # one length: the x axis has a single labelled tick by design
        with pytest.raises(AssertionError, match="x axis"):
            check_readable(fig, _saved(tmp_path, plots.plot_ppl_vs_length, rep), plots.DPI)


@pytest.mark.parametrize("forced", [False, True])
def test_passkey_plots_are_readable(tmp_path, forced):
    rep = _report(forced)
    check_readable(plots.passkey_summary_figure(rep), _saved(tmp_path, plots.plot_passkey_summary, rep), plots.DPI)
    for name in rep["passkey"]:
        check_readable(plots.passkey_figure(rep, name), _saved(tmp_path, plots.plot_passkey, rep, name), plots.DPI)


def test_logprob_axis_is_labelled_in_plain_numbers():
    """The symlog axis of the key's log-probability reads -20, -10, -5 ... 0, not -10^1."""
    fig = plots.passkey_summary_figure(_report(True))
    fig.canvas.draw()
    labels = _labelled_ticks(fig.axes[-1].xaxis)
    assert "0" in labels and all("^" not in lab and "10$" not in lab for lab in labels)
    values = [float(lab.replace("−", "-")) for lab in labels]
    assert values == sorted(values) and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize(
    "space",
    [
        {"rope.factor": {"grid": [2.0, 4.0]}},  # one panel: the title was cut off
        {"rope.factor": {"grid": [2.0, 4.0]}, "objective.relation.layers": {"grid": ["all", "last:1"]}},
        {
            "rope.factor": {"grid": [2.0, 4.0]},
            "objective.relation.layers": {"grid": ["all", "last:1"]},
            "train.lr": {"loguniform": [1e-4, 1e-3]},
        },
    ],
)
def test_sweep_objective_plot_is_readable(space):
    from linearard_ray.sweep.search_space import parse_space
    from linearard_ray.sweep.summary import OBJECTIVE_DPI, objective_figure, plot_objective
    from tests.sweep.configs import base_config
    from tests.sweep.test_summary import _rows

    specs = parse_space(space, base_config())
    rows = _rows()
    rng = np.random.default_rng(0)
    for r in rows:
        r["train.lr"] = float(rng.uniform(1e-4, 1e-3))
    check_readable(objective_figure(rows, specs, "nll_gap"), plot_objective(rows, specs, "nll_gap"), OBJECTIVE_DPI)


def test_unseen_genre_plot_is_readable_and_outlines_each_models_worst_genre(tmp_path):
    from tests.evaluation.test_unseen_genres import _report_on_three_genres

    rep = _report_on_three_genres()
    fig = plots.unseen_figure(rep)
    check_readable(fig, _saved(tmp_path, plots.plot_unseen, rep), plots.DPI)
    for ax, length in zip(fig.axes, ("512", "2048"), strict=True):
        outlined = sorted(p.get_height() for p in ax.patches if p.get_linewidth() == 1.5)
        worst = sorted(by_len[length]["worst"]["recovery_pct"] for by_len in rep["unseen_recovery"].values())
        assert outlined == pytest.approx(worst)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["history", "legal", "standards", "mean"]
