"""The config each trial trains with: absolute paths, its own run storage, no MLflow run of its own."""

from __future__ import annotations

from linearard_ray.sweep.search_space import apply_params, parse_space, trial_name
from tests.sweep.configs import base_config


def test_trial_run_config_is_absolute_and_untracked(tmp_path, monkeypatch):
    from linearard_ray.sweep.plan import make_plan, run_config

    monkeypatch.chdir(tmp_path)
    base = base_config(
        **{
            "data.sources": ["corpus/*.txt", "builtin:sotu/train"],
            "train.checkpoint_every": 5,
            "train.eval_every": 2,
            "tune.storage_path": "sweeps",
            "train.output_dir": "students",
            "train.eval_sources": {"mine": ["held/*.md", "builtin:pydocs"]},
        }
    )
    specs = parse_space({"rope.factor": {"grid": [2.0, 3.0]}}, base)
    plan = make_plan(base, specs)
    name = trial_name(base.tune.sweep_name, apply_params(base, {"rope.factor": 3.0}))
    cfg = run_config(plan, {"rope.factor": 3.0}, name)
    assert cfg.rope.factor == 3.0 and cfg.train.run_name == name
    assert cfg.train.storage_path == str(tmp_path / "sweeps" / base.tune.sweep_name / "runs")
    assert cfg.train.output_dir == str(tmp_path / "students" / base.tune.sweep_name)
    assert cfg.data.sources == [str(tmp_path / "corpus" / "*.txt"), "builtin:sotu/train"]
    assert cfg.train.eval_sources == {"mine": [str(tmp_path / "held" / "*.md"), "builtin:pydocs"]}
    assert cfg.tracking.enabled is False
    assert cfg.train.checkpoint_every == 6  # a multiple of eval_every, so every report has a fresh objective
