"""The config each trial trains with: absolute paths, its own run storage, no MLflow run of its own."""

from __future__ import annotations

from linearard_ray.sweep.search_space import apply_params, parse_space, trial_name
from tests.sweep.configs import base_config


def test_trial_run_config_is_absolute_and_untracked(tmp_path, monkeypatch):
    from linearard_ray.sweep.plan import make_plan, run_config

    monkeypatch.chdir(tmp_path)
    base = base_config(
        **{
            "data.sources": ["corpus/*.txt", "builtin:sotu/train", "genre:scripture"],
            "train.checkpoint_every": 5,
            "train.eval_every": 2,
            "tune.storage_path": "sweeps",
            "train.output_dir": "students",
            "train.eval_sources": {"mine": ["held/*.md", "builtin:pydocs"], "legal": ["genre:legal"]},
        }
    )
    specs = parse_space({"rope.factor": {"grid": [2.0, 3.0]}}, base)
    plan = make_plan(base, specs)
    name = trial_name(base.tune.sweep_name, apply_params(base, {"rope.factor": 3.0}))
    cfg = run_config(plan, {"rope.factor": 3.0}, name)
    assert cfg.rope.factor == 3.0 and cfg.train.run_name == name
    assert cfg.train.storage_path == str(tmp_path / "sweeps" / base.tune.sweep_name / "runs")
    assert cfg.train.output_dir == str(tmp_path / "students" / base.tune.sweep_name)
    # named corpora resolve from any directory: only paths are made absolute
    assert cfg.data.sources == [str(tmp_path / "corpus" / "*.txt"), "builtin:sotu/train", "genre:scripture"]
    assert cfg.train.eval_sources == {
        "mine": [str(tmp_path / "held" / "*.md"), "builtin:pydocs"],
        "legal": ["genre:legal"],
    }
    assert cfg.tracking.enabled is False
    assert cfg.train.checkpoint_every == 6  # a multiple of eval_every, so every report has a fresh objective


def test_a_swept_source_list_keeps_the_sweeps_teacher_samples(tmp_path, monkeypatch):
    """The driver appends the teacher samples it drew once to the base config's data.sources; a
    trial that sweeps data.sources replaces that list and must get them back, in its training
    config and in the data the driver prepares for it."""
    from linearard_ray.data.teacher_samples import samples_path
    from linearard_ray.sweep.plan import make_plan, run_config

    monkeypatch.chdir(tmp_path)
    samples = {"num_samples": 2, "max_new_tokens": 16, "min_tokens": 4, "batch_size": 2}
    base = base_config(**{"data.sources": ["builtin:sotu/train"], "data.teacher_samples": samples})
    drawn = str(samples_path(base))
    base = apply_params(base, {"data.sources": ["builtin:sotu/train", drawn]})  # what with_teacher_samples returns
    space = {"data.sources": {"choice": [["builtin:sotu/train"], ["builtin:pydocs/tutorial"]]}}
    plan = make_plan(base, parse_space(space, base))
    for mix in (["builtin:sotu/train"], ["builtin:pydocs/tutorial"]):
        params = {"data.sources": mix}
        cfg = run_config(plan, params, trial_name(base.tune.sweep_name, apply_params(base, params)))
        assert cfg.data.sources == [*mix, drawn]
    without = make_plan(base_config(), parse_space(space, base_config()))
    assert run_config(without, {"data.sources": ["builtin:pydocs/tutorial"]}, "t").data.sources == [
        "builtin:pydocs/tutorial"
    ]
