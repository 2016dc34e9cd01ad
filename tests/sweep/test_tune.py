"""Sweeps: search-space parsing and checks, trial configs, results/best-config writing, and a
4-trial Ray Tune sweep of a tiny model recorded in MLflow."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from linearard_ray.config import ConfigError, build_config, load_config
from linearard_ray.sweep.search_space import apply_params, parse_space, to_tune_space, trial_name
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _base(**over):
    cfg = {
        "model": {"teacher": "tiny:llama"},
        "data": {"ctx_len": 64},
        "train": {"max_steps": 4, "eval_every": 2, "checkpoint_every": 2},
    }
    return build_config(cfg, over)


def _pipeline_module():
    return load_script("pipelines/tune.py")


# --------------------------------------------------------------------------- search space


def test_every_distribution_kind_parses_to_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    rng = np.random.default_rng()
    lo_f = float(rng.uniform(2.0, 3.0))
    hi_f = lo_f + float(rng.uniform(0.5, 4.0))
    lo_lr = float(10 ** rng.uniform(-6, -4))
    hi_lr = lo_lr * float(rng.uniform(20, 200))
    lo_r = int(rng.integers(1, 8))
    hi_r = lo_r + int(rng.integers(2, 6))
    grid = sorted({int(x) for x in rng.integers(1, 64, size=3)})
    space = {
        "lora.r": {"grid": grid},
        "objective.relation.layers": {"choice": ["all", "last:1", [0, 1]]},
        "rope.factor": {"uniform": [lo_f, hi_f]},
        "train.lr": {"loguniform": [lo_lr, hi_lr]},
        "train.warmup_steps": {"randint": [lo_r, hi_r]},
    }
    specs = {s.key: s for s in parse_space(space, _base())}
    assert specs["lora.r"].kind == "grid" and list(specs["lora.r"].values) == grid
    assert specs["rope.factor"].low == lo_f and specs["rope.factor"].high == hi_f
    assert specs["train.warmup_steps"].low == lo_r and specs["train.warmup_steps"].high == hi_r

    dom = to_tune_space(list(specs.values()), "grid")
    assert dom["lora.r"] == {"grid_search": grid}
    assert isinstance(dom["objective.relation.layers"], Categorical)
    assert dom["objective.relation.layers"].categories == ["all", "last:1", [0, 1]]
    # with random (and optuna) search a grid list becomes a uniform choice
    assert isinstance(to_tune_space(list(specs.values()), "random")["lora.r"], Categorical)

    n = 4000
    u = np.asarray(dom["rope.factor"].sample(size=n))
    assert isinstance(dom["rope.factor"], Float) and u.min() >= lo_f and u.max() <= hi_f
    assert abs(u.mean() - (lo_f + hi_f) / 2) < 0.05 * (hi_f - lo_f)
    lg = np.log(np.asarray(dom["train.lr"].sample(size=n)))
    assert lg.min() >= math.log(lo_lr) - 1e-9 and lg.max() <= math.log(hi_lr) + 1e-9
    # log-uniform: the log of the samples is uniform, so its mean is the middle of the log range
    assert abs(lg.mean() - (math.log(lo_lr) + math.log(hi_lr)) / 2) < 0.05 * (math.log(hi_lr) - math.log(lo_lr))
    ints = dom["train.warmup_steps"].sample(size=n)
    assert isinstance(dom["train.warmup_steps"], Integer)
    assert set(int(i) for i in ints) == set(range(lo_r, hi_r + 1))  # both ends included


@pytest.mark.parametrize(
    "space, key, fragment",
    [
        ({"rope.factor": [2.0, 4.0]}, "rope.factor", "expected a mapping"),
        ({"rope.factor": {"grid": [2.0], "choice": [4.0]}}, "rope.factor", "exactly one distribution"),
        ({"rope.factor": {"normal": [2.0, 1.0]}}, "rope.factor", "unknown distribution 'normal'"),
        ({"rope.factor": {"grid": []}}, "rope.factor", "non-empty list"),
        ({"rope.factor": {"uniform": [4.0]}}, "rope.factor", "needs [low, high]"),
        ({"rope.factor": {"uniform": [4.0, 2.0]}}, "rope.factor", "low < high"),
        ({"rope.factor": {"uniform": [2.0, "x"]}}, "rope.factor", "finite numbers"),
        ({"train.lr": {"loguniform": [0.0, 1.0e-3]}}, "train.lr", "low > 0"),
        ({"lora.r": {"randint": [4.5, 16]}}, "lora.r", "integers"),
        ({"rope.factr": {"grid": [2.0]}}, "rope.factr", "'factr' is not a field of rope"),
        ({"train.lr.x": {"grid": [1.0]}}, "train.lr.x", "train.lr is a value"),
        ({"tune.num_samples": {"grid": [1, 2]}}, "tune.num_samples", "cannot be swept"),
        ({"data.teacher_samples.top_p": {"grid": [0.9, 1.0]}}, "data.teacher_samples.top_p", "cannot be swept"),
        ({"rope.factor": {"grid": [2.0, 0.5]}}, "rope.factor", "value 0.5 gives an invalid config"),
        ({"rope.type": {"choice": ["linear", "spiral"]}}, "rope.type", "value 'spiral'"),
        ({"lora.r": {"uniform": [4, 64]}}, "lora.r", "use randint or choice"),
        ({"train.lr": {"uniform": [-1.0, 1.0]}}, "train.lr", "value -1.0 gives an invalid config"),
    ],
)
def test_bad_space_entries_fail_naming_the_key(space, key, fragment):
    with pytest.raises(ConfigError) as e:
        parse_space(space, _base())
    msg = str(e.value)
    assert f"tune.space[{key!r}]" in msg and fragment in msg, msg


def test_empty_space_is_an_error():
    with pytest.raises(ConfigError, match="tune.space is empty"):
        parse_space({}, _base())


def test_objective_name_and_term_weights_are_sweepable():
    base = _base()
    cpt = apply_params(base, {"objective.name": "cpt"})
    assert (cpt.objective.relation.weight, cpt.objective.logits.weight, cpt.objective.next_token.weight) == (0, 0, 1)
    w = float(np.random.default_rng().uniform(0.1, 3.0))
    mix = apply_params(base, {"objective.name": "linearard+logits", "objective.logits.weight": w})
    assert mix.objective.logits.weight == w and mix.objective.relation.weight == 1.0
    back = apply_params(cpt, {"objective.name": "linearard"})  # a named recipe drops the base's weights
    assert (back.objective.relation.weight, back.objective.next_token.weight) == (1.0, 0.0)
    custom_base = build_config(
        base.model_dump(mode="json"),
        {"objective.name": "custom", "objective.logits.weight": 0.5, "objective.next_token.weight": 0.25},
    )
    kept = apply_params(custom_base, {"objective.name": "custom", "rope.factor": 2.0})
    assert (kept.objective.logits.weight, kept.objective.next_token.weight) == (0.5, 0.25)
    per = apply_params(base, {"objective.relation.weights.v": 0.0, "objective.relation.layers": "last:1"})
    assert per.objective.relation.weights == {"q": 1.0, "k": 1.0, "v": 0.0}
    assert per.objective.relation.layers.resolve(2) == [1]
    with pytest.raises(ConfigError, match="every term has weight 0"):
        apply_params(base, {"objective.name": "custom", "objective.relation.weight": 0.0})


def test_trial_names_are_deterministic_and_distinct():
    from linearard_ray.sweep.trial import TrialNamer

    base = _base()
    a = trial_name("sw", apply_params(base, {"rope.factor": 2.0}))
    assert a == trial_name("sw", apply_params(base, {"rope.factor": 2.0})) and a.startswith("sw-")
    assert a != trial_name("sw", apply_params(base, {"rope.factor": 3.0}))
    assert a != trial_name("sw", apply_params(_base(**{"train.max_steps": 5}), {"rope.factor": 2.0}))
    namer = TrialNamer({"sweep_name": "sw", "base": base.model_dump(mode="json")})
    names = [namer(SimpleNamespace(config={"rope.factor": np.float64(f)})) for f in (2.0, 3.0, 2.0)]
    assert names == [a, trial_name("sw", apply_params(base, {"rope.factor": 3.0})), a + "-dup2"]
    # the repeats of a grid point are named by their REPEAT_KEY, so each one knows its seeds
    assert [namer(SimpleNamespace(config={"rope.factor": 2.0, "_repeat": k})) for k in (1, 2)] == [a + "-r2", a + "-r3"]
    # a sample the schema rejects still gets a name (the trial then fails and is reported)
    assert namer(SimpleNamespace(config={"rope.factor": 0.5})).startswith("sw-")


# --------------------------------------------------------------------------- sweep checks


def test_optuna_missing_gives_a_clear_message(monkeypatch):
    from linearard_ray.sweep.tune import check_sweep

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    cfg = _base(**{"tune.search": "optuna", "tune.space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError) as e:
        check_sweep(cfg)
    assert "tune.search=optuna" in str(e.value) and "pip install optuna" in str(e.value)


def test_sweep_needs_the_in_training_objective():
    from linearard_ray.sweep.tune import check_sweep

    with pytest.raises(ConfigError, match="train.eval_every"):
        check_sweep(_base(**{"train.eval_every": None}))
    with pytest.raises(ConfigError, match="train.eval_long_len"):
        check_sweep(_base(**{"tune.metric": "long_nll"}))
    with pytest.raises(ConfigError, match="tune.metric='perplexity'"):
        check_sweep(_base(**{"tune.metric": "perplexity"}))
    assert [s.key for s in check_sweep(_base())] == ["rope.factor", "objective.relation.layers"]


def test_teacher_samples_and_a_swept_teacher_do_not_mix():
    """The samples are made once from the base teacher: a swept teacher would train on another
    model's text, so the sweep is refused before anything runs."""
    from linearard_ray.sweep.tune import check_sweep

    samples = {"data.teacher_samples": {"num_samples": 4, "max_new_tokens": 16, "min_tokens": 4}}
    space = {"model.teacher": {"grid": ["tiny:llama", "tiny:mistral"]}}
    with pytest.raises(ConfigError, match="tune.space\\['model.teacher'\\]: data.teacher_samples"):
        check_sweep(_base(**samples, **{"tune.space": space}))
    assert [s.key for s in check_sweep(_base(**{"tune.space": space}))] == ["model.teacher"]
    assert check_sweep(_base(**samples))  # samples with the default space are fine


def test_sweep_objective_can_be_another_domain():
    """train.eval_sources domains report eval_<name>_<metric>, which tune.metric may name."""
    from linearard_ray.sweep.metrics import context_metrics
    from linearard_ray.sweep.tune import check_sweep

    pydocs = {"train.eval_sources": {"pydocs": ["builtin:pydocs"]}}
    check_sweep(_base(**pydocs, **{"tune.metric": "eval_pydocs_nll_gap"}))
    check_sweep(_base(**pydocs, **{"tune.metric": "eval_pydocs_recovery_pct", "tune.mode": "max"}))
    with pytest.raises(ConfigError, match="set tune.mode=max"):  # recovery: higher is better
        check_sweep(_base(**pydocs, **{"tune.metric": "eval_pydocs_recovery_pct"}))
    with pytest.raises(ConfigError, match="set tune.mode=min"):
        check_sweep(_base(**pydocs, **{"tune.metric": "eval_pydocs_nll_gap", "tune.mode": "max"}))
    with pytest.raises(ConfigError, match="tune.metric='eval_pydocs_nll_gap'"):  # no such domain configured
        check_sweep(_base(**{"tune.metric": "eval_pydocs_nll_gap"}))
    with pytest.raises(ConfigError, match="train.eval_long_len"):
        check_sweep(_base(**pydocs, **{"tune.metric": "eval_pydocs_long_nll"}))
    # the results table shows the other domains next to the objective
    cols = context_metrics("eval_pydocs_recovery_pct", {"pydocs": ["builtin:pydocs"]})
    assert "nll_gap" in cols and "eval_pydocs_nll_gap" in cols and "eval_pydocs_recovery_pct" not in cols


def test_default_concurrency_fits_the_cluster(capsys):
    from linearard_ray.sweep.tune import default_max_concurrent

    rng = np.random.default_rng()
    gpus = int(rng.integers(4, 17))
    workers = int(rng.integers(1, 3))
    cfg = _base(**{"train.num_workers": workers, "train.gpus_per_worker": 1.0, "train.cpus_per_worker": 1.0})
    assert default_max_concurrent(cfg, {"CPU": 1000.0, "GPU": float(gpus)}, use_gpu=True) == gpus // workers
    half = _base(**{"train.gpus_per_worker": 0.5})
    assert default_max_concurrent(half, {"CPU": 64.0, "GPU": float(gpus)}, use_gpu=True) == 2 * gpus
    # GPUs present but CPUs short: CPUs decide (one is kept for Ray Data)
    assert default_max_concurrent(cfg, {"CPU": 3.0, "GPU": float(gpus)}, use_gpu=True) == 2 // workers
    cpus = int(rng.integers(3, 33))
    cpu_cfg = _base(**{"train.cpus_per_worker": 2.0})
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
    t = _base(**{"tune.grace_period": grace, "tune.reduction_factor": 2}).tune
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
    assert build_scheduler(_base(**{"tune.scheduler": "none"}).tune) is None


def test_trial_run_config_is_absolute_and_untracked(tmp_path, monkeypatch):
    from linearard_ray.sweep.plan import make_plan, run_config

    monkeypatch.chdir(tmp_path)
    base = _base(
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


# --------------------------------------------------------------------------- results


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

    base = _base(**{"train.fail_at_step": 3})
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


# --------------------------------------------------------------------------- command line and recipes


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
    import ray

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
    from linearard_ray.training.driver import FAIL_MARKER

    params = [{"rope.factor": f, "objective.name": n} for f in (2.0, 4.0) for n in ("linearard", "cpt")]
    names = [trial_name("tiny-sweep", apply_params(cfg, p)) for p in params]
    failing = names[int(np.random.default_rng().integers(0, 4))]
    for name in names:
        if name != failing:  # each extra restart costs a Train run start; one retried trial is enough
            marker = w / "tune" / "tiny-sweep" / "runs" / name / FAIL_MARKER
            marker.parent.mkdir(parents=True)
            marker.write_text("marked as fired by the test\n")
    # 5 CPUs: one kept for Ray Data, so the default concurrency is 4 one-CPU trials at once.
    ray.init(
        address="local",
        num_cpus=5,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"LINEARARD_CACHE": str(cache_dir)}},
    )
    try:
        res = run_sweep(cfg)
    finally:
        ray.shutdown()
    return cfg, res, failing


@pytest.mark.slow
def test_four_trial_sweep_in_mlflow(sweep):
    from mlflow.tracking import MlflowClient

    from linearard_ray.sweep.summary import ROLE_TAG, SWEEP_TAG
    from linearard_ray.training.driver import FAIL_MARKER

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


def test_repeats_train_with_other_seeds_and_the_best_mean_wins(tmp_path):
    """tune.num_samples > 1 repeats each grid point through a grid of its own (REPEAT_KEY): repeat k
    (named -r<k+1>) trains with train.seed + k (data.seed stays: one preprocessing for all repeats),
    the summary gives each
    configuration's mean and range, and the best configuration is the best mean, not the luckiest
    single training."""
    from ray import tune

    from linearard_ray.sweep.plan import make_plan, run_config
    from linearard_ray.sweep.search_space import REPEAT_KEY, to_tune_space
    from linearard_ray.sweep.summary import best_config_yaml, collect_rows, pick_best, point_rows

    base = _base(**{"train.seed": 7, "data.seed": 3})
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
