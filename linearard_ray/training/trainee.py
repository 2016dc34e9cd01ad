"""What one worker trains and with what: the frozen teacher, the student, the optimizer, the
learning-rate schedule and the counters; built fresh or from a checkpoint, and written back into
one. Nothing here calls Ray, so a resumed continuation can be checked in-process.

A checkpoint resumes on another number of workers when the global batch (workers × micro-batch ×
grad_accum) stays the same: every optimizer step then reads the same blocks (data/streams.py), and
the data positions are re-counted for the new workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linearard_ray.config import Config
from linearard_ray.training.checkpointing import (
    LoadedCheckpoint,
    StreamPosition,
    TrainState,
    restore_rng,
    save_checkpoint,
)
from linearard_ray.training.distributed import ObjectiveModule, compute_precision, wrap_ddp
from linearard_ray.training.plan import JobSpec, epoch_unit, own_lm_stream
from linearard_ray.training.schedule import build_scheduler


@dataclass
class Trainee:
    """One worker's models, optimizer, schedule and counters."""

    tokenizer: Any
    teacher: Any | None  # None when the objective needs no teacher (cpt)
    student: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    loss_module: ObjectiveModule
    step_fn: torch.nn.Module  # the loss module, DDP-wrapped when there are several DDP workers
    sharded: bool = False  # teacher and student sharded with FSDP2 (train.parallelism: fsdp)


def build_trainee(
    cfg: Config, job: JobSpec, device: torch.device, rank: int, world: int, loaded: LoadedCheckpoint | None
) -> Trainee:
    """The worker's trainee, started fresh or continued from ``loaded`` (weights, optimizer,
    schedule, counters and this rank's RNG)."""
    from linearard_ray.objective.loss import Objective

    t = cfg.train
    sharded = t.parallelism == "fsdp"
    if sharded:
        bf16 = device.type == "cuda" and compute_precision(cfg, device) == "bf16"
        tokenizer, teacher, student = _load_sharded_models(cfg, device, rank, loaded, mixed_precision=bf16)
    else:
        tokenizer, teacher, student = _load_models(cfg, device, loaded)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the student has no trainable parameters (check lora.target_modules)")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, t.warmup_steps, job.total_steps, t.min_lr_ratio)
    state = _continue_or_start(cfg, job, student, optimizer, scheduler, loaded, rank, world)
    num_layers = _num_layers(student)
    objective = Objective(
        cfg.objective, cfg.rope, num_layers, t.op_backend, own_lm_stream=own_lm_stream(job.streams), sharded=sharded
    )
    loss_module = ObjectiveModule(objective, student, teacher)
    # FSDP reduces the gradients itself; DDP's wrapper does it for the whole-model workers
    step_fn = wrap_ddp(loss_module, device) if world > 1 and not sharded else loss_module
    return Trainee(tokenizer, teacher, student, params, optimizer, scheduler, state, loss_module, step_fn, sharded)


def _load_models(cfg: Config, device: torch.device, loaded: LoadedCheckpoint | None):
    """(tokenizer, teacher or None, student with the checkpoint's trainable weights if any)."""
    from linearard_ray.models import loading as models

    # identical init on every rank; DDP also broadcasts rank 0's weights
    torch.manual_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    teacher = models.load_teacher(cfg.model, device=device) if cfg.objective.needs_teacher else None
    student = models.load_student(
        cfg.model, cfg.rope, cfg.lora, device=device, gradient_checkpointing=cfg.train.gradient_checkpointing
    )
    if loaded is not None and loaded.trainable is not None:  # a sharded checkpoint loads after sharding
        models.load_trainable_state_dict(student, loaded.trainable)
    return tokenizer, teacher, student


def _load_sharded_models(
    cfg: Config, device: torch.device, rank: int, loaded: LoadedCheckpoint | None, mixed_precision: bool
):
    """(tokenizer, teacher or None, student), sharded over the workers with FSDP2 without any
    worker holding a whole model on its device: rank 0 reads each model's weights into host
    memory, as a DDP worker loads them (same seed, same order: the LoRA adapters start as under
    DDP), every worker builds the model on the meta device, and rank 0's weights are broadcast
    into the shards. One model after the other, so rank 0 holds one whole model in host memory
    at a time and the other ranks none."""
    from linearard_ray.models import loading as models
    from linearard_ray.models.unwrap import unwrap_model
    from linearard_ray.training.fsdp import shard_from_rank0

    t = cfg.train
    dtype = models.resolve_dtype(cfg.model.dtype, device)  # the dtype DDP would load on this device

    def teacher_on(where):
        return models.load_teacher(cfg.model, device=where, dtype=dtype)

    def student_on(where):
        student = models.load_student(
            cfg.model, cfg.rope, cfg.lora, device=where, dtype=dtype, gradient_checkpointing=t.gradient_checkpointing
        )
        if where != "meta" and loaded is not None and loaded.trainable is not None:
            models.load_trainable_state_dict(student, loaded.trainable)
        return student

    def shard(role: str, build):
        full_state = unwrap_model(build("cpu"), keep_adapter=True).state_dict() if rank == 0 else {}
        return shard_from_rank0(build("meta"), full_state, role, t.fsdp, device, mixed_precision)

    torch.manual_seed(t.seed)  # as _load_models seeds it: the same adapters as a DDP run
    tokenizer = models.load_tokenizer(cfg.model)
    teacher = shard("teacher", teacher_on) if cfg.objective.needs_teacher else None
    student = shard("student", student_on)
    return tokenizer, teacher, student


def _continue_or_start(
    cfg: Config,
    job: JobSpec,
    student,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    loaded: LoadedCheckpoint | None,
    rank: int,
    world: int,
) -> TrainState:
    """The counters: the checkpoint's (with its weights if sharded, optimizer, schedule and RNG
    restored), or new ones."""
    t = cfg.train
    if loaded is not None:
        if loaded.dcp_dir is not None:
            from linearard_ray.training.fsdp import load_sharded

            load_sharded(loaded.dcp_dir, student, optimizer)
            loaded.release()
        else:
            optimizer.load_state_dict(loaded.optimizer_state)
        scheduler.load_state_dict(loaded.scheduler_state)
        state = resumed_state(loaded.state, job, world, t.micro_batch_size, t.grad_accum)
        if rank < len(loaded.rng_states):
            restore_rng(loaded.rng_states[rank])
        else:  # a worker the checkpoint's run did not have
            torch.manual_seed(t.seed + 1000 + rank)
        return state
    state = TrainState(
        total_steps=job.total_steps,
        world_size=world,
        mlflow_run_id=job.mlflow_run_id,
        lm_data=StreamPosition() if own_lm_stream(job.streams) else None,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        epoch_unit=epoch_unit(cfg, world),
    )
    torch.manual_seed(t.seed + 1000 + rank)  # dropout etc. differ per rank
    return state


def resumed_state(state: TrainState, job: JobSpec, world: int, micro_batch_size: int, grad_accum: int) -> TrainState:
    """A checkpoint's counters continued by ``world`` workers (``check_same_world`` passed): the
    streams' positions re-counted for them when their number changed; the epochs keep the length
    the run started with. Raises ``RuntimeError`` when the new workers cannot continue exactly."""
    from linearard_ray.data.streams import remap_position

    state.total_steps = job.total_steps
    if state.epoch_unit is None:  # written before it was recorded: the epochs of its own workers
        state.epoch_unit = state.world_size * (state.micro_batch_size or micro_batch_size)
    if state.world_size != world:
        try:
            for attr, name in (("data", "train"), ("lm_data", "lm")):
                pos, spec = getattr(state, attr), job.streams.get(name)
                if pos is None or spec is None:
                    continue
                rows = stream_epoch_rows(spec.num_rows, state)
                setattr(state, attr, remap_position(pos, rows, state.world_size, world, micro_batch_size, name))
        except ValueError as e:
            raise RuntimeError(
                f"checkpoint at step {state.step} cannot resume on {world} workers: {e}. "
                f"Keep train.num_workers={state.world_size} or start a new train.run_name."
            ) from None
    state.world_size = world
    state.micro_batch_size, state.grad_accum = micro_batch_size, grad_accum
    return state


def stream_epoch_rows(num_rows: int, state: TrainState) -> int:
    """The rows each epoch of a stream of ``num_rows`` blocks uses in this run."""
    from linearard_ray.data.streams import default_epoch_rows

    return default_epoch_rows(num_rows, state.epoch_unit)


def _num_layers(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.num_hidden_layers)


def write_checkpoint(directory: str | Path, trainee: Trainee, rng_states: list[dict[str, Any]]) -> Path:
    """The trainee as a checkpoint (``rng_states``: every rank's, in rank order). Sharded, every
    worker calls it with its own directory: each writes its DCP share, rank 0 the rest."""
    from linearard_ray.models.loading import trainable_state_dict

    if trainee.sharded:
        return _write_sharded_checkpoint(Path(directory), trainee, rng_states)
    return save_checkpoint(
        directory,
        trainable=trainable_state_dict(trainee.student),
        optimizer_state=trainee.optimizer.state_dict(),
        scheduler_state=trainee.scheduler.state_dict(),
        rng_states=rng_states,
        state=trainee.state,
    )


def _write_sharded_checkpoint(directory: Path, trainee: Trainee, rng_states: list[dict[str, Any]]) -> Path:
    import torch.distributed as dist

    from linearard_ray.training.distributed import gather_objects
    from linearard_ray.training.fsdp import save_sharded

    directory.mkdir(parents=True, exist_ok=True)
    every_rank = gather_objects(save_sharded(directory, trainee.student, trainee.optimizer))
    if dist.get_rank() != 0:
        return directory
    files: dict[str, dict[str, Any]] = {}
    for mine in every_rank:
        clash = set(files) & set(mine)
        if clash:
            raise RuntimeError(f"two workers wrote checkpoint files of the same name: {sorted(clash)}")
        files.update(mine)
    return save_checkpoint(
        directory,
        trainable=None,
        optimizer_state=None,
        scheduler_state=trainee.scheduler.state_dict(),
        rng_states=rng_states,
        state=trainee.state,
        sharded_files=files,
    )
