"""How train.parallelism=fsdp builds its models: rank 0 reads the weights into host memory, every
worker builds the models on the meta device, shards them and receives its shards from rank 0.

The models that come out must be the ones a DDP worker loads (every parameter, the RoPE buffers
recomputed from the config, the logits on a batch), on one process and on two, where rank 1 never
reads a weight and shards models that were on the meta device."""

from __future__ import annotations

import pytest
import torch

from linearard_ray.models.unwrap import unwrap_model
from tests.training.test_resume import _cfg, _job

CPU = torch.device("cpu")
SPECS_ROWS = 12
# yarn: the student's inverse frequencies and attention scaling differ from the teacher's
OVERRIDES = {"train.parallelism": "fsdp", "lora.dropout": 0.0, "rope.type": "yarn", "objective.logits.weight": 0.5}


def _config(parallelism: str):
    return _cfg(**{**OVERRIDES, "train.parallelism": parallelism})


def _build(parallelism: str, tmp_path, rank: int = 0, world: int = 1):
    from linearard_ray.training.plan import StreamSpec
    from linearard_ray.training.trainee import build_trainee

    cfg = _config(parallelism)
    job = _job(cfg, tmp_path, {"train": StreamSpec("train", "/unused", SPECS_ROWS, 16)}, "train")
    return build_trainee(cfg, job, CPU, rank, world, None)


def _batch() -> torch.Tensor:
    return torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(7))


def _models(trainee) -> dict:
    return {"teacher": trainee.teacher, "student": unwrap_model(trainee.student, keep_adapter=True)}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_batch()).logits.detach().clone()


def _buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _local_params(model) -> dict[str, torch.Tensor]:
    """This worker's own part of every parameter: its shard, or the whole tensor when unsharded."""
    from torch.distributed.tensor import DTensor

    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _expected_shard(whole: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """FSDP2's dim-0 shard of ``whole`` on ``rank``: torch.chunk's piece, empty past the last."""
    pieces = torch.chunk(whole, world, dim=0)
    return pieces[rank] if rank < len(pieces) else whole[:0]


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def reference(tiny_model_dir, tmp_path):
    """What a DDP worker loads: the teacher and the student (with its seeded LoRA init) whole."""
    tiny_model_dir("llama")
    return _models(_build("ddp", tmp_path / "ddp"))


def _assert_matches(reference: dict, models: dict, rank: int = 0, world: int = 1) -> None:
    for role, ref in reference.items():
        params, ref_params = _local_params(models[role]), dict(ref.named_parameters())
        assert params.keys() == ref_params.keys(), role
        for n, p in params.items():
            want = ref_params[n].detach()
            if p.shape != want.shape:  # sharded: this rank's piece of it
                want = _expected_shard(want, rank, world)
            assert torch.equal(p, want), f"{role} {n}"
        buffers, ref_buffers = _buffers(models[role]), _buffers(ref)
        assert buffers.keys() == ref_buffers.keys() and buffers, role
        for n, b in buffers.items():
            assert b.dtype == ref_buffers[n].dtype and torch.equal(b, ref_buffers[n]), f"{role} {n}"
        torch.testing.assert_close(_logits(models[role]), _logits(ref), rtol=1e-6, atol=1e-6)


def test_recompute_buffers_refills_rope_tables_after_to_empty(tiny_model_dir):
    from linearard_ray.models.loading import load_student, recompute_buffers

    tiny_model_dir("llama")
    cfg = _config("fsdp")
    whole = load_student(cfg.model, cfg.rope, cfg.lora, device="cpu")
    built = load_student(cfg.model, cfg.rope, cfg.lora, device="meta")
    assert {p.device.type for p in built.parameters()} == {"meta"}
    assert list(built.state_dict()) == list(whole.state_dict())
    built.to_empty(device="cpu")
    for b in built.buffers():
        b.fill_(float("nan"))  # what to_empty leaves may be anything
    recompute_buffers(built)
    want = _buffers(whole)
    assert want and all(torch.equal(b, want[n]) for n, b in _buffers(built).items())
    teacher_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))  # the tiny config's head_dim 16
    assert not torch.allclose(want["base_model.model.model.rotary_emb.inv_freq"], teacher_freq)  # scaled


def test_sharded_models_built_on_meta_equal_the_loaded_ones(reference, tmp_path, gloo_world_of_one, monkeypatch):
    from torch.distributed.tensor import DTensor

    from linearard_ray.training import fsdp

    entry_devices = {}
    original = fsdp.shard_from_rank0

    def spy(model, full_state, role, *args):
        entry_devices[role] = {p.device.type for p in model.parameters()}
        return original(model, full_state, role, *args)

    monkeypatch.setattr(fsdp, "shard_from_rank0", spy)
    trainee = _build("fsdp", tmp_path / "fsdp")
    assert entry_devices == {"teacher": {"meta"}, "student": {"meta"}}
    models = _models(trainee)
    assert any(isinstance(p, DTensor) for p in models["teacher"].parameters())
    _assert_matches(reference, models)


# --------------------------------------------------------------------------- two workers


def _worker(rank: int, world: int, tmp_path, cache: str) -> None:
    """One spawned worker: builds the sharded trainee and saves what it holds of each model."""
    import os

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from linearard_ray.training import fsdp

    os.environ["LINEARARD_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=rank, world_size=world)
    record: dict = {"reads": 0, "entry_devices": {}}
    read_weights = AutoModelForCausalLM.from_pretrained.__func__
    original = fsdp.shard_from_rank0

    def counting_read(cls, *args, **kwargs):
        record["reads"] += 1
        return read_weights(cls, *args, **kwargs)

    def spy(model, full_state, role, *args):
        record["entry_devices"][role] = {p.device.type for p in model.parameters()}
        return original(model, full_state, role, *args)

    AutoModelForCausalLM.from_pretrained = classmethod(counting_read)
    fsdp.shard_from_rank0 = spy
    try:
        models = _models(_build("fsdp", tmp_path / f"rank{rank}", rank, world))
        out = {
            role: {"params": _local_params(m), "buffers": _buffers(m), "logits": _logits(m)}
            for role, m in models.items()
        }
        torch.save({**record, "models": out}, tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_get_rank_zeros_weights_and_rank_one_never_reads_them(reference, tmp_path, cache_dir):
    import torch.multiprocessing as mp

    world = 2
    mp.start_processes(_worker, args=(world, tmp_path, str(cache_dir)), nprocs=world, start_method="spawn")
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["entry_devices"] == {"teacher": {"meta"}, "student": {"meta"}}, rank
        # rank 0 reads the teacher's and the student's weights once each; rank 1 never
        assert got["reads"] == (2 if rank == 0 else 0), rank
        for role, ref in reference.items():
            mine = got["models"][role]
            ref_params = dict(ref.named_parameters())
            assert mine["params"].keys() == ref_params.keys()
            sharded = [n for n, p in mine["params"].items() if p.shape != ref_params[n].shape]
            assert sharded, f"{role}: nothing was sharded"
            for n, p in mine["params"].items():
                want = ref_params[n].detach()
                want = want if p.shape == want.shape else _expected_shard(want, rank, world)
                assert torch.equal(p, want), f"rank {rank} {role} {n}"
            for n, b in _buffers(ref).items():
                assert torch.equal(mine["buffers"][n], b), f"rank {rank} {role} {n}"
            torch.testing.assert_close(mine["logits"], _logits(ref), rtol=1e-5, atol=1e-6)
