"""Resume in-process, without Ray: a tiny Llama trained a few steps, checkpointed, rebuilt from
the checkpoint and trained on must end bitwise where an uninterrupted run ends (weights, optimizer
and schedule, data position, token count, RNG of the LoRA dropout). It runs the worker's own
functions (build_trainee, open_streams, optimization_step, write_checkpoint); only the Ray
dataset shards are replaced by in-memory batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linearard_ray.config import build_config
from linearard_ray.training.checkpointing import (
    StreamPosition,
    capture_rng,
    check_same_world,
    load_checkpoint,
    read_state,
)
from linearard_ray.training.distributed import gather_objects
from linearard_ray.training.plan import JobSpec, StreamSpec, lm_every
from linearard_ray.training.step import open_streams, optimization_step
from linearard_ray.training.trainee import build_trainee, write_checkpoint

CPU = torch.device("cpu")
STEPS = 5
ROWS = 10  # 5 micro-batches of 2 per epoch: with grad_accum 2 the runs cross an epoch boundary


def _cfg(**over):
    base = {
        "model": {"teacher": "tiny:llama"},
        "rope": {"type": "linear", "factor": 4.0},
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1},  # dropout: the resumed RNG matters
        "data": {"ctx_len": 16},
        "train": {
            "max_steps": STEPS,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "warmup_steps": 2,
            "min_lr_ratio": 0.1,
            "seed": 0,
            "epochs_max": 10,
            "op_backend": "torch",  # the Triton interpreter on CPU is slow; the resume logic is the same
        },
    }
    return build_config(base, over)


def _opener(specs: dict[str, StreamSpec]):
    """In-memory epochs in place of the trainer's dataset shards: fixed rows per stream."""
    rows = {}
    for i, (name, spec) in enumerate(specs.items()):
        rng = np.random.default_rng(i)
        ids = rng.integers(3, 500, size=(spec.num_rows, spec.ctx_len)).astype(np.int32)
        mask = np.ones((spec.num_rows, spec.ctx_len), dtype=np.int8)
        mask[::3, -4:] = 0  # some padded blocks: the token count is not just rows × ctx_len
        rows[name] = (ids, mask)

    def opener(name):
        ids, mask = rows[name]
        return lambda: iter(
            [{"input_ids": ids[s : s + 5], "attention_mask": mask[s : s + 5]} for s in range(0, len(ids), 5)]
        )

    return opener


def _job(cfg, tmp_path, specs: dict[str, StreamSpec], primary: str) -> JobSpec:
    return JobSpec(
        run_name="resume",
        storage_dir=str(tmp_path / "storage"),
        output_dir=str(tmp_path / "out"),
        total_steps=STEPS,
        tokens_per_step=0,  # not read by the worker's steps
        streams=specs,
        primary=primary,
        use_gpu=False,
    )


def _steps(cfg, job, trainee, streams, steps: int) -> list[dict[str, float]]:
    return [optimization_step(cfg, trainee, streams, lm_every(cfg, job.streams), CPU, 1) for _ in range(steps)]


def _deterministic(metrics: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "step_time_s")} for m in metrics]


# The KL terms and the next-token term on its own longer stream, drawn every 2nd step; the run is
# stopped after step 3 of 5, past an epoch boundary of the KL terms' stream and between two draws.
OVERRIDES = {"objective.name": "custom", "objective.next_token.weight": 0.5, "data.lm_ctx_len": 24, "data.lm_every": 2}
SPECS = {"train": StreamSpec("train", "/unused", ROWS, 16), "lm": StreamSpec("lm", "/unused", ROWS, 24)}
CUT = 3


def test_resumed_run_ends_bitwise_where_the_uninterrupted_one_ends(tiny_model_dir, tmp_path):
    tiny_model_dir("llama")
    cfg = _cfg(**OVERRIDES)
    job = _job(cfg, tmp_path, SPECS, "train")
    opener = _opener(SPECS)
    cut = CUT
    # the uninterrupted run writes a checkpoint after step `cut` as the worker does, and goes on
    whole = build_trainee(cfg, job, CPU, 0, 1, loaded=None)
    streams = open_streams(cfg, job, whole.state, 0, 1, opener, pin_memory=False)
    whole_metrics = _steps(cfg, job, whole, streams, cut)
    write_checkpoint(tmp_path / "ckpt", whole, gather_objects(capture_rng()))
    whole_metrics += _steps(cfg, job, whole, streams, STEPS - cut)
    streams.close()

    torch.manual_seed(12345)  # whatever ran in between: the checkpoint's RNG must win
    loaded = load_checkpoint(tmp_path / "ckpt")
    check_same_world(loaded.state, 1)
    with pytest.raises(RuntimeError, match="written by 1 workers; resuming with 2"):
        check_same_world(loaded.state, 2)
    resumed = build_trainee(cfg, job, CPU, 0, 1, loaded=loaded)
    assert resumed.state.step == cut
    streams = open_streams(cfg, job, resumed.state, 0, 1, opener, pin_memory=False)
    tail = _steps(cfg, job, resumed, streams, STEPS - cut)
    streams.close()

    assert _deterministic(tail) == _deterministic(whole_metrics[cut:])
    assert resumed.state == whole.state  # step, tokens, both streams' positions
    stopped = read_state(tmp_path / "ckpt")  # past an epoch of the KL terms' stream, between two draws
    assert stopped.data == StreamPosition(1, 2) and stopped.lm_data == StreamPosition(0, 8)
    assert "next_token" not in tail[0] and "next_token" in tail[1] and "relation_q" in tail[0]
    want, got = whole.student.state_dict(), resumed.student.state_dict()
    assert any(p.requires_grad for p in whole.student.parameters())
    for name in want:
        assert torch.equal(want[name], got[name]), name
    moments = zip(
        whole.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values(), strict=True
    )
    for a, b in moments:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed.scheduler.get_last_lr() == whole.scheduler.get_last_lr()
