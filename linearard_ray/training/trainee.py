"""What one worker trains and with what: the frozen teacher, the student, the optimizer, the
learning-rate schedule and the counters; built fresh or from a checkpoint, and written back into
one. Nothing here calls Ray, so a resumed continuation can be checked in-process."""

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
from linearard_ray.training.distributed import ObjectiveModule, wrap_ddp
from linearard_ray.training.plan import JobSpec, own_lm_stream
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
    step_fn: torch.nn.Module  # the loss module, DDP-wrapped when there are several workers


def check_same_world(loaded: LoadedCheckpoint, world: int) -> None:
    """Each worker's share of the data depends on the number of workers: a checkpoint resumes
    only with as many as wrote it."""
    if loaded.state.world_size != world:
        raise RuntimeError(
            f"checkpoint was written by {loaded.state.world_size} workers; resuming with {world} would change "
            "the data order. Keep train.num_workers or start a new train.run_name."
        )


def build_trainee(
    cfg: Config, job: JobSpec, device: torch.device, rank: int, world: int, loaded: LoadedCheckpoint | None
) -> Trainee:
    """The worker's trainee, started fresh or continued from ``loaded`` (weights, optimizer,
    schedule, counters and this rank's RNG)."""
    from linearard_ray.objective.loss import Objective

    tokenizer, teacher, student = _load_models(cfg, device, loaded)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the student has no trainable parameters (check lora.target_modules)")
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, t.warmup_steps, job.total_steps, t.min_lr_ratio)
    state = _continue_or_start(cfg, job, optimizer, scheduler, loaded, rank, world)
    num_layers = _num_layers(student)
    objective = Objective(cfg.objective, cfg.rope, num_layers, t.op_backend, own_lm_stream=own_lm_stream(job.streams))
    loss_module = ObjectiveModule(objective, student, teacher)
    step_fn = wrap_ddp(loss_module, device) if world > 1 else loss_module
    return Trainee(tokenizer, teacher, student, params, optimizer, scheduler, state, loss_module, step_fn)


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
    if loaded is not None:
        models.load_trainable_state_dict(student, loaded.trainable)
    return tokenizer, teacher, student


def _continue_or_start(
    cfg: Config,
    job: JobSpec,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    loaded: LoadedCheckpoint | None,
    rank: int,
    world: int,
) -> TrainState:
    """The counters: the checkpoint's (with its optimizer, schedule and RNG restored), or new ones."""
    if loaded is not None:
        optimizer.load_state_dict(loaded.optimizer_state)
        scheduler.load_state_dict(loaded.scheduler_state)
        state = loaded.state
        state.total_steps = job.total_steps
        restore_rng(loaded.rng_states[rank])
        return state
    state = TrainState(
        total_steps=job.total_steps,
        world_size=world,
        mlflow_run_id=job.mlflow_run_id,
        lm_data=StreamPosition() if own_lm_stream(job.streams) else None,
    )
    torch.manual_seed(cfg.train.seed + 1000 + rank)  # dropout etc. differ per rank
    return state


def _num_layers(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.num_hidden_layers)


def write_checkpoint(directory: str | Path, trainee: Trainee, rng_states: list[dict[str, Any]]) -> Path:
    """The trainee as a checkpoint (``rng_states``: every rank's, in rank order)."""
    from linearard_ray.models.loading import trainable_state_dict

    return save_checkpoint(
        directory,
        trainable=trainable_state_dict(trainee.student),
        optimizer_state=trainee.optimizer.state_dict(),
        scheduler_state=trainee.scheduler.state_dict(),
        rng_states=rng_states,
        state=trainee.state,
    )
