"""A run whose newest checkpoint is broken resumes from the one before and ends exactly where an
uninterrupted run ends: same token count, bitwise the same weights.

In-process (the worker's own functions on real checkpoint directories, as in test_resume.py) and
on a local Ray cluster (the same run name started again after its newest checkpoint was truncated,
or deleted by hand)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from linearard_ray.training.checkpointing import (
    TRAINABLE_FILE,
    capture_rng,
    free_checkpoint_dir_name,
    load_newest_intact,
)
from linearard_ray.training.step import open_streams
from linearard_ray.training.trainee import build_trainee, write_checkpoint
from tests.training import test_e2e as e2e
from tests.training.test_resume import CPU, OVERRIDES, SPECS, STEPS, _cfg, _deterministic, _job, _opener, _steps

# the end-to-end tests' corpus and uninterrupted reference run, as this module's fixtures (the Ray
# cluster comes from tests/training/conftest.py)
corpus, workdir, reference = e2e.corpus, e2e.workdir, e2e.reference


def _stderr_with(capfd, *wanted: str, timeout: float = 30.0) -> str:
    """The test's stderr once it holds every ``wanted`` text, or what came within ``timeout``: a
    worker's lines reach the driver through Ray's log monitor, which may forward them after
    run_distill has returned (skipped checkpoints are warnings: stderr, shown under --quiet too)."""
    err, end = "", time.time() + timeout
    while True:
        err += capfd.readouterr().err
        if all(w in err for w in wanted) or time.time() > end:
            return err
        time.sleep(0.5)


RAY_STEPS = e2e.STEPS


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before_exactly(tiny_model_dir, tmp_path):
    tiny_model_dir("llama")
    cfg = _cfg(**OVERRIDES)
    job = _job(cfg, tmp_path, SPECS, "train")
    opener = _opener(SPECS)
    run = tmp_path / "run"
    # the uninterrupted run checkpoints after steps 2 and 4 as the worker names them, and goes on
    whole = build_trainee(cfg, job, CPU, 0, 1, loaded=None)
    streams = open_streams(cfg, job, whole.state, 0, 1, opener, pin_memory=False)
    metrics = []
    for step in (2, 4):
        metrics += _steps(cfg, job, whole, streams, step - whole.state.step)
        write_checkpoint(run / free_checkpoint_dir_name(pafs.LocalFileSystem(), str(run), step), whole, [capture_rng()])
    metrics += _steps(cfg, job, whole, streams, STEPS - whole.state.step)
    streams.close()

    newest = run / "checkpoint_step0000004"
    _truncate(newest / TRAINABLE_FILE)
    torch.manual_seed(12345)  # whatever ran in between: the checkpoint's RNG must win
    lines: list[str] = []
    loaded = load_newest_intact(pafs.LocalFileSystem(), str(newest), lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"[distill] checkpoint {newest} failed its check (trainable.pt ")
    assert lines[0].endswith(f"resuming from step 2 ({run / 'checkpoint_step0000002'})")

    resumed = build_trainee(cfg, job, CPU, 0, 1, loaded=loaded)
    streams = open_streams(cfg, job, resumed.state, 0, 1, opener, pin_memory=False)
    tail = _steps(cfg, job, resumed, streams, STEPS - 2)
    streams.close()
    assert _deterministic(tail) == _deterministic(metrics[2:])
    assert resumed.state == whole.state and resumed.state.tokens_seen == whole.state.tokens_seen
    want, got = whole.student.state_dict(), resumed.student.state_dict()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # step 4 written again goes beside the broken one, never into it
    assert free_checkpoint_dir_name(pafs.LocalFileSystem(), str(run), 4) == "checkpoint_step0000004_1"


# --------------------------------------------------------------------------- on Ray


def _exported(res) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(res.student_dir) / "model.safetensors"))


def _assert_same_end(ref, res) -> None:
    assert res.final_step == RAY_STEPS and res.tokens_seen == ref.tokens_seen
    for tensors in (e2e._final_trainable, _exported):
        a, b = tensors(ref), tensors(res)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _stop_after_step_4(workdir, corpus, run_name: str):
    """A job that dies at step 5 of 6: checkpoints at steps 2 and 4 are kept (keep_checkpoints 2)."""
    from linearard_ray.training.driver import run_distill

    cfg = e2e._cfg(
        workdir, corpus, run_name, **{"train.fail_at_step": 5, "train.max_failures": 0, "train.eval_every": None}
    )
    with pytest.raises(Exception, match="fail_at_step"):
        run_distill(cfg)
    run = Path(cfg.train.storage_path) / run_name
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == ["checkpoint_step0000002", "checkpoint_step0000004"]
    return cfg, run


@pytest.mark.slow
def test_job_started_again_after_its_newest_checkpoint_was_truncated(reference, workdir, corpus, capfd):
    from linearard_ray.training.driver import run_distill

    _, ref = reference
    cfg, run = _stop_after_step_4(workdir, corpus, "truncated")
    _truncate(run / "checkpoint_step0000004" / TRAINABLE_FILE)

    res = run_distill(cfg)
    bad, good = run / "checkpoint_step0000004", run / "checkpoint_step0000002"
    failed, resumed = (
        f"[distill] checkpoint {bad} failed its check (trainable.pt has ",
        f"; resuming from step 2 ({good})",
    )
    err = _stderr_with(capfd, failed, resumed)
    assert failed in err and resumed in err
    _assert_same_end(ref, res)
    # step 4 was written again beside the broken one; Ray's num_to_keep then dropped the broken one
    kept = sorted(p.name for p in run.glob("checkpoint_step*"))
    assert kept == ["checkpoint_step0000004_1", "checkpoint_step0000006"]
    assert res.checkpoint_path == str(run / "checkpoint_step0000006")


@pytest.mark.slow
def test_job_started_again_after_its_newest_checkpoint_was_deleted_by_hand(reference, workdir, corpus, capfd):
    from linearard_ray.training.driver import run_distill

    _, ref = reference
    cfg, run = _stop_after_step_4(workdir, corpus, "deleted")
    shutil.rmtree(run / "checkpoint_step0000004")

    res = run_distill(cfg)
    bad = run / "checkpoint_step0000004"
    wanted = (
        f"[distill] checkpoint {bad} is named in Ray Train's record of the run but was deleted",
        f"[distill] checkpoint {bad} failed its check (was deleted; only a placeholder stands in for it)",
        f"; resuming from step 2 ({run / 'checkpoint_step0000002'})",
    )
    err = _stderr_with(capfd, *wanted)
    assert all(w in err for w in wanted), err[-3000:]
    _assert_same_end(ref, res)
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == [
        "checkpoint_step0000004_1",
        "checkpoint_step0000006",
    ]
