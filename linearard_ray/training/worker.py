"""The Ray Train worker: holds a frozen teacher and a DDP-wrapped student (or both sharded with
FSDP2 under ``train.parallelism: fsdp``), streams its share of the token blocks
deterministically, evaluates on held-out text, and writes checkpoints that let a failed worker
group, or the same job started again, continue at the exact step with the same data position.
Rank 0 logs to MLflow and exports the student at the end.

Ray Train pickles ``train_loop_per_worker`` by reference: it stays a module-level function.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from linearard_ray.config import Config, build_config, dump_config, flatten
from linearard_ray.logs import get_logger, setup_worker_logging
from linearard_ray.storage import read_text, write_text
from linearard_ray.training.checkpointing import (
    LoadedCheckpoint,
    capture_rng,
    check_resumes_under,
    load_newest_intact,
    new_checkpoint_dir_name,
)
from linearard_ray.training.distributed import device_for_worker, gather_objects
from linearard_ray.training.held_out import HeldOutEval, held_out_evals
from linearard_ray.training.plan import JobSpec, fail_marker_path, lm_every
from linearard_ray.training.progress import Progress
from linearard_ray.training.step import WorkerStreams, open_streams, optimization_step
from linearard_ray.training.trainee import (
    Trainee,
    build_trainee,
    write_checkpoint,
)

log = get_logger(__name__)


@dataclass(frozen=True)
class Worker:
    """This worker's job, config, place in the group and device."""

    cfg: Config
    job: JobSpec
    rank: int
    world: int
    device: torch.device


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker: ``config = {"cfg": <Config as dict>, "job": <JobSpec as dict>}``.

    Returns (on rank 0) where the student was exported and the final step's numbers."""
    import ray.train

    setup_worker_logging()  # the driver's level; Ray Train's per-report metrics line left out
    cfg = build_config(config["cfg"])
    job = JobSpec.from_dict(config["job"])
    _quiet_libraries()
    ctx = ray.train.get_context()
    w = Worker(cfg, job, ctx.get_world_rank(), ctx.get_world_size(), device_for_worker(job.use_gpu))
    loaded = _resume_checkpoint(w)
    trainee = build_trainee(cfg, job, w.device, w.rank, w.world, loaded)
    streams = open_streams(cfg, job, trainee.state, w.rank, w.world, _dataset_epochs, w.device.type == "cuda")
    logger = _open_tracking(w, trainee, streams, resumed=loaded is not None)
    if w.rank == 0:
        _announce_start(w, trainee, streams, resumed=loaded is not None)
    evaluators = _held_out_evaluators(w, trainee)
    final_metrics = _train(w, trainee, streams, evaluators, logger)
    streams.close()
    gathered = _gather_sharded_student(trainee)  # every worker takes part
    if w.rank != 0:
        return None
    return _export(w, trainee, logger, final_metrics, gathered)


# --------------------------------------------------------------------------- set-up


def _quiet_libraries() -> None:
    """Weight-loading progress bars from every worker would interleave with the step lines."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def _resume_checkpoint(w: Worker) -> LoadedCheckpoint | None:
    """The checkpoint Ray Train hands this attempt (a retry, or the same run name again), if any;
    when it fails its check, the newest older checkpoint of the run that passes (rank 0 says which).
    It may have been written by another number of workers with the same global batch."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    # a skipped checkpoint means steps done again: a warning, which --quiet still shows
    loaded = load_newest_intact(ckpt.filesystem, ckpt.path, log.warning if w.rank == 0 else lambda _line: None)
    check_resumes_under(loaded.state, loaded.dcp_dir is not None, w.cfg.train, w.world)
    return loaded


def _dataset_epochs(name: str):
    """One epoch of the trainer's dataset ``name``, read in order (every worker reads it whole and
    keeps its own rows: data/streams.py says why)."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        raise RuntimeError(f"dataset {name!r} was not passed to the trainer")
    return lambda: shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=1)


def _open_tracking(w: Worker, trainee: Trainee, streams: WorkerStreams, resumed: bool):
    """Rank 0's MLflow logger (None elsewhere, or without tracking), with the run's parameters."""
    state = trainee.state
    run_id = state.mlflow_run_id or w.job.mlflow_run_id
    state.mlflow_run_id = run_id
    if not (w.rank == 0 and w.job.tracking_uri and run_id):
        return None
    from linearard_ray.tracking import RunLogger

    logger = RunLogger(w.job.tracking_uri, run_id)
    logger.log_params(_job_params(w, trainee, streams))
    logger.start_system_metrics(w.cfg.tracking)  # stopped by logger.finish at export
    if resumed:
        logger.set_tags({"resumed_from_step": state.step})
    return logger


def _job_params(w: Worker, trainee: Trainee, streams: WorkerStreams) -> dict:
    """The config's fields and what the driver resolved for the job, as MLflow parameters."""
    job = w.job
    params = flatten(w.cfg)
    params.update(
        {"job.total_steps": job.total_steps, "job.tokens_per_step": job.tokens_per_step, "job.world_size": w.world}
    )
    for name, spec in job.streams.items():
        params[f"job.{name}.blocks"] = spec.num_rows
        params[f"job.{name}.ctx_len"] = spec.ctx_len
    params["job.primary_stream"] = job.primary
    params["job.teacher_loaded"] = trainee.teacher is not None
    params["job.dropped_blocks_per_epoch"] = streams.primary.stream.dropped_per_epoch
    return params


def _announce_start(w: Worker, trainee: Trainee, streams: WorkerStreams, resumed: bool) -> None:
    stream = streams.primary.stream
    if stream.dropped_per_epoch:
        t = w.cfg.train
        shape = f"{w.world} workers × micro-batch {t.micro_batch_size}"
        if t.parallelism == "fsdp":
            shape += f" × grad_accum {t.grad_accum}"  # whole steps per epoch: any worker count can resume it
        log.info(
            f"[distill] {stream.dropped_per_epoch} of {stream.num_rows} blocks per epoch are left out so that "
            f"{shape} divide evenly"
        )
    if resumed:
        state = trainee.state
        log.info(f"[distill] resumed at step {state.step}/{w.job.total_steps} ({state.tokens_seen} tokens seen)")


def _held_out_evaluators(w: Worker, trainee: Trainee) -> list[HeldOutEval]:
    """The held-out evaluations (none without ``train.eval_every``); the teacher's numbers of
    every domain are measured once, here."""
    if not w.cfg.train.eval_every:
        return []
    from linearard_ray.models import loading as models

    evaluators = held_out_evals(w.cfg, trainee.tokenizer, w.device, w.rank, w.world)
    ref = trainee.teacher if trainee.teacher is not None else models.load_teacher(w.cfg.model, device=w.device)
    for ev in evaluators:
        ev.compute_teacher(ref)
    if trainee.teacher is None:  # cpt trains without a teacher; it was loaded only for these measurements
        del ref
        if w.device.type == "cuda":
            torch.cuda.empty_cache()
    return evaluators


def _injected_failure_step(w: Worker) -> int | None:
    """``train.fail_at_step`` on the last rank (a worker other than rank 0 when there are two),
    unless an earlier attempt already fired it."""
    fail_at = w.cfg.train.fail_at_step
    if fail_at is None or w.rank != w.world - 1:
        return None
    if read_text(fail_marker_path(w.job)) is not None:
        return None
    return fail_at


def _lock_watch(job: JobSpec):
    """The per-step check that this job still owns its run name (None for a job without a lock)."""
    if job.lock_token is None:
        return None
    from linearard_ray.training.run_lock import LockWatch

    return LockWatch(job.storage_dir, job.lock_token)


# --------------------------------------------------------------------------- the steps


def _train(
    w: Worker, trainee: Trainee, streams: WorkerStreams, evaluators: list[HeldOutEval], logger
) -> dict[str, float]:
    """Optimizer steps until ``job.total_steps``; returns the last step's metrics with the last
    held-out evaluation's."""
    t, state, total = w.cfg.train, trainee.state, w.job.total_steps
    every = lm_every(w.cfg, w.job.streams)
    fail_at = _injected_failure_step(w)
    lock = _lock_watch(w.job)
    progress = Progress(total)
    metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    while state.step < total:
        if lock is not None:
            lock.check()  # a killed driver or a job that took the run over: stop before the next step
        metrics = optimization_step(w.cfg, trainee, streams, every, w.device, w.world)
        if state.step == fail_at:
            write_text(fail_marker_path(w.job), f"fired at step {state.step}\n")
            raise RuntimeError(f"train.fail_at_step={fail_at}: injected worker failure (rank {w.rank})")
        is_last = state.step == total
        did_eval = bool(evaluators) and (state.step % t.eval_every == 0 or is_last)
        if did_eval:
            last_eval = {k: v for ev in evaluators for k, v in ev(trainee.student).items()}
            metrics.update(last_eval)
        progress.record(metrics["step_time_s"], metrics["loss"])
        if w.rank == 0:
            _log_step(w.cfg, progress, state.step, metrics, last_eval if did_eval else None, logger, is_last)
        do_checkpoint = state.step % t.checkpoint_every == 0 or is_last
        if do_checkpoint or did_eval:
            report = {"step": state.step, "tokens_seen": state.tokens_seen, **metrics, **last_eval}
            _report(w, trainee, report, do_checkpoint)
    return {**metrics, **last_eval}


def _log_step(
    cfg: Config, progress: Progress, step: int, metrics: dict, evaluated: dict | None, logger, is_last: bool
) -> None:
    """Rank 0: the step line every ``train.log_every`` steps, and every step's metrics to MLflow."""
    if step % cfg.train.log_every == 0 or is_last:
        log.info(progress.line(step, metrics))
        if evaluated is not None:
            log.info("[distill] eval " + " ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
    if logger is not None:
        logger.log_step_metrics(metrics, step)


def _report(w: Worker, trainee: Trainee, report: dict, with_checkpoint: bool) -> None:
    """The step's numbers to Ray Train (a sweep reads them), with rank 0's checkpoint when one is due."""
    import ray.train
    from ray.train import Checkpoint

    if not with_checkpoint:
        ray.train.report(report)
        return
    rng_states = gather_objects(capture_rng())  # every rank takes part
    if trainee.sharded:
        _report_sharded(w, trainee, report, rng_states)
        return
    if w.rank != 0:
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory(prefix="linearard_ckpt_") as tmp:
        write_checkpoint(tmp, trainee, rng_states)
        ray.train.report(
            report,
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=new_checkpoint_dir_name(w.job.storage_dir, trainee.state.step),
        )


def _report_sharded(w: Worker, trainee: Trainee, report: dict, rng_states: list) -> None:
    """Every rank writes its DCP share into its own directory and reports it; Ray Train uploads
    them all into the checkpoint directory rank 0 names (rank 0 adds the rest and the manifest)."""
    import ray.train
    from ray.train import Checkpoint

    name = new_checkpoint_dir_name(w.job.storage_dir, trainee.state.step) if w.rank == 0 else None
    with tempfile.TemporaryDirectory(prefix="linearard_ckpt_") as tmp:
        write_checkpoint(tmp, trainee, rng_states)
        ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


# --------------------------------------------------------------------------- the end (rank 0)


def _gather_sharded_student(trainee: Trainee) -> dict[str, torch.Tensor] | None:
    """A sharded student's trainable weights gathered whole onto rank 0 (an empty dict elsewhere);
    None when the student is not sharded."""
    if not trainee.sharded:
        return None
    from linearard_ray.training.fsdp import full_trainable_state

    return full_trainable_state(trainee.student)


def _export(
    w: Worker, trainee: Trainee, logger, final_metrics: dict[str, float], gathered: dict[str, torch.Tensor] | None
) -> dict:
    """The merged student (in ``export.dtype``, with its model card) and the adapter, written,
    registered and logged; what ``run_distill`` reports. ``gathered``: a sharded student's
    trainable weights, exported through an unsharded copy of the student built on the CPU."""
    from linearard_ray.models import card as cards
    from linearard_ray.models import loading as models

    out_dir, state = Path(w.job.output_dir), trainee.state
    student = trainee.student
    if gathered is not None:
        student = models.unsharded_student(w.cfg.model, w.cfg.rope, w.cfg.lora, gathered)
    dtype = models.export_dtype(w.cfg.export.dtype, w.cfg.model)
    card = cards.training_card(
        w.cfg,
        manifests=cards.read_manifests({name: spec.directory for name, spec in w.job.streams.items()}),
        steps=state.step,
        tokens_seen=state.tokens_seen,
        dtype=str(dtype).removeprefix("torch."),
    )
    paths = models.export_student(student, trainee.tokenizer, out_dir, w.cfg.rope, dtype=dtype, card=card)
    (out_dir / "distill_config.yaml").write_text(dump_config(w.cfg))
    size_mb = sum(f.stat().st_size for f in paths["merged"].glob("*.safetensors")) / 1e6
    log.info(f"[distill] student exported to {paths['merged']} ({size_mb:.0f} MB of {card.dtype} weights)")
    if logger is not None:
        _log_artifacts(w, logger, paths)
    return {
        "student_dir": str(paths.get("merged", out_dir)),
        "export_dir": str(out_dir),
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "mlflow_run_id": state.mlflow_run_id,
        "metrics": {k: float(v) for k, v in final_metrics.items()},
    }


def _log_artifacts(w: Worker, logger, paths: dict) -> None:
    """The student registered in the MLflow Model Registry (its source: the exported directory), its
    card rewritten with the run and version; the config, the streams' manifests, the adapter and
    the card logged into the run. The merged weights are copied into the run only when
    ``tracking.log_model_copy`` asks or the registry cannot read the exported directory; the adapter
    (beside the merged student in the exported directory) only when it asks."""
    from linearard_ray.models import card as cards
    from linearard_ray.models.loading import STUDENT_RECORD
    from linearard_ray.tracking import register_student

    logger.log_text(dump_config(w.cfg), "config.yaml")
    for name, spec in w.job.streams.items():
        mf = Path(spec.directory) / "manifest.json"
        if mf.exists():
            logger.log_artifact(mf, f"data/{name}")
    merged, t = paths["merged"], w.cfg.tracking
    if "adapter" in paths and t.log_model_copy:
        logger.log_artifact(paths["adapter"], "adapter")
    card = cards.read_student_record(merged)
    card.mlflow = {"tracking_uri": logger.uri, "experiment_id": logger.experiment_id, "run_id": logger.run_id}
    try:
        name = t.registered_model or w.cfg.train.run_name
        card.mlflow |= register_student(logger, merged, name, card.registry_tags(), copy=t.log_model_copy)
        log.info(f"[distill] registered as {name!r} version {card.mlflow['version']} ({card.mlflow['source']})")
    except Exception as e:  # the student is exported and trained: a registry problem must not fail the job
        log.warning(f"[distill] could not register the student in the MLflow Model Registry: {type(e).__name__}: {e}")
    cards.write_model_card(merged, card)
    for small in (cards.CARD_FILE, STUDENT_RECORD, "config.json"):
        logger.log_artifact(merged / small, "student")
    logger.finish("FINISHED")
