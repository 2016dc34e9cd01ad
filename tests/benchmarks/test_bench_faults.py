"""benchmarks/bench_faults.py's own logic, fast: the seeded kill plan and the checkpoint it
truncates. The whole benchmark runs the real pipeline (tests/training/test_concurrent_jobs.py uses
its job runner end to end)."""

from __future__ import annotations

import json

from tests.scripts import load_script


def _bench():
    return load_script("benchmarks/bench_faults.py")


def test_the_kill_plan_is_seeded_distinct_after_the_first_checkpoint_and_alternates():
    b = _bench()
    plan = b.plan_kills(5, 48, 4, seed=3)
    assert [(k.step, k.kind) for k in plan] == [(k.step, k.kind) for k in b.plan_kills(5, 48, 4, seed=3)]
    steps = [k.step for k in plan]
    assert steps == sorted(set(steps)) and steps[0] > 4 and steps[-1] < 48
    kinds = [k.kind for k in plan]
    assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False)) and {"driver", "worker"} == set(kinds)
    assert [k.step for k in b.plan_kills(5, 48, 4, seed=4)] != steps


def test_the_truncated_checkpoint_is_the_one_rays_record_names_and_an_earlier_one_exists(tmp_path):
    b = _bench()
    run = tmp_path / "run"
    for step in (4, 8, 12):
        (run / f"checkpoint_step{step:07d}").mkdir(parents=True)
        (run / f"checkpoint_step{step:07d}" / "trainable.pt").write_bytes(b"x" * 100)
    assert b.corrupt_latest_checkpoint(run) is None  # no record yet: nothing Ray would resume from
    record = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step0000008"}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    target = b.corrupt_latest_checkpoint(run)
    assert target == run / "checkpoint_step0000008" / "trainable.pt" and target.stat().st_size == 50
    assert (run / "checkpoint_step0000012" / "trainable.pt").stat().st_size == 100
    record["latest_checkpoint_result"]["checkpoint_dir_name"] = "checkpoint_step0000004"
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    assert b.corrupt_latest_checkpoint(run) is None  # nothing older to go back to
