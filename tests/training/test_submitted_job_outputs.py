"""A job submitted with `ray job submit --working-dir .` and relative output paths keeps its
results: the student, the checkpoints, the token blocks and the MLflow store go under
LINEARARD_HOME, not into Ray's temporary copy of the working directory, and the driver prints
where they are. The path rules alone, in-process: tests/test_paths.py."""

from __future__ import annotations

import json

import pytest

from tests.training.conftest import small_corpus


def _files_in_job_copies(temp_dir, names):
    """Paths named ``names`` inside any working_dir copy Ray unpacked under its temp dir."""
    return [
        p
        for copy in temp_dir.glob("session_*/runtime_resources/working_dir_files/*")
        for p in copy.rglob("*")
        if p.name in names
    ]


@pytest.mark.slow
def test_relative_outputs_of_a_submitted_job_land_under_linearard_home(head_node, tmp_path, cache_dir, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    tiny_model_dir("llama")
    home = tmp_path / "home"
    cfg = {
        "model": {"teacher": "tiny:llama"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": [str(small_corpus(tmp_path / "docs.jsonl"))], "ctx_len": 64},
        # train.storage_path, train.output_dir, data.output_dir and the tracking URI left at
        # their relative defaults (outputs/ray, outputs/students, outputs/data/<hash>, sqlite:///mlflow.db)
        "train": {"run_name": "job", "max_steps": 3, "checkpoint_every": 2, "cpus_per_worker": 1},
    }
    out = head_node.submit_distill(cfg, tmp_path, cache_dir, LINEARARD_HOME=str(home))
    assert "[distill] step 3/3" in out

    student = home / "outputs" / "students" / "job" / "merged"
    assert (student / "config.json").exists()
    storage = home / "outputs" / "ray" / "job"
    checkpoints = sorted(p.name for p in storage.glob("checkpoint_step*"))
    assert checkpoints == ["checkpoint_step0000002", "checkpoint_step0000003"]
    assert list((home / "outputs" / "data").glob("*/manifest.json"))
    db = home / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("linearard").experiment_id])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("job", "FINISHED")]

    assert f"[distill] student: {student}" in out
    assert "[distill] next, to measure what it restored: python pipelines/evaluate.py --config " in out
    assert f"eval.student_path={student}" in out  # the next step names this student
    assert f"[distill] MLflow run: sqlite:///{db} (" in out and runs[0].info.run_id in out
    assert f"storage {storage}" in out

    # Ray's copy of the working directory got none of it
    assert _files_in_job_copies(head_node.temp_dir, {"mlflow.db", "mlartifacts", "outputs", "merged"}) == []


PROBE = (
    "import json; from linearard_ray.paths import output_base, ray_working_dir; "
    "from linearard_ray.config import TrackingConfig; "
    "print('PROBE', json.dumps([str(ray_working_dir()), str(output_base()), TrackingConfig().resolved_uri()]))"
)


@pytest.mark.slow
def test_a_submitted_job_knows_it_runs_in_rays_copy_and_defaults_to_the_users_home(head_node, tmp_path):
    """Without LINEARARD_HOME: the driver of a submitted job finds itself in Ray's copy of its
    working_dir and puts relative outputs under ~/linearard_ray (HOME is private to the test)."""
    user_home = tmp_path / "user"
    r = head_node.submit({"env_vars": {"HOME": str(user_home)}}, ["python", "-c", PROBE])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("PROBE "))
    copy, base, uri = json.loads(line.removeprefix("PROBE "))
    assert copy.startswith(f"{head_node.temp_dir.resolve()}/session_")
    assert "/runtime_resources/working_dir_files/_ray_pkg_" in copy
    assert base == str(user_home / "linearard_ray")
    assert uri == f"sqlite:///{user_home / 'linearard_ray' / 'mlflow.db'}"
