"""Distillation on Ray Train V2, the driver side: one ``TorchTrainer`` job per run name.

``run_distill`` checks what the config alone can tell (checks.py) before Ray starts, then what
needs the cluster (its GPUs, the data volume against the budget), preprocesses the data
(plan.py), opens or reopens the MLflow run, and starts the trainer whose workers run
``worker.train_loop_per_worker``. With ``train.evaluate_at_end`` it then evaluates the student.
"""

from __future__ import annotations

import json
from typing import Any

from linearard_ray.config import Config, ConfigError
from linearard_ray.logs import get_logger, show_result
from linearard_ray.ray_env import ensure_ray, worker_env
from linearard_ray.storage import read_text, write_text
from linearard_ray.training import run_lock
from linearard_ray.training.checkpointing import stand_in_for_deleted_checkpoints
from linearard_ray.training.checks import check_config, check_resumable
from linearard_ray.training.plan import JOB_FILE, JobSpec, TrainResult, job_paths, plan_steps, prepare_streams
from linearard_ray.training.run_lock import Acquired
from linearard_ray.training.worker import train_loop_per_worker

log = get_logger(__name__)


def resolve_use_gpu(cfg: Config) -> bool:
    """``train.use_gpu``, or with it unset whether the Ray cluster has GPUs."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.use_gpu is None:
        return gpus > 0
    if cfg.train.use_gpu and gpus == 0:
        raise ConfigError("train.use_gpu is true but the Ray cluster has no GPUs")
    return cfg.train.use_gpu


def build_trainer(
    cfg: Config,
    job: JobSpec,
    datasets: dict[str, Any],
    *,
    worker_env: dict[str, str] | None = None,
    callbacks: list | None = None,
):
    """The ``TorchTrainer`` for this job (does not start it)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if job.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=job.use_gpu,
        resources_per_worker=resources,
        accelerator_type=t.accelerator_type if job.use_gpu else None,
    )
    storage_root, _, name = job.storage_dir.rstrip("/").rpartition("/")
    run_config = RunConfig(
        name=name,
        storage_path=storage_root,
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        failure_config=FailureConfig(max_failures=t.max_failures),
        worker_runtime_env={"env_vars": worker_env or {}},
        callbacks=callbacks,
    )
    # Every worker reads the whole order-preserving stream and keeps its own rows (data/streams.py
    # says why), so nothing is split here.
    data_config = DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "job": job.to_dict()},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=data_config,
    )


def open_mlflow_run(
    cfg: Config, storage_dir: str, lock: Acquired | None = None
) -> tuple[str | None, str | None, str | None]:
    """(uri, experiment id, run id): the run recorded for this run name, or a new one. A reopened
    run is tagged with the attempt number, and as resumed from a kill when its last attempt
    never ended it (still RUNNING) or left a lock behind."""
    if not cfg.tracking.enabled:
        return None, None, None
    from linearard_ray import tracking

    uri = cfg.tracking.resolved_uri()
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    job_file = f"{storage_dir}/{JOB_FILE}"
    prior = read_text(job_file)
    info = json.loads(prior) if prior else {}
    attempt = int(info.get("attempts", 1)) + 1 if info else 1
    reopened = _reopen_mlflow_run(uri, info, attempt, lock)
    if reopened is not None:
        exp_id, run_id = info.get("experiment_id", exp_id), reopened
    else:
        run_id = tracking.create_run(uri, exp_id, cfg.train.run_name, tags={"linearard.storage": storage_dir})
        attempt = 1
    record = {"tracking_uri": uri, "experiment_id": exp_id, "mlflow_run_id": run_id, "attempts": attempt}
    write_text(job_file, json.dumps(record))
    return uri, exp_id, run_id


def _reopen_mlflow_run(uri: str, info: dict, attempt: int, lock: Acquired | None) -> str | None:
    """The run id recorded for this run name, reopened and tagged; None when there is none to reopen."""
    from linearard_ray import tracking

    run_id = info.get("mlflow_run_id")
    if info.get("tracking_uri") != uri or not run_id:
        return None
    status = tracking.run_status(uri, run_id)
    if status is None:
        return None  # the run was deleted from the store: start a new one
    killed = status == "RUNNING" or (lock is not None and lock.replaced is not None)
    tags = {"linearard.attempts": attempt}
    if killed:
        tags["linearard.resumed_from_kill"] = "true"
        if lock is not None and lock.replaced is not None:
            tags["linearard.killed_owner"] = f"{lock.replaced.describe()} ({lock.replaced_because})"
    tracking.RunLogger(uri, run_id).set_tags(tags)  # also marks it RUNNING again
    if killed:
        log.info(f"[distill] attempt {attempt}: the previous attempt was killed; MLflow run {run_id} tagged")
    return run_id


def prepare_job(cfg: Config, lock: Acquired | None = None) -> tuple[JobSpec, dict[str, Any]]:
    """Everything the driver checks and resolves before any worker starts."""
    storage_dir, output_dir = job_paths(cfg)
    use_gpu = resolve_use_gpu(cfg)
    streams, primary, datasets = prepare_streams(cfg)
    total, tokens_per_step = plan_steps(cfg, streams, primary, cfg.train.num_workers)
    uri, exp_id, run_id = open_mlflow_run(cfg, storage_dir, lock)
    job = JobSpec(
        run_name=cfg.train.run_name,
        storage_dir=storage_dir,
        output_dir=output_dir,
        total_steps=total,
        tokens_per_step=tokens_per_step,
        streams=streams,
        primary=primary,
        use_gpu=use_gpu,
        tracking_uri=uri,
        experiment_id=exp_id,
        mlflow_run_id=run_id,
        lock_token=lock.owner.token if lock is not None else None,
    )
    return job, datasets


def run_distill(cfg: Config, *, callbacks: list | None = None) -> TrainResult:
    """Run (or resume) the distillation job named ``cfg.train.run_name``; export and report where
    the student and the MLflow run are. The run name is locked for the job's whole life."""
    check_config(cfg)
    storage_dir, _ = job_paths(cfg)
    check_resumable(cfg, storage_dir)
    lock = run_lock.acquire(storage_dir, cfg.train.run_name, takeover=cfg.train.takeover)
    if lock.replaced is not None:
        log.info(
            f"[distill] took over run {cfg.train.run_name!r} from {lock.replaced.describe()}: {lock.replaced_because}"
        )
    try:
        with run_lock.Heartbeat(storage_dir, lock.owner) as heartbeat:
            return _run_locked(cfg, lock, heartbeat, callbacks)
    finally:
        run_lock.release(storage_dir, lock.owner)


def _run_locked(cfg: Config, lock: Acquired, heartbeat: run_lock.Heartbeat, callbacks: list | None) -> TrainResult:
    uri = cfg.tracking.resolved_uri() if cfg.tracking.enabled else None
    env = worker_env(uri)
    ensure_ray(env)
    from linearard_ray.data.teacher_samples import with_teacher_samples

    cfg = with_teacher_samples(cfg, resolve_use_gpu(cfg))
    job, datasets = prepare_job(cfg, lock)
    log.info(
        f"[distill] run {job.run_name}: {job.total_steps} steps × {job.tokens_per_step} tokens "
        f"on {cfg.train.num_workers} {'GPU' if job.use_gpu else 'CPU'} worker(s); storage {job.storage_dir}"
    )
    # else Ray Train refuses the whole run; a warning, so that --quiet still says a checkpoint was lost
    stand_in_for_deleted_checkpoints(job.storage_dir, log.warning)
    result = _fit(build_trainer(cfg, job, datasets, worker_env=env, callbacks=callbacks), job, heartbeat)
    res = _train_result(job, result)
    if cfg.train.evaluate_at_end and res.student_dir:
        res.evaluation = evaluate_at_end(cfg, res)
    show_result(f"[distill] student: {res.student_dir}")
    if res.mlflow_run_id:
        from linearard_ray.tracking import run_url

        show_result(f"[distill] MLflow run: {run_url(res.tracking_uri, res.mlflow_experiment_id, res.mlflow_run_id)}")
    return res


def _fit(trainer, job: JobSpec, heartbeat: run_lock.Heartbeat | None = None):
    """The trainer's result; on failure the MLflow run is marked FAILED and the error raised,
    unless another job took the run over (the run is then that job's)."""
    try:
        result = trainer.fit()  # Train V2 raises on failure; older code paths return result.error
        if result.error is not None:
            raise result.error
    except BaseException as e:
        if heartbeat is not None and heartbeat.lost_to is not None:
            raise run_lock.RunLockError(
                f"run {job.run_name!r} was taken over by another job ({heartbeat.lost_to.describe()})"
            ) from e
        if job.mlflow_run_id and job.tracking_uri:
            # FAILED until the same run name is started again, which resumes and reopens this run
            from linearard_ray.tracking import RunLogger

            try:
                RunLogger(job.tracking_uri, job.mlflow_run_id).finish("FAILED")
            except Exception as err:  # never hide the training error behind a tracking one
                log.error(f"[distill] could not mark the MLflow run failed: {err}")
        raise
    return result


def _train_result(job: JobSpec, result) -> TrainResult:
    """The trainer's result and rank 0's return value as a ``TrainResult``."""
    ret = result.return_value or {}
    return TrainResult(
        run_name=job.run_name,
        student_dir=ret.get("student_dir"),
        final_step=int(ret.get("step", 0)),
        tokens_seen=int(ret.get("tokens_seen", 0)),
        metrics=ret.get("metrics", dict(result.metrics or {})),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_dir=job.storage_dir,
        tracking_uri=job.tracking_uri,
        mlflow_experiment_id=job.experiment_id,
        mlflow_run_id=ret.get("mlflow_run_id") or job.mlflow_run_id,
    )


def evaluate_at_end(cfg: Config, res: TrainResult) -> dict[str, Any] | None:
    """``train.evaluate_at_end``: the evaluation stage on the exported student; its headline
    numbers are also logged into this training run, its own report and MLflow run stay separate."""
    from linearard_ray.evaluation.evaluate import evaluate_student

    report = evaluate_student(cfg, res.student_dir)
    if res.mlflow_run_id and res.tracking_uri and isinstance(report, dict):
        _log_evaluation(res, report)
    log.info(
        "[distill] evaluation done"
        + (f": {report.get('output_dir')}" if isinstance(report, dict) and report.get("output_dir") else "")
    )
    return report


def _log_evaluation(res: TrainResult, report: dict) -> None:
    """Tag the training run with the evaluation's run and close it. The evaluation itself logs its
    headline figures into this run (``evaluation.students``), as it does for any exported student."""
    from linearard_ray.tracking import RunLogger

    lg = RunLogger(res.tracking_uri, res.mlflow_run_id)
    if isinstance(report.get("mlflow"), dict) and report["mlflow"].get("run_id"):
        lg.set_tags({"evaluation.mlflow_run_id": report["mlflow"]["run_id"]})
    lg.finish("FINISHED")
