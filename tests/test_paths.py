"""Where relative output paths land (linearard_ray.paths), in-process: a direct run keeps them in
its working directory; a job running in Ray's unpacked copy of its working_dir puts them under
LINEARARD_HOME (default ~/linearard_ray); LINEARARD_HOME set explicitly applies to both. The same
job through `ray job submit` is tests/training/test_submitted_job_outputs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from linearard_ray.paths import output_base, output_path, ray_working_dir, sqlite_uri


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private home directory and no LINEARARD_HOME / MLFLOW_TRACKING_URI from the caller."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("LINEARARD_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return h


@pytest.fixture
def job_copy(tmp_path, monkeypatch, home):
    """The working directory of a submitted job: Ray's unpacked copy of its working_dir."""
    d = tmp_path / "ray" / "session_2026-01-01_00-00-00_1" / "runtime_resources" / "working_dir_files"
    d = d / "_ray_pkg_0123abcd"
    d.mkdir(parents=True)
    monkeypatch.chdir(d)
    return d


@pytest.fixture
def checkout(tmp_path, monkeypatch, home):
    """The working directory of a direct run: a checkout anywhere else."""
    d = tmp_path / "checkout"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_a_job_running_in_rays_copy_of_its_working_dir_is_recognised(job_copy):
    assert ray_working_dir() == job_copy
    (job_copy / "pipelines").mkdir()
    assert ray_working_dir(job_copy / "pipelines") == job_copy  # an entrypoint that cd'd inside it


def test_other_directories_are_not_a_jobs_copy(tmp_path, checkout):
    assert ray_working_dir() is None
    lone = tmp_path / "working_dir_files" / "_ray_pkg_1"  # the name alone, not under runtime_resources
    lone.mkdir(parents=True)
    assert ray_working_dir(lone) is None
    assert ray_working_dir(tmp_path / "runtime_resources" / "working_dir_files") is None


def test_a_direct_run_resolves_against_its_working_directory(checkout):
    assert output_base() == checkout
    assert output_path("outputs/students") == str(checkout / "outputs" / "students")


def test_a_submitted_job_resolves_under_the_default_home(job_copy, home):
    assert output_base() == home / "linearard_ray"
    assert output_path("outputs/ray") == str(home / "linearard_ray" / "outputs" / "ray")


def test_an_explicit_linearard_home_applies_to_direct_and_submitted_runs(tmp_path, monkeypatch, checkout, job_copy):
    monkeypatch.setenv("LINEARARD_HOME", str(tmp_path / "results"))
    for cwd in (checkout, job_copy):
        assert output_base(cwd) == tmp_path / "results"
        assert output_path("outputs/students", cwd) == str(tmp_path / "results" / "outputs" / "students")
    monkeypatch.setenv("LINEARARD_HOME", "~/elsewhere")
    assert output_base() == Path.home() / "elsewhere"


def test_absolute_paths_and_uris_are_kept(job_copy, home):
    assert output_path("/data/students") == "/data/students"
    assert output_path("s3://bucket/ray") == "s3://bucket/ray"
    assert output_path("~/students") == str(home / "students")


def test_a_relative_sqlite_store_lands_beside_the_outputs(job_copy, home, tmp_path):
    base = home / "linearard_ray"
    assert sqlite_uri("sqlite:///mlflow.db") == f"sqlite:///{base / 'mlflow.db'}"
    assert sqlite_uri("sqlite:///runs/m.db?timeout=30") == f"sqlite:///{base / 'runs' / 'm.db'}?timeout=30"
    for kept in (f"sqlite:///{tmp_path / 'm.db'}", "sqlite:///:memory:", "sqlite://", "http://127.0.0.1:5000"):
        assert sqlite_uri(kept) == kept


def test_the_default_tracking_uri_follows_the_output_base(job_copy, home, checkout, monkeypatch):
    from linearard_ray.config import TrackingConfig

    monkeypatch.chdir(job_copy)
    assert TrackingConfig().resolved_uri() == f"sqlite:///{home / 'linearard_ray' / 'mlflow.db'}"
    monkeypatch.chdir(checkout)
    assert TrackingConfig().resolved_uri() == f"sqlite:///{checkout / 'mlflow.db'}"


def test_a_clusters_tracking_server_wins_over_the_default_and_the_config_over_both(job_copy, monkeypatch):
    from linearard_ray.config import TrackingConfig

    # what cluster.yaml exports on the head before `ray start`, inherited by every submitted job
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert TrackingConfig().resolved_uri() == "http://10.0.0.1:5000"
    assert TrackingConfig(tracking_uri="http://other:5000").resolved_uri() == "http://other:5000"


def test_a_submitted_jobs_training_paths_are_under_the_home(job_copy, home, tmp_path):
    from linearard_ray.config import build_config
    from linearard_ray.training.plan import job_paths

    base = home / "linearard_ray"
    cfg = build_config({"train": {"run_name": "r"}})
    assert job_paths(cfg) == (str(base / "outputs" / "ray" / "r"), str(base / "outputs" / "students" / "r"))
    given = {"storage_path": str(tmp_path / "ray"), "output_dir": str(tmp_path / "students"), "run_name": "r"}
    assert job_paths(build_config({"train": given})) == (str(tmp_path / "ray" / "r"), str(tmp_path / "students" / "r"))
    s3 = build_config({"train": {"storage_path": "s3://b/ray", "run_name": "r"}})
    assert job_paths(s3)[0] == "s3://b/ray/r"


def test_a_direct_runs_training_paths_stay_in_its_working_directory(checkout):
    from linearard_ray.config import build_config
    from linearard_ray.training.plan import job_paths

    cfg = build_config({"train": {"run_name": "r"}})
    assert job_paths(cfg) == (str(checkout / "outputs" / "ray" / "r"), str(checkout / "outputs" / "students" / "r"))


def test_token_blocks_of_a_submitted_job_are_under_the_home(job_copy, home):
    from linearard_ray.data.manifest import default_output_dir

    assert default_output_dir("0123456789abcdef") == home / "linearard_ray" / "outputs" / "data" / "0123456789ab"


def test_a_submitted_sweep_keeps_inputs_in_the_copy_and_outputs_under_the_home(job_copy, home):
    from linearard_ray.config import build_config
    from linearard_ray.sweep.plan import make_plan, run_config

    base = home / "linearard_ray"
    (job_copy / "corpus.txt").write_text("text shipped with the job\n")
    cfg = build_config(
        {
            "data": {"sources": ["corpus.txt"], "output_dir": "blocks"},
            "train": {"eval_every": 5},
            "tune": {"sweep_name": "s"},
        }
    )
    plan = make_plan(cfg, [])
    assert plan["sweep_dir"] == str(base / "outputs" / "tune" / "s")
    assert plan["students_dir"] == str(base / "outputs" / "students" / "s")
    trial = run_config(plan, {}, "s-1")
    assert trial.data.sources == [str(job_copy / "corpus.txt")]  # an input: read from the job's copy
    assert trial.data.output_dir == str(base / "blocks")
    assert trial.train.storage_path == str(base / "outputs" / "tune" / "s" / "runs")
    assert trial.train.output_dir == str(base / "outputs" / "students" / "s")


def test_teacher_samples_of_a_submitted_job_are_under_the_home(job_copy, home):
    from linearard_ray.config import build_config
    from linearard_ray.data.teacher_samples import samples_path

    base = home / "linearard_ray"
    default = samples_path(build_config({"data": {"teacher_samples": {"num_samples": 4}}}))
    assert default.parent == base / "outputs" / "data" / "teacher-samples"
    named = samples_path(build_config({"data": {"teacher_samples": {"num_samples": 4, "path": "s.jsonl"}}}))
    assert named == base / "s.jsonl"
