"""The distill script as a process (slow; the in-process checks of bad configs are in
test_checks.py): --help, a bad config rejected before Ray starts, and the real deployment path,
`ray job submit --working-dir . -- python pipelines/distill.py --config ...` against a
`ray start --head` cluster on loopback that the test starts and stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import small_corpus

REPO = Path(__file__).resolve().parents[2]
DISTILL = REPO / "pipelines" / "distill.py"


def _run(args, timeout=120, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(DISTILL), *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd
    )


@pytest.mark.slow
def test_the_script_prints_help_and_refuses_a_bad_config_before_ray_starts(tmp_path):
    """The script as a process; every refusal is checked in-process in test_checks.py."""
    r = _run(["--help"])
    assert r.returncode == 0 and "train.budget_tokens" in r.stdout
    r = _run(["--set", "data.sources=[/no/such/dir/teacher_samples.jsonl]"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.sources[0]: '/no/such/dir/teacher_samples.jsonl' does not exist" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- ray job submit
# (the head_node fixture is in conftest.py)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(head_node, tmp_path, cache_dir, tiny_model_dir):
    tiny_model_dir("llama")
    corpus = small_corpus(tmp_path / "docs.jsonl")
    cfg = {
        "model": {"teacher": "tiny:llama"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": [str(corpus)], "ctx_len": 64, "output_dir": str(tmp_path / "data")},
        "train": {
            "run_name": "job",
            "storage_path": str(tmp_path / "ray"),
            "output_dir": str(tmp_path / "students"),
            "max_steps": 3,
            "checkpoint_every": 2,
            "cpus_per_worker": 1,
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "job"},
        # train.evaluate_at_end runs the evaluation stage on the exported student, kept tiny here
        "eval": {
            "short_lengths": [64],
            "long_lengths": [128],
            "passkey_lengths": [],
            "max_windows": 1,
            "relation_kl": False,
            "other_texts": [],
        },
    }
    cfg["train"]["evaluate_at_end"] = True
    out = head_node.submit_distill(cfg, tmp_path, cache_dir)
    assert "succeeded" in out.lower()
    assert "[distill] step 3/3" in out
    assert f"[distill] student: {tmp_path / 'students' / 'job' / 'merged'}" in out
    assert (tmp_path / "students" / "job" / "merged" / "config.json").exists()
    assert "[distill] MLflow run:" in out
    assert "[distill] evaluation done" in out
    report = json.loads((tmp_path / "students" / "job" / "merged" / "eval" / "report.json").read_text())
    assert report["mlflow"]["run_id"]
