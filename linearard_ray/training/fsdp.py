"""FSDP2 sharding of the teacher and the student (``train.parallelism: fsdp``), and the few things
a sharded student needs elsewhere: gradient sync across micro-batches, clipping sharded
gradients, and its trainable state gathered whole.

What is sharded: every decoder layer is its own ``fully_shard`` group, and the decoder (the
embeddings and the final norm) is the root group. The decoder, not the causal-LM wrapper around
it, is the root because the objective runs the decoder's forward directly and reads the LM head's
weight outside any forward (the chunked logit terms): FSDP2 gathers a group's parameters in its
module's forward, so a head sharded under a root whose forward never runs would stay in shards.
The LM head therefore stays whole on every worker (as do embeddings tied to it). Frozen weights
are sharded like trainable ones but get no gradients; only the trainable (LoRA) parameters reach
the optimizer, as sharded DTensors.

The Q/K/V capture (models/capture.py) records inside the attention call, after FSDP has gathered
the layer's parameters, so it sees the full per-worker activations, as under DDP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from linearard_ray.models.unwrap import decoder_and_head, unwrap_model


def _mesh(device: torch.device):
    """A one-dimensional mesh over all workers of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train.parallelism=fsdp needs torch.distributed initialised (Ray Train does this)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def _policies(mixed_precision: bool, reduce: bool):
    """bf16 parameters for compute, gradients reduced in fp32 (only when the model trains)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not mixed_precision:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32 if reduce else None)


def _shard_model(model, mesh, *, reshard_after_forward: bool, mp_policy, offload_policy) -> None:
    """``fully_shard`` on every decoder layer, then on the decoder as the root group."""
    from torch.distributed.fsdp import fully_shard

    decoder, head = decoder_and_head(unwrap_model(model))
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(decoder).__name__} has no .layers to shard; fsdp supports Llama-family decoders")
    kw: dict[str, Any] = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # Embeddings tied to the head stay whole: the head is read outside any forward.
    tied = {p for p in decoder.parameters(recurse=False)} | set(decoder.get_input_embeddings().parameters())
    ignored = {p for p in tied if any(p is h for h in head.parameters())}
    fully_shard(decoder, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None, **kw)


def _sharding(role: str, fsdp_cfg, device: torch.device, mixed_precision: bool) -> dict[str, Any]:
    """``_shard_model``'s settings for the ``"student"`` or the ``"teacher"``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if role == "student":
        return dict(
            reshard_after_forward=bool(fsdp_cfg.reshard_after_forward),
            mp_policy=_policies(mixed_precision, reduce=True),
            offload_policy=OffloadPolicy(),
        )
    offload = fsdp_cfg.offload_teacher and device.type == "cuda"
    return dict(
        reshard_after_forward=True,  # no backward: nothing to keep gathered for
        mp_policy=_policies(mixed_precision, reduce=False),
        offload_policy=CPUOffloadPolicy(pin_memory=True) if offload else OffloadPolicy(),
    )


def shard_models(teacher, student, fsdp_cfg, device: torch.device, mixed_precision: bool):
    """Shard ``teacher`` (may be None) and ``student``, whole on every worker, in place over all
    workers; returns them. (Training builds its models with ``shard_from_rank0`` instead, so that
    no worker holds a whole model.)

    ``fsdp_cfg``: ``train.fsdp`` (``offload_teacher``, ``reshard_after_forward``).
    ``mixed_precision``: bf16 parameters with fp32 gradient reduction (training in bf16 on a GPU);
    otherwise everything stays in the models' own dtype (fp32 on CPU). The teacher's shards are
    kept in host memory with ``offload_teacher`` on a GPU (CPUOffloadPolicy; a no-op on CPU).
    """
    mesh = _mesh(device)
    _shard_model(student, mesh, **_sharding("student", fsdp_cfg, device, mixed_precision))
    if teacher is not None:
        _shard_model(teacher, mesh, **_sharding("teacher", fsdp_cfg, device, mixed_precision))
    return teacher, student


def shard_from_rank0(model, full_state: dict[str, torch.Tensor], role: str, fsdp_cfg, device, mixed_precision):
    """Shard ``model``, built on the meta device on every worker, and fill every worker's shards
    from rank 0's ``full_state`` (the whole model's state dict, in host memory; an empty dict on
    the other ranks); returns the model. ``role``: ``"student"`` or ``"teacher"``, sharded as
    ``shard_models`` shards them. Every worker must call it.

    No worker ever holds the whole model on its device: each allocates only its shards (and the
    LM head, which stays whole) and receives them one tensor at a time from rank 0's broadcast.
    The buffers kept out of the state dict (RoPE's inverse frequencies) are recomputed from the
    config on every worker."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy

    from linearard_ray.models.loading import recompute_buffers

    settings = _sharding(role, fsdp_cfg, device, mixed_precision)
    _shard_model(model, _mesh(device), **settings)
    # an offloaded model's shards live in host memory; the state-dict loader wants every tensor
    # on one device, so all of it starts there and the unsharded rest moves to the GPU after
    offloaded = isinstance(settings["offload_policy"], CPUOffloadPolicy)
    model.to_empty(device="cpu" if offloaded else device)
    recompute_buffers(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(unwrap_model(model, keep_adapter=True), full_state, options=options)
    if offloaded:
        _move_unsharded(model, device)
    return model


def _move_unsharded(model, device: torch.device) -> None:
    """The parameters FSDP does not shard (the LM head, tied embeddings) and the buffers, moved
    to ``device``; the sharded (DTensor) parameters stay where their offload policy keeps them."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if not isinstance(p, DTensor) and p.device != device:
                    p.data = p.data.to(device)
            for name, b in module._buffers.items():
                if b is not None and b.device != device:
                    module._buffers[name] = b.to(device)


def fsdp_root(model):
    """The model's root FSDP module (its decoder), or None when it is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    decoder, _ = decoder_and_head(unwrap_model(model))
    return decoder if isinstance(decoder, FSDPModule) else None


def set_gradient_sync(student, enabled: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch of a step) or accumulate
    them unsharded until then, as DDP's ``no_sync`` does."""
    root = fsdp_root(student)
    if root is not None:
        root.set_requires_gradient_sync(enabled)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over plain or sharded (DTensor) gradients; the total norm over all
    workers as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_trainable_state(student) -> dict[str, torch.Tensor]:
    """The trainable tensors of a sharded student gathered whole on CPU, keyed like
    ``models.loading.trainable_state_dict`` (rank 0 gets them; other ranks get an empty dict).
    Every worker must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = unwrap_model(student, keep_adapter=True)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=opts)
    if dist.get_rank() != 0:
        return {}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


# --------------------------------------------------------------------------- sharded checkpoints


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the trainable weights only; setting them must then not ask for the frozen ones (DCP's load
    # has already checked that the checkpoint holds every trainable one)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded(directory: str | Path, student, optimizer) -> dict[str, dict[str, Any]]:
    """This rank's share of the trainable weights and optimizer state, written with DCP into
    ``directory`` (every rank its own); returns the size and sha256 of the files it wrote.
    Every worker must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from linearard_ray.training.checkpointing import file_digests

    d = Path(directory)
    before = {f.name for f in d.iterdir()} if d.exists() else set()
    model = unwrap_model(student, keep_adapter=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(d))
    return file_digests(d, sorted(f.name for f in d.iterdir() if f.name not in before))


def load_sharded(directory: str | Path, student, optimizer) -> None:
    """The trainable weights and optimizer state of a DCP checkpoint, loaded into this worker's
    shards (written by any number of workers: DCP re-shards). Every worker must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = unwrap_model(student, keep_adapter=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_state_options(strict=False),
    )
