"""Ray Tune sweeps over distillation settings, recorded in MLflow.

The flow: check the sweep before Ray starts (`check_sweep`), make the plan and prepare the data
once (`sweep.plan`), run one Ray Train distillation per trial (`sweep.trial`), and summarize the
trials into tables, a plot, the best config and an MLflow summary run (`sweep.summary`). This
module holds the Tune side: searcher, scheduler, concurrency, and `run_sweep` itself.
"""

from __future__ import annotations

import math
import time
import uuid

from linearard_ray.config import Config, ConfigError, TuneConfig
from linearard_ray.logs import get_logger
from linearard_ray.sweep.metrics import HIGHER_IS_BETTER, objective_metrics
from linearard_ray.sweep.plan import make_plan, prepare_data, trial_checkpoint_every
from linearard_ray.sweep.search_space import (
    ParamSpec,
    apply_params,
    base_dict,
    grid_size,
    parse_space,
    to_tune_space,
    trial_count_text,
)
from linearard_ray.sweep.summary import (
    ROLE_TAG,
    SESSION_TAG,
    SWEEP_TAG,
    SweepResult,
    collect_rows,
    pick_best,
    remove_other_students,
    summarize,
)
from linearard_ray.sweep.trial import TrialNamer, ran_every_step, trial_dirname, trial_driver

log = get_logger(__name__)

DATA_CPUS = 1.0  # left free for Ray Data's read tasks, which feed the workers during training
DRIVER_CPUS = 0.01  # a trial's driver function only waits on its Train run; workers hold the real resources
ASHA_MAX_T = 2**31  # trials end by their own step budget, never at an ASHA horizon


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
    check_trial_configs(cfg, specs)
    return specs


def check_trial_configs(cfg: Config, specs: list[ParamSpec]) -> None:
    """distill's cluster-free checks (model windows, layer selections, sources) on the base config
    and on every swept value, so a trial that would fail them fails the sweep before Ray starts
    instead of one trial at a time after it."""
    from linearard_ray.training.checks import check_config

    check_config(cfg)
    raw = base_dict(cfg)
    for s in specs:
        for v in s.candidates():
            try:
                check_config(apply_params(raw, {s.key: v}))
            except ConfigError as e:
                raise ConfigError(f"tune.space[{s.key!r}]: value {v!r}: {e}") from None


# --------------------------------------------------------------------------- Tune's parts


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
    stopped (``.stopped``, trial names), for the results table.

    A report from a trial's last step (``TOTAL_STEPS_KEY``) is never a stop: the trial has trained
    every step, and stopping it then would only cut off its export and show it as stopped early."""
    if t.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.stopped: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and not ran_every_step(result):
                self.stopped.add(str(trial))
                return action
            return TrialScheduler.CONTINUE

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
        log.info(
            f"[tune] the cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs now; one "
            f"trial needs {t.num_workers} worker(s) × ({t.cpus_per_worker:g} CPU"
            f"{f', {t.gpus_per_worker:g} GPU' if use_gpu else ''}): running one trial at a time, "
            "which waits until the autoscaler adds nodes",
        )
    return max(1, n)


def mlflow_trial_callbacks(t: TuneConfig, uri: str | None, session: str) -> tuple[str | None, list]:
    """(the sweep's MLflow experiment id, the Tuner callbacks that write one MLflow run per trial);
    (None, []) without tracking."""
    if not uri:
        return None, []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from linearard_ray import tracking

    exp_id = tracking.ensure_experiment(uri, t.sweep_name)
    callback = MLflowLoggerCallback(
        tracking_uri=uri,
        experiment_name=t.sweep_name,
        save_artifact=False,
        tags={SWEEP_TAG: t.sweep_name, ROLE_TAG: "trial", SESSION_TAG: session},
    )
    return exp_id, [callback]


def build_tuner(t: TuneConfig, specs: list[ParamSpec], plan: dict, searcher, scheduler, max_conc: int, callbacks):
    """The Tuner that runs `trial_driver` once per trial of the space."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial_driver, plan=plan), {"CPU": DRIVER_CPUS})
    return tune.Tuner(
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
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=t.sweep_name,
            storage_path=plan["sweep_dir"].rsplit("/", 1)[0],
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=t.trial_max_failures),
        ),
    )


# --------------------------------------------------------------------------- the sweep


def _announce(cfg: Config, specs: list[ParamSpec], plan: dict, max_conc: int, use_gpu: bool) -> None:
    """Print the sweep's shape before it starts, and the trials' checkpoint interval when it is not
    train.checkpoint_every itself."""
    t = cfg.tune
    e, c = cfg.train.eval_every, cfg.train.checkpoint_every
    if c % e:
        log.info(
            f"[tune] trials checkpoint every {trial_checkpoint_every(base_dict(cfg)['train'])} steps "
            f"(train.checkpoint_every={c} rounded up to a multiple of train.eval_every={e})",
        )
    log.info(
        f"[tune] sweep {t.sweep_name}: {trial_count_text(specs, t.search, t.num_samples)}; up to {max_conc} at once, "
        f"{'GPU' if use_gpu else 'CPU'}; objective {t.metric} ({t.mode}); storage {plan['sweep_dir']}",
    )


def run_sweep(cfg: Config) -> SweepResult:
    """Run the sweep described by ``cfg.tune`` over the base ``cfg``; write the results table,
    plot and best config, and record everything in MLflow."""
    import ray

    from linearard_ray.data.teacher_samples import with_teacher_samples
    from linearard_ray.ray_env import ensure_ray, worker_env
    from linearard_ray.training.driver import resolve_use_gpu

    t = cfg.tune
    specs = check_sweep(cfg)
    uri = cfg.tracking.resolved_uri() if cfg.tracking.enabled else None
    ensure_ray(worker_env(uri))
    use_gpu = resolve_use_gpu(cfg)
    cfg = with_teacher_samples(cfg, use_gpu)  # once for every trial, from the base config's teacher
    plan = make_plan(cfg, specs)
    plan["data_dirs"] = prepare_data(cfg, specs, plan)

    max_conc = t.max_concurrent or default_max_concurrent(cfg, ray.cluster_resources(), use_gpu)
    searcher = build_searcher(t, cfg.train.seed, max_conc)
    n_trials = grid_size(specs, t.search, t.num_samples)
    _announce(cfg, specs, plan, max_conc, use_gpu)

    session = uuid.uuid4().hex[:12]
    exp_id, callbacks = mlflow_trial_callbacks(t, uri, session)
    scheduler = build_scheduler(t)
    tuner = build_tuner(t, specs, plan, searcher, scheduler, max_conc, callbacks)
    started = time.time()
    grid = tuner.fit()
    rows = collect_rows(grid, specs, plan, t, stopped=getattr(scheduler, "stopped", set()))
    if n_trials is not None and len(rows) < n_trials:
        log.info(f"[tune] {n_trials - len(rows)} of {n_trials} trials never started (the sweep was interrupted)")
    if t.keep_students == "best":
        remove_other_students(plan, rows, pick_best(rows, t.metric, t.mode, [s.key for s in specs]))
    return summarize(cfg, specs, plan, rows, uri, exp_id, session, wall_s=time.time() - started)
