"""Where and how a worker computes: its device, the autocast precision, the sums and gathers
across workers, and the DDP wrapper around the objective (FSDP sharding: training/fsdp.py)."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch

from linearard_ray.config import Config


def device_for_worker(use_gpu: bool) -> torch.device:
    """The Ray Train worker's device; on CPU, also its share of this node's cores."""
    if use_gpu:
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        return dev
    # Ray sets OMP_NUM_THREADS to the worker's logical CPUs (often 1); on CPU, use this node's cores
    # shared among the workers placed on it.
    import ray.train

    local = max(1, ray.train.get_context().get_local_world_size())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


def compute_precision(cfg: Config, device: torch.device) -> str:
    """``train.precision`` resolved: ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    return prec


def autocast(cfg: Config, device: torch.device):
    """The forward passes' precision context: ``train.precision``, where ``auto`` is bf16 on CUDA."""
    if compute_precision(cfg, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the workers (the values themselves with one worker)."""
    import torch.distributed as dist

    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every worker's ``obj``, in rank order."""
    import torch.distributed as dist

    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ObjectiveModule(torch.nn.Module):
    """The objective as a module whose only submodule is the student.

    The objective runs the student's decoder directly (not its top-level forward), so DDP cannot
    wrap the student itself: its reducer is armed in the wrapper's forward. Wrapping this module
    instead makes one DDP forward = one objective evaluation. The teacher and the objective are
    kept out of the module tree so DDP neither broadcasts nor tracks the frozen teacher.
    """

    def __init__(self, objective, student, teacher):
        super().__init__()
        self.student = student
        self._frozen = {"objective": objective, "teacher": teacher}
        self.last_metrics: dict[str, float] = {}

    def forward(self, batch: dict, lm_batch: dict | None = None) -> torch.Tensor:
        out = self._frozen["objective"](self._frozen["teacher"], self.student, batch, lm_batch)
        self.last_metrics = out.metrics
        return out.loss


def wrap_ddp(module: ObjectiveModule, device: torch.device):
    """DDP over the student's trainable parameters only.

    Frozen weights and buffers are excluded from DDP's start-up broadcast (every rank loads the
    same checkpoint; a 7B base would otherwise be sent over the wire for nothing).
    find_unused_parameters: with a layer selection that stops early, or a relation weight of 0,
    some adapters get no gradient in a step.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    kw: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    # Buffers (RoPE tables) are identical on every rank: no per-forward sync. Newer torch renames
    # the switch; the ignore list above already keeps them out of the start-up sync.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    return DDP(module, find_unused_parameters=True, **kw)
