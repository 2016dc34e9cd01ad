"""One optimizer step of a worker: micro-batches from its block streams, gradient accumulation,
clipping, the optimizer and schedule step, and the step's metrics averaged over the workers.
Nothing here calls Ray: the streams' batches come from whatever ``open_epoch`` callables the
worker passes in."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from linearard_ray.config import Config
from linearard_ray.data.streams import DEFAULT_SHUFFLE_TOKENS, BlockStream, Prefetcher
from linearard_ray.training.checkpointing import StreamPosition, TrainState
from linearard_ray.training.distributed import all_reduce_sum, autocast, to_device
from linearard_ray.training.fsdp import clip_grad_norm, set_gradient_sync
from linearard_ray.training.plan import JobSpec, StreamSpec, own_lm_stream
from linearard_ray.training.trainee import Trainee, stream_epoch_rows

# A stream's batches for one epoch, opened again at every epoch: ``name -> open_epoch``.
EpochOpener = Callable[[str], Callable[[], Iterable[dict[str, Any]]]]
# The next-token term's own stream is shuffled with another seed than the KL terms' one.
LM_SEED_OFFSET = 7919


def open_block_stream(
    name: str,
    spec: StreamSpec,
    cfg: Config,
    rank: int,
    world: int,
    start: StreamPosition | None,
    open_epoch: Callable[[], Iterable[dict[str, Any]]],
    epoch_rows: int | None = None,
) -> BlockStream:
    """This worker's share of one stream, from ``start`` on; each epoch uses ``epoch_rows`` of its
    blocks (default: as many as ``world`` workers' micro-batches share evenly)."""
    return BlockStream(
        open_epoch,
        num_rows=spec.num_rows,
        rank=rank,
        world_size=world,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed + (0 if name == "train" else LM_SEED_OFFSET),
        shuffle=cfg.data.shuffle,
        shuffle_buffer=max(1, DEFAULT_SHUFFLE_TOKENS // spec.ctx_len),
        max_epochs=cfg.train.epochs_max,
        start=start,
        name=name,
        epoch_rows=epoch_rows,
    )


@dataclass
class WorkerStreams:
    """The streams a worker reads: the primary one (every step) and the next-token term's own."""

    primary_name: str  # "train", or "lm" when the next-token stream is the only one
    primary: Prefetcher
    lm: Prefetcher | None = None

    def record_positions(self, state: TrainState) -> None:
        """Where the streams stand, into the counters a checkpoint saves."""
        if self.primary_name == "train":
            state.data = self.primary.position
        if self.primary_name == "lm":
            state.lm_data = self.primary.position
        elif self.lm is not None:
            state.lm_data = self.lm.position

    def close(self) -> None:
        self.primary.close()
        if self.lm is not None:
            self.lm.close()


def open_streams(
    cfg: Config, job: JobSpec, state: TrainState, rank: int, world: int, opener: EpochOpener, pin_memory: bool
) -> WorkerStreams:
    """The job's streams for this worker, each from the position ``state`` recorded, with the
    epoch length the run started with."""

    def epoch_rows(name: str) -> int | None:
        return stream_epoch_rows(job.streams[name].num_rows, state) if state.epoch_unit is not None else None

    name = job.primary
    start = state.data if name == "train" else (state.lm_data or state.data)
    stream = open_block_stream(name, job.streams[name], cfg, rank, world, start, opener(name), epoch_rows(name))
    streams = WorkerStreams(name, Prefetcher(stream, pin_memory=pin_memory))
    if own_lm_stream(job.streams):
        lm_start = state.lm_data
        lm = open_block_stream("lm", job.streams["lm"], cfg, rank, world, lm_start, opener("lm"), epoch_rows("lm"))
        streams.lm = Prefetcher(lm, pin_memory=pin_memory)
    return streams


def optimization_step(
    cfg: Config, trainee: Trainee, streams: WorkerStreams, lm_every: int, device: torch.device, world: int
) -> dict[str, float]:
    """One optimizer step; returns its metrics (the same on every worker)."""
    state = trainee.state
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainee.optimizer.zero_grad(set_to_none=True)
    # drawn on a schedule of the step number, so a resumed run draws where the first would have
    draw_lm = streams.lm is not None and state.step % lm_every == 0
    sums, tokens_local = accumulate_gradients(cfg, trainee, streams, draw_lm, device, world)
    grad_norm_t = clip_grad_norm(trainee.params, cfg.train.max_grad_norm)  # read after the sync
    lr = trainee.scheduler.get_last_lr()[0]
    trainee.optimizer.step()
    trainee.scheduler.step()
    state.step += 1

    keys = sorted(sums)
    reduced = all_reduce_sum([sums[k] for k in keys] + [float(tokens_local)], device)
    metrics = {k: v / world for k, v in zip(keys, reduced[:-1], strict=False)}
    grad_norm = float(grad_norm_t)
    step_tokens = int(reduced[-1])
    state.tokens_seen += step_tokens
    streams.record_positions(state)
    dt = time.perf_counter() - t0
    metrics.update(
        lr=lr,
        grad_norm=grad_norm,
        tokens_per_s=step_tokens / dt,
        step_time_s=dt,
        tokens_seen=float(state.tokens_seen),
        epoch=float(streams.primary.position.epoch),
    )
    if device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics


def accumulate_gradients(
    cfg: Config, trainee: Trainee, streams: WorkerStreams, draw_lm: bool, device: torch.device, world: int
) -> tuple[dict[str, float], int]:
    """Forward and backward over ``train.grad_accum`` micro-batches; (the objective's metrics
    averaged over them, the tokens this worker read)."""
    accum = cfg.train.grad_accum
    sums: dict[str, float] = {}
    tokens_local = 0
    for micro in range(accum):
        host = next(streams.primary)
        host_lm = next(streams.lm) if draw_lm else None
        # counted on the host copies: a count of device tensors would stall on the GPU
        tokens_local += int(host["attention_mask"].sum()) + (int(host_lm["attention_mask"].sum()) if host_lm else 0)
        batch = to_device(host, device)
        lm_batch = to_device(host_lm, device) if host_lm is not None else None
        # Gradients are all-reduced (reduce-scattered when sharded) once per optimizer step, on the
        # last micro-batch.
        with _gradient_sync(trainee, world, last=micro == accum - 1):
            with autocast(cfg, device):
                loss = trainee.step_fn(batch, lm_batch)
            (loss / accum).backward()
        for k, v in trainee.loss_module.last_metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
    return sums, tokens_local


def _gradient_sync(trainee: Trainee, world: int, last: bool):
    """The context a micro-batch's forward and backward run in: without the gradient sync across
    workers unless it is the step's last one."""
    if trainee.sharded:
        set_gradient_sync(trainee.student, last)
        return contextlib.nullcontext()
    return trainee.step_fn.no_sync() if world > 1 and not last else contextlib.nullcontext()
