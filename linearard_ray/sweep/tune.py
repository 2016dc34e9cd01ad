"""Ray Tune sweeps over distillation settings, recorded in MLflow.

Ray Train V2 cannot be handed to a ``Tuner`` directly, so every trial runs a *driver function*
(``trial_driver``) that builds the trial's config and calls ``train.run_distill`` with a
``TuneReportCallback`` in the Train run's callbacks: the workers' ``ray.train.report`` results
(the held-out NLL gap among them) reach Tune, where ASHA may stop a weak trial early.

MLflow: one experiment per sweep (named after it), one run per trial written by
``MLflowLoggerCallback`` on the Tuner (swept values as params, reported metrics over optimizer
steps), and a summary run with the results table, a plot of the objective against each swept
value and the best trial's config. The training job's own MLflow logging is switched off inside
trials, so that every trial is exactly one MLflow run.
"""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linearard_ray.config import (
    HELDOUT_METRICS,
    Config,
    ConfigError,
    TuneConfig,
    build_config,
    domain_metric,
    dump_config,
)
from linearard_ray.storage import fs_and_path, is_uri, read_text, write_bytes
from linearard_ray.sweep.search_space import (
    ParamSpec,
    apply_params,
    base_dict,
    config_hash,
    finite_combinations,
    grid_size,
    parse_space,
    plain,
    split_repeat,
    to_tune_space,
    trial_name,
)

METRICS = HELDOUT_METRICS + ("loss",)  # held-out SOTU and the training loss; see objective_metrics
CONTEXT_METRICS = ("nll_gap", "student_nll", "teacher_nll", "long_nll", "loss")  # results-table columns
HIGHER_IS_BETTER = ("recovery_pct",)
LAST_REPORT_FILE = "tune_last_report.json"
TRIAL_RESULT_FILE = "tune_trial_result.json"
SWEEP_TAG = "linearard.sweep"
ROLE_TAG = "linearard.sweep.role"
SESSION_TAG = "linearard.sweep.session"
DATA_CPUS = 1.0  # left free for Ray Data's read tasks, which feed the workers during training
DRIVER_CPUS = 0.01  # a trial's driver function only waits on its Train run; workers hold the real resources
ASHA_MAX_T = 2**31  # trials end by their own step budget, never at an ASHA horizon


@dataclass
class SweepResult:
    sweep_name: str
    sweep_dir: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_path: str | None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    summary_run_id: str | None = None
    files: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- storage (local or URI)


def _abs(path: str, cwd: str) -> str:
    if is_uri(path):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (Path(cwd) / p).resolve())


# --------------------------------------------------------------------------- checks before Ray starts


def check_sweep(cfg: Config) -> list[ParamSpec]:
    """Everything about the sweep that can be checked without a cluster; returns the parsed space."""
    t = cfg.tune
    specs = parse_space(t.space, cfg)
    if cfg.train.eval_every is None:
        raise ConfigError(
            "train.eval_every: a sweep ranks trials by the held-out NLL measured during training; "
            "set train.eval_every (steps between measurements), e.g. --set train.eval_every=10"
        )
    allowed = objective_metrics(cfg.train.eval_sources)
    if t.metric not in allowed:
        raise ConfigError(f"tune.metric={t.metric!r}: trials report {', '.join(allowed)}")
    if t.metric.endswith("long_nll") and cfg.train.eval_long_len is None and "train.eval_long_len" not in t.space:
        raise ConfigError(f"tune.metric={t.metric} needs train.eval_long_len (the long-context length to measure)")
    better = "max" if t.metric.endswith(HIGHER_IS_BETTER) else "min"
    if t.mode != better:
        raise ConfigError(
            f"tune.mode={t.mode}: tune.metric={t.metric} is {'higher' if better == 'max' else 'lower'} "
            f"when the student is better; set tune.mode={better}"
        )
    if "/" in t.sweep_name or not t.sweep_name.strip():
        raise ConfigError(f"tune.sweep_name {t.sweep_name!r} must be a non-empty name without '/'")
    if cfg.data.teacher_samples is not None and any(s.key == "model.teacher" for s in specs):
        raise ConfigError(
            "tune.space['model.teacher']: data.teacher_samples are sampled once, from the base "
            "config's teacher; with the teacher swept they would not be the trial teacher's text"
        )
    if t.search == "optuna":
        build_searcher(t, cfg.train.seed)  # fails now, not after the data is prepared
    return specs


def objective_metrics(eval_sources: dict[str, Any] | None = None) -> list[str]:
    """Every name a trial reports that can be ``tune.metric``: the held-out SOTU metrics, the loss,
    and the same metrics of each train.eval_sources domain as ``eval_<name>_<metric>``."""
    return list(METRICS) + [domain_metric(d, m) for d in (eval_sources or {}) for m in HELDOUT_METRICS]


def context_metrics(metric: str, eval_sources: dict[str, Any] | None = None) -> list[str]:
    """Results-table columns next to the objective: held-out SOTU's and the loss, plus each extra
    domain's gap and recovery (a sweep judged on one domain still shows the others)."""
    extra = [domain_metric(d, m) for d in (eval_sources or {}) for m in ("nll_gap", "recovery_pct")]
    return [k for k in list(CONTEXT_METRICS) + extra if k != metric]


def build_searcher(t: TuneConfig, seed: int, max_concurrent: int = 0):
    """Tune's search algorithm for tune.search (Optuna only when it is installed).

    Grid and random search hold the concurrency limit themselves: Tune ignores
    TuneConfig.max_concurrent_trials for them (it only wraps Searchers such as Optuna's)."""
    if t.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tune.search=optuna needs the optuna package, which is not installed: "
                "pip install optuna  (or pip install 'linearard_ray[optuna]'); "
                "tune.search=grid or random need nothing extra"
            ) from None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=t.metric, mode=t.mode, seed=seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)


def build_scheduler(t: TuneConfig):
    """ASHA on the optimizer step the workers report (grace_period and its rungs are steps), so a
    trial retried after a failure continues on the same scale. It remembers which trials it
    stopped (``.stopped``, trial names), for the results table."""
    if t.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.stopped: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped.add(str(trial))
            return action

    return RecordingASHA(
        time_attr="step", max_t=ASHA_MAX_T, grace_period=t.grace_period, reduction_factor=t.reduction_factor
    )


def default_max_concurrent(cfg: Config, resources: dict[str, float], use_gpu: bool) -> int:
    """Trials that fit the cluster at once: its GPUs over each trial's GPUs (or, on CPU, its CPUs
    over each trial's CPUs), keeping one CPU for Ray Data."""
    t = cfg.train
    by_cpu = math.floor((resources.get("CPU", 0.0) - DATA_CPUS) / (t.num_workers * t.cpus_per_worker))
    n = by_cpu
    if use_gpu:
        n = min(n, math.floor(resources.get("GPU", 0.0) / (t.num_workers * t.gpus_per_worker)))
    if n < 1:
        print(
            f"[tune] the cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs now; one "
            f"trial needs {t.num_workers} worker(s) × ({t.cpus_per_worker:g} CPU"
            f"{f', {t.gpus_per_worker:g} GPU' if use_gpu else ''}): running one trial at a time, "
            "which waits until the autoscaler adds nodes",
            flush=True,
        )
    return max(1, n)


# --------------------------------------------------------------------------- per-trial configs


_DATA_PREFIXES = ("data.", "model.teacher")


def _data_keys(specs: list[ParamSpec]) -> list[str]:
    return [s.key for s in specs if s.key.startswith(_DATA_PREFIXES)]


def _data_hash(cfg: Config) -> str:
    d = base_dict(cfg)
    return config_hash({"data": d["data"], "teacher": d["model"]["teacher"]}, 12)


def _absolutize(d: dict, cwd: str) -> dict:
    """Trials run with the trial directory as their working directory: every relative path of
    the driver's config is made absolute against the driver's."""
    d = copy.deepcopy(d)
    m, data = d["model"], d["data"]
    for k in ("teacher", "student"):
        v = m.get(k)
        if v and not is_uri(v) and (Path(cwd) / v).exists():
            m[k] = _abs(v, cwd)
    if m.get("cache_dir"):
        m["cache_dir"] = _abs(m["cache_dir"], cwd)

    def src(s: str) -> str:
        return s if is_uri(s) or s.startswith(("builtin:", "hf:")) else _abs(s, cwd)

    data["sources"] = [src(s) for s in data["sources"]]
    t = d["train"]
    t["eval_sources"] = {k: [src(s) for s in v] for k, v in (t.get("eval_sources") or {}).items()}
    if data.get("lm_sources"):
        data["lm_sources"] = [src(s) for s in data["lm_sources"]]
    for k in ("preprocessed", "output_dir"):
        if data.get(k):
            data[k] = _abs(data[k], cwd)
    return d


def _checkpoint_every(train: dict) -> int:
    """Trials checkpoint only at held-out evaluations, so that every report Tune sees carries a
    fresh objective."""
    e, c = train["eval_every"], train["checkpoint_every"]
    return c if c % e == 0 else e * math.ceil(c / e)


def repeat_name(name: str, k: int) -> str:
    return f"{name}-r{k + 1}" if k else name


def repeat_dict(base: Config | dict, params: dict[str, Any], k: int) -> dict:
    """The base plus a trial's values, as a dict, for the k-th repeat of that configuration.

    Repeat k trains with train.seed + k: a repeat with the same seed would train the same run again
    (bit for bit on CPU), while what a repeat is for is the spread between trainings, which one
    training cannot show. train.seed sets the LoRA init, dropout and the order the training stream
    reads blocks in; data.seed (the preprocessing shuffle) stays, so every repeat reads the data the
    driver prepared once."""
    d = base_dict(apply_params(base, params))
    d["train"]["seed"] += k
    return d


def run_config(plan: dict, params: dict[str, Any], name: str) -> Config:
    """The config one trial trains with: its repeat's config (`repeat_dict`) with absolute paths,
    its own run name and storage, the sweep's preprocessed data, and no MLflow run of its own."""
    params, k = split_repeat(params)
    d = _absolutize(repeat_dict(plan["base"], params, k), plan["cwd"])
    cfg = build_config(d)
    dh = _data_hash(cfg)
    t, data = d["train"], d["data"]
    t.update(
        run_name=name,
        storage_path=plan["run_storage"],
        output_dir=plan["students_dir"],
        evaluate_at_end=False,
        checkpoint_every=_checkpoint_every(t),
    )
    d["tracking"]["enabled"] = False
    if not data.get("preprocessed"):
        prepared = plan["data_dirs"].get(dh)
        if prepared:
            data["output_dir"] = prepared
        elif plan["data_swept"]:
            root = data.get("output_dir") or _abs("outputs/data/sweep", plan["cwd"])
            data["output_dir"] = f"{root}-{dh}"
    return build_config(d)


def _prepare_data(cfg: Config, specs: list[ParamSpec], plan: dict) -> dict[str, str]:
    """Preprocess each distinct data config of the sweep once, in the driver, so that concurrent
    trials never tokenize the same corpus into the same directory at once."""
    from linearard_ray.data import preprocess as data_mod

    keys = _data_keys(specs)
    combos = finite_combinations(specs, keys) if keys else [{}]
    if combos is None:
        print(f"[tune] {', '.join(keys)}: sampled from a range, so each trial preprocesses its own data", flush=True)
        return {}
    objective_swept = any(s.key.startswith("objective.") for s in specs)
    out: dict[str, str] = {}
    for combo in combos:
        d = _absolutize(base_dict(apply_params(plan["base"], combo)), plan["cwd"])
        c = build_config(d)
        if c.data.preprocessed:
            continue
        dh = _data_hash(c)
        if plan["data_swept"]:
            root = c.data.output_dir or _abs("outputs/data/sweep", plan["cwd"])
            c = c.model_copy(update={"data": c.data.model_copy(update={"output_dir": f"{root}-{dh}"})})
        main = Path(data_mod.ensure_preprocessed(c)).resolve()
        out[dh] = str(main)
        c = c.model_copy(update={"data": c.data.model_copy(update={"output_dir": str(main)})})
        if c.data.lm_data_differs() and (objective_swept or c.objective.next_token.weight > 0):
            data_mod.ensure_preprocessed(c, stream="lm")
    return out


# --------------------------------------------------------------------------- inside a trial


def _report_callback_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        """TuneReportCallback that puts the optimizer step on the MLflow step axis and keeps the
        latest report in the run's storage (a trial whose run had already finished, e.g. the
        same sweep started again, reports that instead of nothing)."""

        def __init__(self, record_path: str, attempt: str):
            super().__init__()
            self.record_path = record_path
            self.attempt = attempt

        def after_report(self, run_context, metrics, checkpoint):
            from ray.tune.result import TIMESTEPS_TOTAL

            metrics = [dict(m) for m in metrics]
            if "step" in metrics[0]:
                metrics[0][TIMESTEPS_TOTAL] = int(metrics[0]["step"])
            super().after_report(run_context, metrics, checkpoint)
            try:
                keep = {k: plain(v) for k, v in metrics[0].items() if isinstance(plain(v), (int, float, str))}
                write_bytes(self.record_path, json.dumps({"attempt": self.attempt, "metrics": keep}).encode())
            except Exception as e:  # the record is a convenience for restarts; never fail training for it
                print(
                    f"[tune] could not record the last report in {self.record_path}: {e}", file=sys.stderr, flush=True
                )

    return SweepReportCallback


def trial_driver(config: dict[str, Any], plan: dict) -> None:
    """One trial: build its config and run the distillation with Tune reporting."""
    import ray.tune

    from linearard_ray.training.driver import run_distill

    params = {k: plain(v) for k, v in config.items()}
    name = ray.tune.get_context().get_trial_name()
    cfg = run_config(plan, params, name)
    run_dir = f"{plan['run_storage']}/{name}"
    record = f"{run_dir}/{LAST_REPORT_FILE}"
    attempt = uuid.uuid4().hex
    res = run_distill(cfg, callbacks=[_report_callback_class()(record, attempt)])
    last = read_text(record)
    last = json.loads(last) if last else None
    if last is None or last.get("attempt") != attempt:
        # Nothing was reported in this attempt: the run had already reached its last step.
        final = (last or {}).get("metrics") or {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}
        if final:
            ray.tune.report(final)
    write_bytes(
        f"{run_dir}/{TRIAL_RESULT_FILE}",
        json.dumps(
            {
                "final_step": res.final_step,
                "tokens_seen": res.tokens_seen,
                "student_dir": res.student_dir,
                "storage_dir": res.storage_dir,
            }
        ).encode(),
    )


class TrialNamer:
    """Tune's trial_name_creator: ``<sweep>-<hash of the trial's config>``, and ``-r2``, ``-r3``...
    for the repeats of a grid point (``REPEAT_KEY``; `run_config` gives them other seeds). The same
    config sampled twice by a searcher gets ``-dup2``..., where this namer sees both."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.seen: dict[str, int] = {}

    def __call__(self, trial) -> str:
        params, k = split_repeat({key: plain(v) for key, v in trial.config.items()})
        try:
            name = trial_name(self.plan["sweep_name"], apply_params(self.plan["base"], params))
        except ConfigError:
            # An invalid sample must not stop the whole sweep here: the trial fails with the
            # config error and is reported like any failed trial.
            name = f"{self.plan['sweep_name']}-{config_hash(params)}"
        name = repeat_name(name, k)
        n = self.seen[name] = self.seen.get(name, 0) + 1
        return name if n == 1 else f"{name}-dup{n}"


def _dirname(trial) -> str:
    return str(trial)


# --------------------------------------------------------------------------- the sweep


def make_plan(cfg: Config, specs: list[ParamSpec]) -> dict:
    """Plain data every trial needs (it travels to the trials through the object store)."""
    import os

    from linearard_ray.training.driver import resolve_storage_path

    cwd = os.getcwd()
    sweep_dir = f"{resolve_storage_path(cfg.tune.storage_path).rstrip('/')}/{cfg.tune.sweep_name}"
    return {
        "sweep_name": cfg.tune.sweep_name,
        "base": base_dict(cfg),
        "cwd": cwd,
        "sweep_dir": sweep_dir,
        "run_storage": f"{sweep_dir}/runs",
        "students_dir": f"{_abs(cfg.train.output_dir, cwd)}/{cfg.tune.sweep_name}",
        "data_swept": bool(_data_keys(specs)),
        "data_dirs": {},
    }


def run_sweep(cfg: Config) -> SweepResult:
    """Run the sweep described by ``cfg.tune`` over the base ``cfg``; write the results table,
    plot and best config, and record everything in MLflow."""
    import ray
    from ray import tune

    from linearard_ray import tracking
    from linearard_ray.ray_env import ensure_ray, worker_env
    from linearard_ray.training.driver import resolve_use_gpu

    t = cfg.tune
    specs = check_sweep(cfg)
    uri = cfg.tracking.resolved_uri() if cfg.tracking.enabled else None
    ensure_ray(worker_env(uri))
    use_gpu = resolve_use_gpu(cfg)
    from linearard_ray.data.teacher_samples import with_teacher_samples

    cfg = with_teacher_samples(cfg, use_gpu)  # once for every trial, from the base config's teacher
    plan = make_plan(cfg, specs)
    plan["data_dirs"] = _prepare_data(cfg, specs, plan)

    max_conc = t.max_concurrent or default_max_concurrent(cfg, ray.cluster_resources(), use_gpu)
    searcher = build_searcher(t, cfg.train.seed, max_conc)
    n_trials = grid_size(specs, t.search, t.num_samples)
    e, c = cfg.train.eval_every, cfg.train.checkpoint_every
    if c % e:
        print(
            f"[tune] trials checkpoint every {_checkpoint_every(base_dict(cfg)['train'])} steps "
            f"(train.checkpoint_every={c} rounded up to a multiple of train.eval_every={e})",
            flush=True,
        )
    print(
        f"[tune] sweep {t.sweep_name}: {n_trials} trials ({t.search}), up to {max_conc} at once, "
        f"{'GPU' if use_gpu else 'CPU'}; objective {t.metric} ({t.mode}); storage {plan['sweep_dir']}",
        flush=True,
    )

    session = uuid.uuid4().hex[:12]
    callbacks = []
    exp_id = None
    if uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        exp_id = tracking.ensure_experiment(uri, t.sweep_name)
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=uri,
                experiment_name=t.sweep_name,
                save_artifact=False,
                tags={SWEEP_TAG: t.sweep_name, ROLE_TAG: "trial", SESSION_TAG: session},
            )
        )

    scheduler = build_scheduler(t)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, plan=plan), {"CPU": DRIVER_CPUS})
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune_space(specs, t.search, t.num_samples),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=1 if t.search == "grid" else t.num_samples,  # grid repeats are REPEAT_KEY's
            max_concurrent_trials=max_conc if t.search == "optuna" else None,
            trial_name_creator=TrialNamer(plan),
            trial_dirname_creator=_dirname,
        ),
        run_config=tune.RunConfig(
            name=t.sweep_name,
            storage_path=plan["sweep_dir"].rsplit("/", 1)[0],
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=t.trial_max_failures),
        ),
    )
    started = time.time()
    grid = tuner.fit()
    rows = collect_rows(grid, specs, plan, t, stopped=getattr(scheduler, "stopped", set()))
    if n_trials is not None and len(rows) < n_trials:
        print(
            f"[tune] {n_trials - len(rows)} of {n_trials} trials never started (the sweep was interrupted)", flush=True
        )
    if t.keep_students == "best":
        _remove_other_students(plan, rows, pick_best(rows, t.metric, t.mode, [s.key for s in specs]))
    return summarize(cfg, specs, plan, rows, uri, exp_id, session, wall_s=time.time() - started)


# --------------------------------------------------------------------------- results


def collect_rows(grid, specs: list[ParamSpec], plan: dict, t: TuneConfig, stopped: set[str]) -> list[dict[str, Any]]:
    """One row per trial: name, status (error, stopped early by the scheduler, completed, or
    unfinished when the sweep was interrupted),
    swept values, the objective (last and best) and context."""
    rows = []
    for r in grid:
        name = Path(str(r.path)).name
        m = dict(r.metrics or {})
        run_dir = f"{plan['run_storage']}/{name}"
        done = read_text(f"{run_dir}/{TRIAL_RESULT_FILE}")
        done = json.loads(done) if done else None
        if r.error is not None:
            status = "error"
        elif name in stopped:
            status = "stopped"
        else:  # Tune marks a trial's last result done when its function returned; not when interrupted
            status = "completed" if m.get("done") else "unfinished"
        best_seen = None
        df = r.metrics_dataframe
        if df is not None and t.metric in df:
            vals = [float(v) for v in df[t.metric].tolist() if v is not None and math.isfinite(float(v))]
            if vals:
                best_seen = min(vals) if t.mode == "min" else max(vals)
        row: dict[str, Any] = {"trial": name, "status": status, "repeat": split_repeat(r.config or {})[1]}
        for s in specs:
            row[s.key] = plain((r.config or {}).get(s.key))
        row[t.metric] = _num(m.get(t.metric))
        row[f"best_{t.metric}"] = best_seen
        for k in context_metrics(t.metric, plan["base"]["train"]["eval_sources"]):
            row[k] = _num(m.get(k))
        for k in ("step", "tokens_seen"):
            v = _num(m.get(k))
            row[k] = int(v) if v is not None else None
        row["student_dir"] = (done or {}).get("student_dir")
        row["error"] = (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error is not None else None
        rows.append(row)
    rows.sort(key=lambda x: x["trial"])
    return rows


def _num(v: Any) -> float | None:
    v = plain(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _pool(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Trials that ran to the end with an objective (all that reported one, when none did): a trial
    ASHA stopped was already behind at its last rung."""
    scored = [r for r in rows if r.get(metric) is not None]
    return [r for r in scored if r["status"] == "completed"] or scored


def point_rows(rows: list[dict[str, Any]], keys: list[str], metric: str) -> list[dict[str, Any]]:
    """One row per configuration (the swept values of ``keys``): its trials and the mean, lowest
    and highest objective over those in ``_pool``; first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(json.dumps([r.get(k) for k in keys], default=str), []).append(r)
    pool = {id(r) for r in _pool(rows, metric)}
    out = []
    for trials in groups.values():
        vals = [r[metric] for r in trials if id(r) in pool]
        out.append(
            {
                **{k: trials[0].get(k) for k in keys},
                "trials": len(trials),
                "scored": len(vals),
                f"mean_{metric}": sum(vals) / len(vals) if vals else None,
                f"min_{metric}": min(vals, default=None),
                f"max_{metric}": max(vals, default=None),
                "trial_names": [r["trial"] for r in trials],
            }
        )
    return out


def pick_best(
    rows: list[dict[str, Any]], metric: str, mode: str, keys: list[str] | None = None
) -> dict[str, Any] | None:
    """The trial with the best last-reported objective among ``_pool``. With repeats (``keys``
    given and a configuration trained more than once), the configuration with the best mean wins
    first, then its best trial: one lucky training must not pick the configuration."""
    pool = _pool(rows, metric)
    if not pool:
        return None
    better = min if mode == "min" else max
    points = point_rows(pool, keys, metric) if keys else []
    if any(p["trials"] > 1 for p in points):
        top = better(points, key=lambda p: p[f"mean_{metric}"])
        pool = [r for r in pool if r["trial"] in top["trial_names"]]
    return better(pool, key=lambda r: r[metric])


def best_config_yaml(plan: dict, row: dict[str, Any], specs: list[ParamSpec], metric: str) -> str:
    """The best trial's full config as YAML that pipelines/distill.py --config accepts as it is:
    the base plus the trial's values, named after the trial; the testing aid train.fail_at_step
    is cleared (it would only inject a failure into the real run)."""
    params = {s.key: row[s.key] for s in specs}
    k = row.get("repeat", 0)  # that trial's own seed, so that the file trains it again
    d = repeat_dict(plan["base"], params, k)
    d["train"]["run_name"] = row["trial"]
    d["train"]["fail_at_step"] = None
    cfg = build_config(d)
    head = (
        f"# Best trial of sweep {plan['sweep_name']}: {row['trial']} ({metric} = {row[metric]:.6g}).\n"
        + "".join(f"#   {k} = {v!r}\n" for k, v in params.items())
        + (f"# Its student: {row['student_dir']}\n" if row.get("student_dir") else "")
        + (f"# Repeat {k + 1} of its configuration: train.seed is the sweep's + {k}.\n" if k else "")
        + "# Train it again: python pipelines/distill.py --config best_config.yaml\n"
    )
    text = head + dump_config(cfg)
    build_config(yaml.safe_load(text))  # what distill.py will do with it
    return text


def results_table(rows: list[dict[str, Any]], columns: list[str]) -> tuple[str, str]:
    """(CSV, markdown) of the rows."""
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def plot_objective(rows: list[dict[str, Any]], specs: list[ParamSpec], metric: str) -> bytes:
    """PNG: the objective (last reported) against each swept value, one panel per parameter;
    completed trials filled, stopped ones hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(specs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    scored = [r for r in rows if r.get(metric) is not None]
    for ax, s in zip(axes[0], specs, strict=False):
        xs = [r[s.key] for r in scored]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs) and xs
        if numeric:
            pos = [float(x) for x in xs]
            if s.kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({json.dumps(x, default=str) if not isinstance(x, str) else x for x in xs})
            index = {lab: i for i, lab in enumerate(labels)}
            pos = [index[json.dumps(x, default=str) if not isinstance(x, str) else x] for x in xs]
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20, fontsize=8)
        for x, r in zip(pos, scored, strict=False):
            done = r["status"] == "completed"
            ax.scatter([x], [r[metric]], s=40, facecolors="C0" if done else "none", edgecolors="C0")
        ax.set_xlabel(s.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    failed = len(rows) - len(scored)
    fig.suptitle(
        f"{metric} per trial, last report ({len(scored)} scored"
        + (f", {failed} without a result" if failed else "")
        + "; hollow: stopped early)"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def summarize(
    cfg: Config,
    specs: list[ParamSpec],
    plan: dict,
    rows: list[dict[str, Any]],
    uri: str | None,
    exp_id: str | None,
    session: str,
    wall_s: float,
) -> SweepResult:
    """Write results.csv/.md, objective.png and best_config.yaml into the sweep directory, add
    each trial's config to its MLflow run, and log the summary run."""
    t = cfg.tune
    sweep_dir = plan["sweep_dir"]
    columns = (
        ["trial", "status"]
        + [s.key for s in specs]
        + [t.metric, f"best_{t.metric}"]
        + context_metrics(t.metric, cfg.train.eval_sources)
        + ["step", "tokens_seen", "error", "student_dir"]
    )
    csv_text, md_text = results_table(rows, columns)
    keys = [s.key for s in specs]
    points = point_rows(rows, keys, t.metric)
    if any(p["trials"] > 1 for p in points):
        _, points_md = results_table(
            points, keys + ["trials", "scored", f"mean_{t.metric}", f"min_{t.metric}", f"max_{t.metric}"]
        )
        md_text += (
            "\nPer configuration, over its repeats (repeat k trains with train.seed + k; the best "
            "configuration is the best mean; once any trial has completed, trials the scheduler stopped "
            "early are not averaged, their objective being from an earlier step):\n\n" + points_md
        )
    png = plot_objective(rows, specs, t.metric)
    best = pick_best(rows, t.metric, t.mode, keys)
    files = {
        "results.csv": f"{sweep_dir}/results.csv",
        "results.md": f"{sweep_dir}/results.md",
        "objective.png": f"{sweep_dir}/objective.png",
    }
    write_bytes(files["results.csv"], csv_text.encode())
    write_bytes(files["results.md"], md_text.encode())
    write_bytes(files["objective.png"], png)
    best_path = None
    best_text = None
    if best is not None:
        best_text = best_config_yaml(plan, best, specs, t.metric)
        best_path = files["best_config.yaml"] = f"{sweep_dir}/best_config.yaml"
        write_bytes(best_path, best_text.encode())

    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error", "unfinished")}
    print(
        f"\n[tune] sweep {t.sweep_name}: {len(rows)} trials, {counts['completed']} completed, "
        f"{counts['stopped']} stopped early, {counts['error']} failed"
        + (f", {counts['unfinished']} unfinished" if counts["unfinished"] else "")
        + f" ({wall_s:.0f} s)\n{md_text}",
        flush=True,
    )
    for r in rows:
        if r["status"] == "error":
            print(f"[tune] trial {r['trial']} failed: {r['error']}", flush=True)

    summary_id = None
    if uri and exp_id:
        summary_id = _log_mlflow(cfg, specs, plan, rows, best, best_text, uri, exp_id, session, files, counts, wall_s)
    if best is not None:
        print(f"[tune] best trial: {best['trial']} ({t.metric} {best[t.metric]:.4f}); config: {best_path}", flush=True)
    if uri:
        from linearard_ray.tracking import run_url

        where = run_url(uri, exp_id, summary_id) if summary_id else uri
        print(f"[tune] MLflow experiment {t.sweep_name!r}: {where}", flush=True)
    return SweepResult(
        sweep_name=t.sweep_name,
        sweep_dir=sweep_dir,
        trials=rows,
        best=best,
        best_config_path=best_path,
        tracking_uri=uri,
        experiment_id=exp_id,
        summary_run_id=summary_id,
        files=files,
    )


def _log_mlflow(cfg, specs, plan, rows, best, best_text, uri, exp_id, session, files, counts, wall_s) -> str:
    import tempfile

    from linearard_ray import tracking

    t = cfg.tune
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{SESSION_TAG}` = '{session}'", max_results=10000)
    by_name = {r.data.tags.get("trial_name"): r.info.run_id for r in runs}
    for row in rows:
        rid = by_name.get(row["trial"])
        row["mlflow_run_id"] = rid
        if rid is None:
            continue
        params = {s.key: row[s.key] for s in specs}
        # Written straight through the client: the trial's run is already closed by the callback.
        client.set_tag(rid, "linearard.trial.status", row["status"])
        client.set_tag(rid, tracking.RUN_NAME_TAG, row["trial"])
        client.log_text(rid, dump_config(apply_params(plan["base"], params)), "config.yaml")

    run_id = tracking.create_run(
        uri,
        exp_id,
        f"{t.sweep_name}-summary",
        tags={SWEEP_TAG: t.sweep_name, ROLE_TAG: "summary", SESSION_TAG: session},
    )
    lg = tracking.RunLogger(uri, run_id)
    lg.log_params({f"tune.{k}": v for k, v in t.model_dump(mode="json").items() if k != "space"})
    lg.log_params(
        {
            "tune.space": json.dumps(t.space),
            "best_trial": best["trial"] if best else None,
            "sweep_dir": plan["sweep_dir"],
        }
    )
    metrics = {
        "trials": len(rows),
        "trials_completed": counts["completed"],
        "trials_stopped": counts["stopped"],
        "trials_failed": counts["error"],
        "trials_unfinished": counts["unfinished"],
        "wall_time_s": wall_s,
    }
    if best is not None:
        metrics[f"best_{t.metric}"] = best[t.metric]
    lg.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory(prefix="linearard_sweep_") as tmp:
        for name, path in files.items():
            data = read_bytes(path)
            (Path(tmp) / name).write_bytes(data)
            lg.log_artifact(Path(tmp) / name)
    lg.log_text(dump_config(cfg), "sweep_config.yaml")
    lg.finish("FINISHED")
    return run_id


def read_bytes(path: str) -> bytes:
    fs, p = fs_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def _remove_other_students(plan: dict, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """tune.keep_students=best: delete the exported students of the other trials of this sweep
    (each is a full merged model), only inside the sweep's own students directory."""
    root = Path(plan["students_dir"]).resolve()
    removed = []
    for r in rows:
        if best is not None and r["trial"] == best["trial"]:
            continue
        d = (root / r["trial"]).resolve()
        if d.parent == root and d.is_dir():
            shutil.rmtree(d)
            removed.append(r["trial"])
            r["student_dir"] = None
    if removed:
        print(
            f"[tune] tune.keep_students=best: removed the exported students of {len(removed)} other trial(s) "
            f"under {root}",
            flush=True,
        )
