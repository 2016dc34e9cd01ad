"""Sweeps: the checks before Ray starts, Tune's scheduler and concurrency, the command line, and a
4-trial Ray Tune sweep of a tiny model recorded in MLflow."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from linearard_ray.config import ConfigError, build_config, load_config
from linearard_ray.sweep.search_space import apply_params, parse_space, trial_name
from tests.local_ray import local_ray
from tests.scripts import ROOT
from tests.sweep.configs import base_config

# --------------------------------------------------------------------------- sweep checks


TWO_BY_TWO = {"rope.factor": {"grid": [2.0, 4.0]}, "objective.relation.layers": {"grid": ["all", "last:2"]}}


def test_optuna_missing_gives_a_clear_message(monkeypatch):
    from linearard_ray.sweep.tune import check_sweep

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    cfg = base_config(**{"tune.search": "optuna", "tune.space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError) as e:
        check_sweep(cfg)
    assert "tune.search=optuna" in str(e.value) and "pip install optuna" in str(e.value)


def test_sweep_needs_the_in_training_objective():
    from linearard_ray.sweep.tune import check_sweep

    with pytest.raises(ConfigError, match="train.eval_every"):
        check_sweep(base_config(**{"train.eval_every": None}))
    with pytest.raises(ConfigError, match="train.eval_long_len"):
        check_sweep(base_config(**{"tune.metric": "long_nll"}))
    with pytest.raises(ConfigError, match="tune.metric='perplexity'"):
        check_sweep(base_config(**{"tune.metric": "perplexity"}))
    assert [s.key for s in check_sweep(base_config())] == ["rope.factor", "objective.relation.layers"]


def test_teacher_samples_and_a_swept_teacher_do_not_mix():
    """The samples are made once from the base teacher: a swept teacher would train on another
    model's text, so the sweep is refused before anything runs."""
    from linearard_ray.sweep.tune import check_sweep

    samples = {"data.teacher_samples": {"num_samples": 4, "max_new_tokens": 16, "min_tokens": 4}}
    space = {"model.teacher": {"grid": ["tiny:llama", "tiny:mistral"]}}
    with pytest.raises(ConfigError, match="tune.space\\['model.teacher'\\]: data.teacher_samples"):
        check_sweep(base_config(**samples, **{"tune.space": space}))
    assert [s.key for s in check_sweep(base_config(**{"tune.space": space}))] == ["model.teacher"]
    assert check_sweep(base_config(**samples))  # samples with the default space are fine


def test_a_swept_value_that_fails_distills_checks_stops_the_sweep_before_ray():
    """Layer selections and block lengths are checked against the model for every swept value,
    not only inside each trial after Ray has started."""
    from linearard_ray.sweep.tune import check_sweep

    layers = {"objective.relation.layers": {"grid": ["all", "last:999"]}}
    with pytest.raises(ConfigError, match="tune.space\\['objective.relation.layers'\\]: value 'last:999'.*999 layers"):
        check_sweep(base_config(**{"tune.space": layers}))
    with pytest.raises(ConfigError, match="tune.space\\['data.ctx_len'\\]: value 1000000"):
        check_sweep(base_config(**{"tune.space": {"data.ctx_len": {"choice": [64, 1000000]}}}))
    assert [s.key for s in check_sweep(base_config(**{"tune.space": {"data.ctx_len": {"choice": [32, 64]}}}))] == [
        "data.ctx_len"
    ]


def test_sweep_objective_can_be_another_domain():
    """train.eval_sources domains report eval_<name>_<metric>, which tune.metric may name."""
    from linearard_ray.sweep.metrics import context_metrics
    from linearard_ray.sweep.tune import check_sweep

    pydocs = {"train.eval_sources": {"pydocs": ["builtin:pydocs"]}}
    check_sweep(base_config(**pydocs, **{"tune.metric": "eval_pydocs_nll_gap"}))
    check_sweep(base_config(**pydocs, **{"tune.metric": "eval_pydocs_recovery_pct", "tune.mode": "max"}))
    with pytest.raises(ConfigError, match="set tune.mode=max"):  # recovery: higher is better
        check_sweep(base_config(**pydocs, **{"tune.metric": "eval_pydocs_recovery_pct"}))
    with pytest.raises(ConfigError, match="set tune.mode=min"):
        check_sweep(base_config(**pydocs, **{"tune.metric": "eval_pydocs_nll_gap", "tune.mode": "max"}))
    with pytest.raises(ConfigError, match="tune.metric='eval_pydocs_nll_gap'"):  # no such domain configured
        check_sweep(base_config(**{"tune.metric": "eval_pydocs_nll_gap"}))
    with pytest.raises(ConfigError, match="train.eval_long_len"):
        check_sweep(base_config(**pydocs, **{"tune.metric": "eval_pydocs_long_nll"}))
    # the results table shows the other domains next to the objective
    cols = context_metrics("eval_pydocs_recovery_pct", {"pydocs": ["builtin:pydocs"]})
    assert "nll_gap" in cols and "eval_pydocs_nll_gap" in cols and "eval_pydocs_recovery_pct" not in cols


def test_default_concurrency_fits_the_cluster(capsys):
    from linearard_ray.sweep.tune import default_max_concurrent

    rng = np.random.default_rng()
    gpus = int(rng.integers(4, 17))
    workers = int(rng.integers(1, 3))
    cfg = base_config(**{"train.num_workers": workers, "train.gpus_per_worker": 1.0, "train.cpus_per_worker": 1.0})
    assert default_max_concurrent(cfg, {"CPU": 1000.0, "GPU": float(gpus)}, use_gpu=True) == gpus // workers
    half = base_config(**{"train.gpus_per_worker": 0.5})
    assert default_max_concurrent(half, {"CPU": 64.0, "GPU": float(gpus)}, use_gpu=True) == 2 * gpus
    # GPUs present but CPUs short: CPUs decide (one is kept for Ray Data)
    assert default_max_concurrent(cfg, {"CPU": 3.0, "GPU": float(gpus)}, use_gpu=True) == 2 // workers
    cpus = int(rng.integers(3, 33))
    cpu_cfg = base_config(**{"train.cpus_per_worker": 2.0})
    assert default_max_concurrent(cpu_cfg, {"CPU": float(cpus)}, use_gpu=False) == (cpus - 1) // 2
    assert default_max_concurrent(cpu_cfg, {"CPU": 1.0}, use_gpu=False) == 1
    assert "one trial at a time" in capsys.readouterr().out


def test_asha_stops_on_optimizer_steps():
    from ray.tune.schedulers import TrialScheduler

    from linearard_ray.sweep.tune import build_scheduler

    class FakeTrial:
        def __init__(self, i):
            self.trial_id = f"t{i}"

    rng = np.random.default_rng()
    grace = int(rng.integers(2, 20))
    t = base_config(**{"tune.grace_period": grace, "tune.reduction_factor": 2}).tune
    s = build_scheduler(t)
    s.set_search_properties("nll_gap", "min")
    trials = [FakeTrial(i) for i in range(3)]
    for tr in trials:
        s.on_trial_add(None, tr)
    good, bad = sorted(rng.uniform(0.1, 1.0, size=2))
    # before the grace period (in optimizer steps) nothing is stopped, however bad
    assert s.on_trial_result(None, trials[2], {"step": grace - 1, "nll_gap": 100.0}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, trials[0], {"step": grace, "nll_gap": good}) == TrialScheduler.CONTINUE
    # at the first rung a trial behind the others is stopped
    assert s.on_trial_result(None, trials[1], {"step": grace, "nll_gap": bad}) == TrialScheduler.STOP
    assert s.stopped == {str(trials[1])}  # the results table marks it "stopped"
    assert build_scheduler(base_config(**{"tune.scheduler": "none"}).tune) is None


def test_asha_never_stops_a_trial_on_its_last_step():
    """A rung that falls on a trial's last step (the default sweep: 4 steps, rungs at 2 and 4) must
    not stop it: it has trained every step, and a stop would cut off its export. The trials' reports
    carry the run's step count, which the Train callback adds from the job the driver resolved."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from linearard_ray.sweep.trial import total_steps
    from linearard_ray.sweep.tune import build_scheduler

    class FakeTrial:
        def __init__(self, i):
            self.trial_id = f"t{i}"

    total = int(np.random.default_rng().integers(4, 40))
    s = build_scheduler(base_config(**{"tune.grace_period": total, "tune.reduction_factor": 2}).tune)
    s.set_search_properties("nll_gap", "min")
    trials = [FakeTrial(i) for i in range(3)]
    for tr in trials:
        s.on_trial_add(None, tr)
    last = {"step": total, "total_steps": total}
    assert s.on_trial_result(None, trials[0], {**last, "nll_gap": 0.1}) == TrialScheduler.CONTINUE
    # behind at the rung, but the rung is its last step: it runs to its end
    assert s.on_trial_result(None, trials[1], {**last, "nll_gap": 0.9}) == TrialScheduler.CONTINUE
    assert s.stopped == set()
    # the same decision with steps still to go stops it
    s.on_trial_add(None, trials[2])
    early = {"step": total, "total_steps": 2 * total, "nll_gap": 0.95}
    assert s.on_trial_result(None, trials[2], early) == TrialScheduler.STOP
    assert s.stopped == {str(trials[2])}
    assert total_steps(SimpleNamespace(train_loop_config={"job": {"total_steps": total}})) == total
    assert total_steps(SimpleNamespace(train_loop_config={})) is None


@pytest.mark.parametrize(
    "space, search, num_samples, trials, text",
    [
        (TWO_BY_TWO, "grid", 1, 4, "4 trials: grid of 2 rope.factor × 2 objective.relation.layers values"),
        (TWO_BY_TWO, "grid", 2, 8, "× 2 repeats (tune.num_samples)"),
        (TWO_BY_TWO, "random", 3, 3, "3 trials: tune.num_samples samples (random search)"),
        ({"rope.factor": {"grid": [4.0]}, "train.lr": {"loguniform": [1e-4, 1e-3]}}, "grid", 3, 3, "× 3 repeats"),
    ],
)
def test_the_trial_count_is_announced_with_its_reason(space, search, num_samples, trials, text):
    """docs/sweeps.md: with search grid, num_samples repeats the whole grid (2 × 2 × 2 = 8 trials);
    search random with num_samples N runs exactly N."""
    from linearard_ray.sweep.search_space import grid_size, trial_count_text

    cfg = base_config(**{"tune.search": search, "tune.num_samples": num_samples})
    specs = parse_space(space, cfg)
    assert grid_size(specs, search, num_samples) == trials
    assert text in trial_count_text(specs, search, num_samples)
    assert trial_count_text(specs, search, num_samples).startswith(f"{trials} trials")


# --------------------------------------------------------------------------- command line and recipes


def test_genre_sweep_ranks_by_the_worst_unseen_genre_and_names_the_build_step(tmp_path, monkeypatch):
    """The genre sweep's space and objective check; without the built corpora the check names the
    set-up command instead of failing inside a trial."""
    from linearard_ray.sweep.tune import check_sweep

    path = ROOT / "configs" / "sweep-smollm2-135m-genres.yaml"
    monkeypatch.setenv("LINEARARD_CACHE", str(tmp_path))  # no genres built here
    with pytest.raises(ConfigError, match="build_genre_corpora.py"):
        check_sweep(load_config(path))
    cfg = load_config(path)
    assert cfg.tune.metric == "unseen_worst_recovery_pct" and cfg.tune.mode == "max"
    assert set(cfg.train.eval_sources) == {"legal", "standards", "history"}
    assert cfg.train.eval_long_len == 16384  # the long-context screen read beside the winner
    mixes = cfg.tune.space["data.sources"]["choice"]
    assert all(not any(src in m for src in ("genre:legal", "genre:standards", "genre:history")) for m in mixes)


def test_pipeline_help_and_bad_config_exit_codes():
    help_out = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "tune.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert help_out.returncode == 0 and "tune.space" in help_out.stdout and "--set" in help_out.stdout
    bad = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "tune.py"), "--set", "tune.space={rope.factr: {grid: [2.0]}}"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert bad.returncode == 2 and "tune.space['rope.factr']" in bad.stderr


def test_default_sweep_file_matches_the_no_argument_sweep_and_recipes_check():
    from linearard_ray.commands.tune import SWEEP_DEFAULTS
    from linearard_ray.sweep.tune import check_sweep

    default = load_config(ROOT / "configs" / "sweep-default.yaml")
    assert default == load_config(None, dict(SWEEP_DEFAULTS))
    specs = check_sweep(default)
    assert {s.key: list(s.values) for s in specs} == {
        "rope.factor": [2.0, 4.0],
        "objective.relation.layers": ["all", "last:2"],
    }
    gpu = load_config(ROOT / "configs" / "sweep-smollm2-135m.yaml")
    keys = [s.key for s in check_sweep(gpu)]
    assert "objective.logits.weight" in keys and "train.lr" in keys and gpu.train.use_gpu is True
    assert {"objective.relation.weights.q", "objective.relation.weights.k"} <= set(keys)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sweep(cache_dir, tmp_path_factory):
    """A 2 × 2 grid (rope.factor × objective name) on a tiny Llama. One trial's Train run fails at
    step 3 (train.max_failures=0, so the trial fails) and Tune retries the trial, which resumes
    the run from its step-2 checkpoint; the other three have the failure marked as already fired."""

    from linearard_ray.data.corpus import iter_sotu
    from linearard_ray.models.tiny import resolve_tiny
    from linearard_ray.sweep.tune import run_sweep

    resolve_tiny("tiny:llama", cache_dir)
    w = tmp_path_factory.mktemp("sweep")
    corpus = w / "docs.jsonl"
    docs = [doc for _, doc in zip(range(6), iter_sotu("train"), strict=False)]
    corpus.write_text("".join(json.dumps({"text": d["text"][:3000]}) + "\n" for d in docs))
    cfg = build_config(
        {
            "model": {"teacher": "tiny:llama"},
            "lora": {"r": 4, "alpha": 8.0},
            "data": {"sources": [str(corpus)], "ctx_len": 64, "output_dir": str(w / "data")},
            "train": {
                "num_workers": 1,
                "cpus_per_worker": 1,
                "max_steps": 4,
                "eval_every": 2,
                "checkpoint_every": 2,
                "eval_texts": 2,
                "eval_long_len": 128,
                "micro_batch_size": 2,
                "lr": 1e-2,
                "warmup_steps": 1,
                "storage_path": str(w / "ray"),
                "output_dir": str(w / "students"),
                "fail_at_step": 3,
                "max_failures": 0,
            },
            "tracking": {"tracking_uri": f"sqlite:///{w / 'mlflow.db'}"},
            "tune": {
                "sweep_name": "tiny-sweep",
                "storage_path": str(w / "tune"),
                "trial_max_failures": 1,
                "space": {"rope.factor": {"grid": [2.0, 4.0]}, "objective.name": {"grid": ["linearard", "cpt"]}},
                "scheduler": "none",
            },
        }
    )
    from linearard_ray.training.plan import FAIL_MARKER

    params = [{"rope.factor": f, "objective.name": n} for f in (2.0, 4.0) for n in ("linearard", "cpt")]
    names = [trial_name("tiny-sweep", apply_params(cfg, p)) for p in params]
    failing = names[int(np.random.default_rng().integers(0, 4))]
    for name in names:
        if name != failing:  # each extra restart costs a Train run start; one retried trial is enough
            marker = w / "tune" / "tiny-sweep" / "runs" / name / FAIL_MARKER
            marker.parent.mkdir(parents=True)
            marker.write_text("marked as fired by the test\n")
    # 5 CPUs: one kept for Ray Data, so the default concurrency is 4 one-CPU trials at once.
    with local_ray(num_cpus=5, cache_dir=cache_dir):
        res = run_sweep(cfg)
    return cfg, res, failing


@pytest.mark.slow
def test_four_trial_sweep_in_mlflow(sweep):
    from mlflow.tracking import MlflowClient

    from linearard_ray.sweep.summary import ROLE_TAG, SWEEP_TAG
    from linearard_ray.training.plan import FAIL_MARKER

    cfg, res, failing = sweep
    client = MlflowClient(cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name("tiny-sweep")
    assert exp is not None and exp.experiment_id == res.experiment_id
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(runs) == 4
    expected = {(f, n) for f in ("2.0", "4.0") for n in ("linearard", "cpt")}
    assert {(r.data.params["rope.factor"], r.data.params["objective.name"]) for r in runs} == expected
    rows = {r["trial"]: r for r in res.trials}
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows.values()), res.trials
    for run in runs:
        assert run.data.tags[SWEEP_TAG] == "tiny-sweep" and run.info.status == "FINISHED"
        name = run.info.run_name
        assert rows[name]["mlflow_run_id"] == run.info.run_id
        hist = {
            k: {h.step: h.value for h in client.get_metric_history(run.info.run_id, k)}
            for k in ("nll_gap", "student_nll", "teacher_nll", "long_nll")
        }
        # reported at the held-out evaluations (steps 2 and 4), each once, also by the trial whose
        # run failed at step 3 and resumed in Tune's retry
        assert sorted(hist["nll_gap"]) == [2, 4], name
        assert len(client.get_metric_history(run.info.run_id, "nll_gap")) == 2
        for step, gap in hist["nll_gap"].items():
            assert gap == pytest.approx(hist["student_nll"][step] - hist["teacher_nll"][step], abs=1e-9)
        assert rows[name]["nll_gap"] == pytest.approx(hist["nll_gap"][4])
        assert rows[name]["best_nll_gap"] == pytest.approx(min(hist["nll_gap"].values()))
        # the trial's full config is attached to its run
        trial_cfg = build_config(
            yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
        )
        assert trial_cfg.rope.factor == float(run.data.params["rope.factor"])
        assert trial_cfg.objective.name == run.data.params["objective.name"]
        fired = Path(cfg.tune.storage_path) / "tiny-sweep" / "runs" / name / FAIL_MARKER
        assert ("fired at step 3" in fired.read_text()) == (name == failing)

    best = min(rows.values(), key=lambda r: r["nll_gap"])
    assert res.best["trial"] == best["trial"]
    assert Path(res.best["student_dir"]).is_dir()
    others = [n for n in rows if n != best["trial"]]
    assert not any((Path(cfg.train.output_dir) / "tiny-sweep" / n).exists() for n in others)  # keep_students=best

    best_cfg = load_config(res.best_config_path)
    assert best_cfg.rope.factor == best["rope.factor"] and best_cfg.objective.name == best["objective.name"]
    assert best_cfg.train.run_name == best["trial"] and best_cfg.train.fail_at_step is None
    assert best_cfg.tracking.enabled is True and best_cfg.model.teacher == "tiny:llama"

    summary = client.get_run(res.summary_run_id)
    assert summary.data.tags[ROLE_TAG] == "summary" and summary.data.params["best_trial"] == best["trial"]
    assert summary.data.metrics["best_nll_gap"] == pytest.approx(best["nll_gap"])
    assert summary.data.metrics["trials_completed"] == 4
    arts = {a.path for a in client.list_artifacts(res.summary_run_id)}
    assert {"results.csv", "results.md", "objective.png", "best_config.yaml", "sweep_config.yaml"} <= arts
    table = list(
        csv.DictReader(io.StringIO(Path(client.download_artifacts(res.summary_run_id, "results.csv")).read_text()))
    )
    assert {r["trial"]: float(r["nll_gap"]) for r in table} == pytest.approx({n: r["nll_gap"] for n, r in rows.items()})
