"""The summary of a sweep: the best trial (by configuration when repeated), the results table,
the objective plot and the best trial's config file."""

from __future__ import annotations

import csv
import io
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from linearard_ray.config import build_config, load_config
from linearard_ray.sweep.search_space import apply_params, parse_space, to_tune_space
from tests.sweep.configs import base_config


def _rows():
    rng = np.random.default_rng()
    vals = rng.uniform(0.01, 1.0, size=5)
    rows = []
    for i, (f, layers) in enumerate(itertools.product([2.0, 4.0], ["all", "last:1"])):
        rows.append(
            {
                "trial": f"sw-{i:08x}",
                "status": "completed",
                "rope.factor": f,
                "objective.relation.layers": layers,
                "nll_gap": float(vals[i]),
                "step": 4.0,
            }
        )
    rows[1]["status"] = "stopped"
    rows[1]["nll_gap"] = float(vals.min()) / 2  # lower, but measured at an earlier rung
    rows[2].update(status="error", nll_gap=None, error="RuntimeError: boom")
    return rows


def test_best_trial_table_plot_and_config(tmp_path):
    from linearard_ray.sweep.plan import make_plan
    from linearard_ray.sweep.summary import best_config_yaml, pick_best, plot_objective, results_table

    base = base_config(**{"train.fail_at_step": 3})
    specs = parse_space(
        {"rope.factor": {"grid": [2.0, 4.0]}, "objective.relation.layers": {"grid": ["all", "last:1"]}}, base
    )
    rows = _rows()
    best = pick_best(rows, "nll_gap", "min")
    completed = [r for r in rows if r["status"] == "completed"]
    assert best is min(completed, key=lambda r: r["nll_gap"])
    assert pick_best(rows, "nll_gap", "max") is max(completed, key=lambda r: r["nll_gap"])
    only_stopped = [dict(rows[1])]
    assert pick_best(only_stopped, "nll_gap", "min")["trial"] == rows[1]["trial"]

    cols = ["trial", "status", "rope.factor", "objective.relation.layers", "nll_gap", "error"]
    csv_text, md = results_table(rows, cols)
    back = list(csv.DictReader(io.StringIO(csv_text)))
    assert [r["trial"] for r in back] == [r["trial"] for r in rows]
    for r, b in zip(rows, back, strict=False):
        assert (b["nll_gap"] == "") if r["nll_gap"] is None else float(b["nll_gap"]) == r["nll_gap"]
    assert md.count("\n") == len(rows) + 2 and "RuntimeError: boom" in md

    png = plot_objective(rows, specs, "nll_gap")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    plan = make_plan(base, specs)
    text = best_config_yaml(plan, best, specs, "nll_gap")
    path = tmp_path / "best_config.yaml"
    path.write_text(text)
    cfg = load_config(path)  # what distill.py --config does
    assert cfg.rope.factor == best["rope.factor"]
    assert (
        cfg.objective.relation.layers
        == apply_params(
            base, {"objective.relation.layers": best["objective.relation.layers"]}
        ).objective.relation.layers
    )
    assert cfg.train.run_name == best["trial"] and cfg.train.fail_at_step is None
    assert cfg.model.teacher == "tiny:llama" and cfg.train.max_steps == 4


def test_repeats_train_with_other_seeds_and_the_best_mean_wins(tmp_path):
    """tune.num_samples > 1 repeats each grid point through a grid of its own (REPEAT_KEY): repeat k
    (named -r<k+1>) trains with train.seed + k (data.seed stays: one preprocessing for all repeats),
    the summary gives each
    configuration's mean and range, and the best configuration is the best mean, not the luckiest
    single training."""
    from ray import tune

    from linearard_ray.sweep.plan import make_plan, run_config
    from linearard_ray.sweep.search_space import REPEAT_KEY
    from linearard_ray.sweep.summary import best_config_yaml, collect_rows, pick_best, point_rows

    base = base_config(**{"train.seed": 7, "data.seed": 3})
    specs = parse_space({"rope.factor": {"grid": [2.0, 4.0]}}, base)
    plan = make_plan(base, specs)
    # each row knows its repeat from the trial's config, which best_config.yaml then trains again
    grid = [
        SimpleNamespace(
            path=f"/x/sw-0a1b2c3d{'-r' + str(k + 1) if k else ''}",
            metrics={"nll_gap": 0.5, "done": True},
            error=None,
            metrics_dataframe=None,
            config={"rope.factor": 2.0, "_repeat": k},
        )
        for k in (0, 1, 10)
    ]
    tcfg = build_config({"tune": {"space": {"rope.factor": {"grid": [2.0, 4.0]}}}}).tune
    rows = collect_rows(grid, specs, plan, tcfg, stopped=set())
    assert {r["trial"]: r["repeat"] for r in rows} == {"sw-0a1b2c3d": 0, "sw-0a1b2c3d-r2": 1, "sw-0a1b2c3d-r11": 10}
    first = run_config(plan, {"rope.factor": 2.0, "_repeat": 0}, "sw-0a1b2c3d")
    third = run_config(plan, {"rope.factor": 2.0, "_repeat": 2}, "sw-0a1b2c3d-r3")
    assert (first.train.seed, first.data.seed) == (7, 3) and (third.train.seed, third.data.seed) == (9, 3)
    assert first.data.output_dir == third.data.output_dir
    space = to_tune_space(specs, "grid", 3)
    assert space[REPEAT_KEY] == tune.grid_search([0, 1, 2]) and REPEAT_KEY not in to_tune_space(specs, "grid", 1)
    assert REPEAT_KEY not in to_tune_space(specs, "random", 3)  # there num_samples counts trials

    rng = np.random.default_rng()
    lucky, steady = sorted(rng.uniform(0.1, 0.2, 2)), sorted(rng.uniform(0.3, 0.4, 3))
    rows = [
        {"trial": "sw-a", "status": "completed", "rope.factor": 2.0, "nll_gap": lucky[0]},
        {"trial": "sw-a-r2", "status": "completed", "rope.factor": 2.0, "nll_gap": lucky[1] + 1.0},
        {"trial": "sw-b", "status": "completed", "rope.factor": 4.0, "nll_gap": steady[0]},
        {"trial": "sw-b-r2", "status": "completed", "rope.factor": 4.0, "nll_gap": steady[1]},
        {"trial": "sw-b-r3", "status": "error", "rope.factor": 4.0, "nll_gap": None},
    ]
    points = point_rows(rows, ["rope.factor"], "nll_gap")
    assert [(p["rope.factor"], p["trials"], p["scored"]) for p in points] == [(2.0, 2, 2), (4.0, 3, 2)]
    assert points[0]["mean_nll_gap"] == pytest.approx((lucky[0] + lucky[1] + 1.0) / 2)
    assert (points[1]["min_nll_gap"], points[1]["max_nll_gap"]) == (steady[0], steady[1])
    assert pick_best(rows, "nll_gap", "min")["trial"] == "sw-a"  # trial by trial: the lucky one
    best = pick_best(rows, "nll_gap", "min", ["rope.factor"])
    assert best["trial"] == "sw-b"  # the steadier configuration, then its best training
    text = best_config_yaml(plan, dict(best, trial="sw-b-r2", repeat=1), specs, "nll_gap")
    again = load_config_text(tmp_path, text)
    assert (again.train.seed, again.data.seed, again.rope.factor) == (8, 3, 4.0)


def load_config_text(tmp_path, text: str):
    path = tmp_path / "best_config.yaml"
    path.write_text(text)
    return load_config(path)


def _tune_result(name: str, step: int, total: int | None, **config):
    metrics = {"nll_gap": 0.3, "step": step, "done": False}
    if total is not None:
        metrics["total_steps"] = total
    return SimpleNamespace(path=f"/x/{name}", metrics=metrics, error=None, metrics_dataframe=None, config=config)


def test_a_trial_stopped_at_its_last_step_is_completed():
    """ASHA decides at a rung; when the rung is the trial's last step, the trial has trained every
    step and is reported completed, not "stopped early". One stopped before its last step stays
    stopped; without the step count (reports from before it was added) the scheduler's word stands."""
    from linearard_ray.sweep.plan import make_plan
    from linearard_ray.sweep.summary import collect_rows

    base = base_config()
    specs = parse_space({"rope.factor": {"grid": [2.0, 4.0]}}, base)
    plan = make_plan(base, specs)
    total = int(np.random.default_rng().integers(4, 40))
    grid = [
        _tune_result("sw-last", total, total, **{"rope.factor": 2.0}),
        _tune_result("sw-early", total // 2, total, **{"rope.factor": 4.0}),
        _tune_result("sw-old", total, None, **{"rope.factor": 4.0}),
    ]
    rows = collect_rows(grid, specs, plan, base.tune, stopped={"sw-last", "sw-early", "sw-old"})
    assert {r["trial"]: r["status"] for r in rows} == {
        "sw-last": "completed",
        "sw-early": "stopped",
        "sw-old": "stopped",
    }


def test_per_configuration_table_names_its_trials():
    from linearard_ray.sweep.summary import _results_texts

    cfg = base_config(**{"tune.num_samples": 2})
    specs = parse_space({"rope.factor": {"grid": [2.0, 4.0]}}, cfg)
    rows = [
        {"trial": name, "status": "completed", "rope.factor": f, "nll_gap": g}
        for name, f, g in (("sw-a", 2.0, 0.1), ("sw-a-r2", 2.0, 0.2), ("sw-b", 4.0, 0.3), ("sw-b-r2", 4.0, 0.4))
    ]
    _, md = _results_texts(cfg, specs, rows)
    per_config = md.split("Per configuration")[1]
    assert "trial names" in per_config
    assert "| sw-a, sw-a-r2 |" in per_config and "| sw-b, sw-b-r2 |" in per_config
