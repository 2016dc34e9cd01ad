"""Checkpoints that prove themselves: the manifest's sizes and sha256 sums, the errors that name
the checkpoint and the file, and the choice of the newest intact checkpoint of a run (on local
disk and on a pyarrow filesystem standing in for a bucket)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from linearard_ray.training.checkpointing import (
    CHECKPOINT_FILES,
    MANIFEST_FILE,
    PLACEHOLDER_FILE,
    RAY_SNAPSHOT_FILE,
    STATE_FILE,
    TRAINABLE_FILE,
    CheckpointError,
    NoIntactCheckpoint,
    TrainState,
    capture_rng,
    free_checkpoint_dir_name,
    load_checkpoint,
    load_newest_intact,
    recovery_candidates,
    save_checkpoint,
    stand_in_for_deleted_checkpoints,
    verify_checkpoint,
)

LOCAL = pafs.LocalFileSystem()


def _write(directory: Path, step: int) -> Path:
    torch.manual_seed(step)
    return save_checkpoint(
        directory,
        trainable={"w": torch.randn(64, 64)},
        optimizer_state={"state": {0: {"exp_avg": torch.randn(8)}}, "param_groups": [{"lr": 0.1}]},
        scheduler_state={"last_epoch": step},
        rng_states=[capture_rng()],
        state=TrainState(step=step, tokens_seen=100 * step, total_steps=10),
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(tmp_path: Path, steps=(2, 4, 6)) -> Path:
    run = tmp_path / "run"
    for step in steps:
        _write(run / f"checkpoint_step{step:07d}", step)
    return run


def _drop_manifest(d: Path) -> None:
    (d / MANIFEST_FILE).unlink()


# --------------------------------------------------------------------------- one checkpoint


def test_manifest_is_written_last_and_lists_every_file(tmp_path):
    d = _write(tmp_path / "ck", 3)
    files = json.loads((d / MANIFEST_FILE).read_text())["files"]
    assert set(files) == set(CHECKPOINT_FILES)
    assert files[TRAINABLE_FILE]["size"] == (d / TRAINABLE_FILE).stat().st_size
    assert all(len(entry["sha256"]) == 64 for entry in files.values())
    newest = max(CHECKPOINT_FILES, key=lambda f: (d / f).stat().st_mtime_ns)
    assert (d / MANIFEST_FILE).stat().st_mtime_ns >= (d / newest).stat().st_mtime_ns
    assert verify_checkpoint(d) is True
    loaded = load_checkpoint(d)
    assert loaded.verified and loaded.state.step == 3 and loaded.state.tokens_seen == 300


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (_truncate, TRAINABLE_FILE, r"trainable\.pt has \d+ bytes, manifest\.json says \d+"),
        (_truncate, STATE_FILE, r"state\.json has \d+ bytes, manifest\.json says \d+"),
        (_flip_byte, TRAINABLE_FILE, r"trainable\.pt does not match its sha256 in manifest\.json"),
        (_truncate, MANIFEST_FILE, r"manifest\.json is not readable \(JSONDecodeError"),
    ],
)
def test_a_damaged_file_is_named_with_the_checkpoint(tmp_path, damage, file, problem):
    d = _write(tmp_path / "checkpoint_step0000004", 4)
    damage(d / file)
    with pytest.raises(CheckpointError, match=problem) as err:
        load_checkpoint(d)
    assert str(err.value).startswith(f"checkpoint {d}: ")
    assert err.value.path == str(d)


def test_a_missing_file_is_named(tmp_path):
    d = _write(tmp_path / "ck", 1)
    (d / "rng.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"rng\.pt") as err:
        load_checkpoint(d)
    assert isinstance(err.value, CheckpointError) and str(d) in str(err.value)


def test_a_checkpoint_from_before_manifests_loads_unverified(tmp_path):
    d = _write(tmp_path / "ck", 5)
    _drop_manifest(d)
    assert verify_checkpoint(d) is False
    loaded = load_checkpoint(d)
    assert not loaded.verified and loaded.state.step == 5


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        (TRAINABLE_FILE, r"trainable\.pt is not readable \((RuntimeError|OSError): "),
        (STATE_FILE, r"state\.json is not readable \(JSONDecodeError"),
    ],
)
def test_a_damaged_checkpoint_from_before_manifests_is_named_when_it_fails_to_load(tmp_path, file, problem):
    d = _write(tmp_path / "ck", 5)
    _drop_manifest(d)
    _truncate(d / file)
    with pytest.raises(CheckpointError, match=problem) as err:
        load_checkpoint(d, shown_as="s3://bucket/run/ck")
    assert str(err.value).startswith("checkpoint s3://bucket/run/ck: ")


# --------------------------------------------------------------------------- the run's checkpoints


def test_candidates_are_the_latest_then_older_ones_newest_first(tmp_path):
    run = _run(tmp_path, steps=(2, 4, 6, 8))
    (run / "checkpoint_step0000004_1").mkdir()  # step 4 written again after a resume
    (run / "not_a_checkpoint").mkdir()
    (run / "checkpoint_step0000001").write_text("a file, not a directory")
    latest = str(run / "checkpoint_step0000006")
    # step 8 comes after Ray's latest: a report that never completed, so it is not a candidate
    assert [Path(p).name for p in recovery_candidates(LOCAL, latest)] == [
        "checkpoint_step0000006",
        "checkpoint_step0000004_1",
        "checkpoint_step0000004",
        "checkpoint_step0000002",
    ]


def test_the_newest_intact_checkpoint_is_used_and_the_skipped_ones_are_named(tmp_path):
    run = _run(tmp_path)
    _truncate(run / "checkpoint_step0000006" / TRAINABLE_FILE)
    lines: list[str] = []
    loaded = load_newest_intact(LOCAL, str(run / "checkpoint_step0000006"), lines.append)
    assert loaded.state.step == 4
    bad, good = run / "checkpoint_step0000006", run / "checkpoint_step0000004"
    assert lines == [
        f"[distill] checkpoint {bad} failed its check (trainable.pt has "
        f"{(bad / TRAINABLE_FILE).stat().st_size} bytes, manifest.json says "
        f"{(good / TRAINABLE_FILE).stat().st_size}); resuming from step 4 ({good})"
    ]


def test_two_broken_checkpoints_go_back_two_steps(tmp_path):
    run = _run(tmp_path)
    _truncate(run / "checkpoint_step0000006" / STATE_FILE)
    _flip_byte(run / "checkpoint_step0000004" / "optimizer.pt")
    lines: list[str] = []
    loaded = load_newest_intact(LOCAL, str(run / "checkpoint_step0000006"), lines.append)
    assert loaded.state.step == 2
    assert "checkpoint_step0000006 failed its check (state.json has" in lines[0]
    assert lines[0].endswith("trying an older one")
    assert "checkpoint_step0000004 failed its check (optimizer.pt does not match its sha256" in lines[1]
    assert lines[1].endswith(f"resuming from step 2 ({run / 'checkpoint_step0000002'})")


def test_an_intact_latest_checkpoint_is_used_without_a_word(tmp_path):
    run = _run(tmp_path)
    lines: list[str] = []
    assert load_newest_intact(LOCAL, str(run / "checkpoint_step0000006"), lines.append).state.step == 6
    assert lines == []


def test_an_older_checkpoint_without_manifest_is_used_when_it_loads(tmp_path):
    run = _run(tmp_path, steps=(2, 4))
    _drop_manifest(run / "checkpoint_step0000002")
    _truncate(run / "checkpoint_step0000004" / TRAINABLE_FILE)
    lines: list[str] = []
    loaded = load_newest_intact(LOCAL, str(run / "checkpoint_step0000004"), lines.append)
    assert loaded.state.step == 2 and not loaded.verified
    assert "no manifest.json (written before checksums); it loads, so it is used" in lines[-1]


def test_no_intact_checkpoint_fails_listing_what_was_tried(tmp_path):
    run = _run(tmp_path, steps=(2, 4))
    _truncate(run / "checkpoint_step0000004" / TRAINABLE_FILE)
    _drop_manifest(run / "checkpoint_step0000002")
    _truncate(run / "checkpoint_step0000002" / STATE_FILE)
    with pytest.raises(NoIntactCheckpoint) as err:
        load_newest_intact(LOCAL, str(run / "checkpoint_step0000004"), lambda _line: None)
    msg = str(err.value)
    assert f"no intact checkpoint to resume the run in {run} from" in msg
    assert f"{run / 'checkpoint_step0000004'}: trainable.pt has" in msg
    assert f"{run / 'checkpoint_step0000002'}: state.json is not readable" in msg
    assert f"Start a new train.run_name, or delete {run} to start this run over." in msg


def test_a_step_written_again_gets_a_name_of_its_own(tmp_path):
    run = _run(tmp_path, steps=(2, 4))
    assert free_checkpoint_dir_name(LOCAL, str(run), 6) == "checkpoint_step0000006"
    assert free_checkpoint_dir_name(LOCAL, str(run), 4) == "checkpoint_step0000004_1"
    (run / "checkpoint_step0000004_1").mkdir()
    assert free_checkpoint_dir_name(LOCAL, str(run) + "/", 4) == "checkpoint_step0000004_2"


def test_object_storage_checkpoints_are_checked_after_download(tmp_path):
    """A pyarrow filesystem other than local disk (as for s3:// or gs://): candidates are listed
    there, downloaded to check and load, and named by URI."""
    bucket = pafs._MockFileSystem()
    run = _run(tmp_path)
    _truncate(run / "checkpoint_step0000006" / TRAINABLE_FILE)
    bucket.create_dir("bucket/runs")
    pafs.copy_files(str(run), "bucket/runs/job", source_filesystem=LOCAL, destination_filesystem=bucket)
    lines: list[str] = []
    loaded = load_newest_intact(bucket, "bucket/runs/job/checkpoint_step0000006", lines.append)
    assert loaded.state.step == 4 and loaded.verified
    assert lines[0].startswith("[distill] checkpoint mock://bucket/runs/job/checkpoint_step0000006 failed its check")
    assert lines[0].endswith("resuming from step 4 (mock://bucket/runs/job/checkpoint_step0000004)")
    assert free_checkpoint_dir_name(bucket, "bucket/runs/job", 6) == "checkpoint_step0000006_1"


def test_a_deleted_checkpoint_named_by_ray_gets_a_placeholder_and_is_skipped(tmp_path):
    run = _run(tmp_path, steps=(2, 4))
    names = ["checkpoint_step0000002", "checkpoint_step0000004"]
    snapshot = {
        "checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in names],
        "latest_checkpoint_result": {"checkpoint_dir_name": names[1], "metrics": {}},
    }
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    for f in (run / names[1]).iterdir():
        f.unlink()
    (run / names[1]).rmdir()
    lines: list[str] = []
    assert stand_in_for_deleted_checkpoints(str(run), lines.append) == [names[1]]
    assert (run / names[1] / PLACEHOLDER_FILE).exists()
    assert "is named in Ray Train's record of the run but was deleted" in lines[0]
    assert stand_in_for_deleted_checkpoints(str(run), lines.append) == []  # already stood in for
    loaded = load_newest_intact(LOCAL, str(run / names[1]), lines.append)
    assert loaded.state.step == 2
    assert "was deleted; only a placeholder stands in for it); resuming from step 2" in lines[-1]


def test_no_ray_record_or_an_unreadable_one_changes_nothing(tmp_path):
    run = _run(tmp_path, steps=(2,))
    assert stand_in_for_deleted_checkpoints(str(run), print) == []
    (run / RAY_SNAPSHOT_FILE).write_text("{not json")
    assert stand_in_for_deleted_checkpoints(str(run), print) == []
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint_step0000002", RAY_SNAPSHOT_FILE])
