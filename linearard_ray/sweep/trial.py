"""Inside a trial: the driver function Tune runs for each trial, its report callback, and the
trial names.

Ray Train V2 cannot be handed to a ``Tuner`` directly, so every trial runs a *driver function*
(``trial_driver``) that builds the trial's config and calls ``run_distill`` with a
``TuneReportCallback`` in the Train run's callbacks: the workers' ``ray.train.report`` results
(the held-out NLL gap among them) reach Tune, where ASHA may stop a weak trial early."""

from __future__ import annotations

import json
import uuid
from typing import Any

from linearard_ray.config import ConfigError
from linearard_ray.logs import get_logger
from linearard_ray.storage import read_text, write_bytes
from linearard_ray.sweep.plan import repeat_name, run_config
from linearard_ray.sweep.search_space import apply_params, config_hash, plain, split_repeat, trial_name

log = get_logger(__name__)

LAST_REPORT_FILE = "tune_last_report.json"
TOTAL_STEPS_KEY = "total_steps"  # added to every report: the optimizer steps the trial's run trains
TRIAL_RESULT_FILE = "tune_trial_result.json"


def total_steps(run_context) -> int | None:
    """The optimizer steps of the Train run, from the job the driver resolved (None if absent)."""
    job = (getattr(run_context, "train_loop_config", None) or {}).get("job") or {}
    total = job.get("total_steps")
    return int(total) if total is not None else None


def ran_every_step(metrics: dict[str, Any]) -> bool:
    """Whether a report comes from the trial's last optimizer step."""
    step, total = metrics.get("step"), metrics.get(TOTAL_STEPS_KEY)
    return step is not None and total is not None and int(step) >= int(total)


def _report_callback_class():
    """The callback class, defined only once Ray Tune is imported (inside the trial)."""
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
            total = total_steps(run_context)
            if total is not None:  # the scheduler and the summary tell a finished trial from a stopped one
                metrics[0][TOTAL_STEPS_KEY] = total
            super().after_report(run_context, metrics, checkpoint)
            try:
                keep = {k: plain(v) for k, v in metrics[0].items() if isinstance(plain(v), (int, float, str))}
                write_bytes(self.record_path, json.dumps({"attempt": self.attempt, "metrics": keep}).encode())
            except Exception as e:  # the record is a convenience for restarts; never fail training for it
                log.warning(f"[tune] could not record the last report in {self.record_path}: {e}")

    return SweepReportCallback


def trial_driver(config: dict[str, Any], plan: dict) -> None:
    """One trial: build its config and run the distillation with Tune reporting."""
    import ray.tune

    from linearard_ray.logs import setup_worker_logging
    from linearard_ray.training.driver import run_distill

    setup_worker_logging()  # a Tune worker process: the driver's level, Ray Train's report lines quiet
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


def trial_dirname(trial) -> str:
    """Tune's trial_dirname_creator: the trial's directory is named after the trial."""
    return str(trial)
