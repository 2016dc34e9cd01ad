"""The fsdp mode's parts in-process: the data order that lets a checkpoint resume on another
worker count, the resume rule's errors, and a sharded trainee on a one-worker gloo group (its
steps match the unsharded trainee's, its DCP checkpoint resumes bitwise, its manifest covers the
DCP files, and its gathered trainable weights are the whole student's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linearard_ray.data.streams import BlockStream, StreamPosition, default_epoch_rows, remap_position
from linearard_ray.training.checkpointing import (
    DCP_METADATA,
    MANIFEST_FILE,
    CheckpointError,
    TrainState,
    capture_rng,
    check_same_world,
    load_checkpoint,
    verify_checkpoint,
)
from linearard_ray.training.plan import StreamSpec
from linearard_ray.training.trainee import resumed_state
from tests.training.test_resume import _cfg, _job, _opener

CPU = torch.device("cpu")


def _rows(n: int):
    ids = np.arange(n, dtype=np.int32)[:, None].repeat(3, axis=1)
    mask = np.ones((n, 3), dtype=np.int8)
    return lambda: iter([{"input_ids": ids[s : s + 4], "attention_mask": mask[s : s + 4]} for s in range(0, n, 4)])


def _step_blocks(world: int, accum: int, steps: int, n: int, epoch_rows: int, starts=None) -> list[set[int]]:
    """The blocks each optimizer step of ``world`` workers reads (micro-batch 1)."""
    streams = [
        BlockStream(
            _rows(n),
            num_rows=n,
            rank=r,
            world_size=world,
            micro_batch_size=1,
            seed=5,
            shuffle_buffer=6,
            max_epochs=10,
            start=starts[r] if starts else None,
            epoch_rows=epoch_rows,
        )
        for r in range(world)
    ]
    out = [{int(next(s)["input_ids"][0, 0]) for s in streams for _ in range(accum)} for _ in range(steps)]
    return out, streams


def test_two_workers_and_one_with_double_accum_read_the_same_blocks_and_resume_across():
    n = 23  # odd: the epochs use 22 blocks, whole steps of 2
    rows = default_epoch_rows(n, 2)
    two, _ = _step_blocks(2, 1, 30, n, rows)
    one, _ = _step_blocks(1, 2, 30, n, rows)
    assert two == one and all(len(s) == 2 for s in two)
    assert len(set().union(*two[:11])) == 22  # an epoch has 11 steps without a repeat
    for cut in (4, 11, 15):  # inside an epoch, at its end, inside the next
        _, streams = _step_blocks(2, 1, cut, n, rows)
        pos = remap_position(streams[0].position, rows, 2, 1, 1, "train")
        tail, _ = _step_blocks(1, 2, 30 - cut, n, rows, starts=[pos])
        assert tail == two[cut:], cut
        _, streams = _step_blocks(1, 2, cut, n, rows)
        pos = remap_position(streams[0].position, rows, 1, 2, 1, "train")
        tail, _ = _step_blocks(2, 1, 30 - cut, n, rows, starts=[pos, pos])
        assert tail == two[cut:], cut


def test_the_default_epoch_length_is_unchanged_and_odd_epochs_do_not_split():
    n = 23
    plain = BlockStream(_rows(n), num_rows=n, rank=1, world_size=2, micro_batch_size=2, seed=0)
    explicit = BlockStream(
        _rows(n), num_rows=n, rank=1, world_size=2, micro_batch_size=2, seed=0, epoch_rows=default_epoch_rows(n, 4)
    )
    assert plain.rows_per_epoch == explicit.rows_per_epoch == 10 and plain.dropped_per_epoch == 3
    for _ in range(8):
        assert torch.equal(next(plain)["input_ids"], next(explicit)["input_ids"])
    # one worker's epochs of 23 blocks cannot be shared by 2
    with pytest.raises(ValueError, match="use 23 blocks, which 2 workers × micro-batch 1 cannot share"):
        remap_position(StreamPosition(0, 4), 23, 1, 2, 1, "train")
    with pytest.raises(ValueError, match="stands 3 blocks into epoch 0"):
        remap_position(StreamPosition(0, 3), 22, 1, 2, 1, "train")


def _state(world: int, mb: int | None, accum: int | None) -> TrainState:
    return TrainState(step=4, world_size=world, micro_batch_size=mb, grad_accum=accum)


def test_resume_on_another_worker_count_needs_the_same_global_batch():
    check_same_world(_state(2, 1, 1), 1, 1, 2)
    check_same_world(_state(1, 2, 2), 4, 1, 1)
    with pytest.raises(RuntimeError, match=r"from 2 to 1 blocks per step.*Set train.grad_accum=2 to keep it"):
        check_same_world(_state(2, 1, 1), 1, 1, 1)
    with pytest.raises(RuntimeError, match="No train.grad_accum keeps it with train.micro_batch_size=2"):
        check_same_world(_state(3, 1, 1), 1, 2, 1)
    with pytest.raises(RuntimeError, match="written by 2 workers; resuming with 1 would change the data order"):
        check_same_world(_state(2, None, None), 1, 1, 2)  # written before the batch shape was recorded


def test_resumed_state_recounts_the_positions_for_the_new_workers(tmp_path):
    cfg = _cfg()
    specs = {"train": StreamSpec("train", "/unused", 23, 16), "lm": StreamSpec("lm", "/unused", 41, 24)}
    job = _job(cfg, tmp_path, specs, "train")
    state = TrainState(
        step=7, world_size=2, data=StreamPosition(1, 3), lm_data=StreamPosition(0, 14), micro_batch_size=1
    )
    state.grad_accum, state.epoch_unit = 1, 2
    out = resumed_state(state, job, 1, 1, 2)
    assert out.data == StreamPosition(1, 6) and out.lm_data == StreamPosition(0, 28)
    assert (out.world_size, out.micro_batch_size, out.grad_accum, out.epoch_unit) == (1, 1, 2, 2)
    ddp = TrainState(step=3, world_size=1, data=StreamPosition(0, 6), micro_batch_size=1, grad_accum=2, epoch_unit=1)
    with pytest.raises(RuntimeError, match="cannot resume on 2 workers: train stream: the run's epochs use 23"):
        resumed_state(ddp, job, 2, 1, 1)


# --------------------------------------------------------------------------- a sharded trainee, one worker


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


SPECS = {"train": StreamSpec("train", "/unused", 12, 16)}  # whole steps per epoch: both modes cut it alike


def _trainee(parallelism: str, tmp_path, loaded=None):
    from linearard_ray.training.step import open_streams
    from linearard_ray.training.trainee import build_trainee

    cfg = _cfg(**{"train.parallelism": parallelism, "lora.dropout": 0.0, "objective.logits.weight": 0.5})
    job = _job(cfg, tmp_path, SPECS, "train")
    trainee = build_trainee(cfg, job, CPU, 0, 1, loaded)
    return cfg, trainee, open_streams(cfg, job, trainee.state, 0, 1, _opener(SPECS), pin_memory=False)


def _run(cfg, trainee, streams, steps: int) -> list[float]:
    from linearard_ray.training.step import optimization_step

    return [optimization_step(cfg, trainee, streams, 1, CPU, 1)["loss"] for _ in range(steps)]


def test_sharded_trainee_trains_like_the_whole_one_and_resumes_bitwise(tiny_model_dir, tmp_path, gloo_world_of_one):
    from torch.distributed.tensor import DTensor

    from linearard_ray.models.loading import trainable_state_dict
    from linearard_ray.training.fsdp import full_trainable_state
    from linearard_ray.training.trainee import write_checkpoint

    tiny_model_dir("llama")
    cfg, whole, streams = _trainee("ddp", tmp_path)
    want = _run(cfg, whole, streams, 4)
    streams.close()

    cfg, sharded, streams = _trainee("fsdp", tmp_path)
    assert sharded.sharded and sharded.step_fn is sharded.loss_module
    assert all(isinstance(p, DTensor) for p in sharded.params)
    got = _run(cfg, sharded, streams, 2)
    write_checkpoint(tmp_path / "ckpt", sharded, [capture_rng()])
    got += _run(cfg, sharded, streams, 2)
    streams.close()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    gathered = full_trainable_state(sharded.student)
    reference = trainable_state_dict(whole.student)
    assert gathered.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(gathered[k], v, rtol=1e-4, atol=1e-6)

    # the checkpoint: DCP files beside the rest, all in the manifest
    ckpt = tmp_path / "ckpt"
    names = {f.name for f in ckpt.iterdir()}
    assert {DCP_METADATA, "__0_0.distcp", MANIFEST_FILE} <= names and "trainable.pt" not in names
    assert verify_checkpoint(ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded.dcp_dir == str(ckpt) and loaded.trainable is None and loaded.state.step == 2
    _, resumed, streams = _trainee("fsdp", tmp_path, loaded)
    tail = _run(cfg, resumed, streams, 2)
    streams.close()
    assert tail == got[2:]
    a, b = full_trainable_state(sharded.student), full_trainable_state(resumed.student)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        verify_checkpoint(ckpt)
