"""linearard_ray.tracking against a real sqlite-backed MLflow store."""

from __future__ import annotations

import numpy as np

from tests.local_ray import free_port


def test_run_logger_params_metrics_and_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    from linearard_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "unit")
    assert tracking.ensure_experiment(uri, "unit") == exp
    client = MlflowClient(uri)
    assert client.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    run_id = tracking.create_run(uri, exp, "job-a")
    lg = tracking.RunLogger(uri, run_id)
    rng = np.random.default_rng(0)
    vals = rng.random(4)
    lg.log_params({"train.lr": 3e-4, "data.sources": ["a", "b"], "model.student": None, "long": "x" * 7000})
    for s, v in enumerate(vals, start=1):
        lg.log_metrics({"loss": v, "skip_nan": float("nan")}, step=s)
    changed = tracking.RunLogger(uri, run_id).log_params({"train.lr": 1e-4, "train.seed": 1})
    assert changed == {"train.lr": ("0.0003", "0.0001")}
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["train.seed"] == "1"
    assert run.data.params["data.sources"] == "['a', 'b']" and run.data.params["model.student"] == "None"
    assert len(run.data.params["long"]) <= tracking.MAX_PARAM_LEN
    assert run.data.tags["resume.changed.train.lr"] == "0.0003 -> 0.0001"
    hist = client.get_metric_history(run_id, "loss")
    assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == [
        (s, float(v)) for s, v in enumerate(vals, 1)
    ]
    assert client.get_metric_history(run_id, "skip_nan") == []
    lg.finish()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from linearard_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "unit"), "job")
    first = tracking.RunLogger(uri, run_id)
    for step in range(1, 7):  # an attempt killed after step 6, its last checkpoint at step 4
        first.log_step_metrics({"loss": 1.0 / step}, step)
    resumed = tracking.RunLogger(uri, run_id)
    for step in range(5, 9):  # the resume trains steps 5 and 6 again
        resumed.log_step_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    hist = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted(h.step for h in hist) == list(range(1, 9))
    assert sorted(h.step for h in MlflowClient(uri).get_metric_history(run_id, "lr")) == [7, 8]


def test_reopening_a_run_left_running_tags_it_resumed_from_kill(tmp_path):
    from mlflow.tracking import MlflowClient

    from linearard_ray.config import build_config
    from linearard_ray.training.driver import open_mlflow_run

    cfg = build_config(
        {
            "model": {"teacher": "tiny:llama"},
            "train": {"run_name": "job", "max_steps": 1},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "unit"},
        }
    )
    storage = str(tmp_path / "ray" / "job")
    uri, _, run_id = open_mlflow_run(cfg, storage)  # attempt 1 is killed: the run stays RUNNING
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert open_mlflow_run(cfg, storage)[2] == run_id
    tags = client.get_run(run_id).data.tags
    assert tags["linearard.resumed_from_kill"] == "true" and tags["linearard.attempts"] == "2"
    client.set_terminated(run_id, "FAILED")  # attempt 2 fails cleanly: attempt 3 is not a kill
    client.delete_tag(run_id, "linearard.resumed_from_kill")
    assert open_mlflow_run(cfg, storage)[2] == run_id
    tags = client.get_run(run_id).data.tags
    assert "linearard.resumed_from_kill" not in tags and tags["linearard.attempts"] == "3"
    assert client.get_run(run_id).info.status == "RUNNING"


# --------------------------------------------------------------------------- registry, system metrics

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _exported_dir(tmp_path):
    """A stand-in exported student directory: registration reads only its path (or copies it)."""
    d = tmp_path / "students" / "job" / "merged"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"0" * 64)
    return d


def test_registering_a_student_points_the_version_at_the_exported_directory(tmp_path):
    from mlflow.tracking import MlflowClient

    from linearard_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "reg"), "job")
    lg = tracking.RunLogger(uri, run_id)
    merged = _exported_dir(tmp_path)
    tags = {"teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "rope_type": "linear", "rope_factor": 4.0}
    got = tracking.register_student(lg, merged, "smol-x4", {**tags, "tokens_seen": 1024}, copy=False)
    assert got == {"registered_model": "smol-x4", "version": "1", "source": str(merged.resolve())}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version("smol-x4", "1")
    assert mv.source == str(merged.resolve()) and mv.run_id == run_id
    assert mv.tags == {
        "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "rope_type": "linear",
        "rope_factor": "4.0",
        "tokens_seen": "1024",
    }
    assert client.list_artifacts(run_id) == []  # no second copy of the weights
    run = client.get_run(run_id)
    assert (
        run.data.tags["linearard.registered_model"] == "smol-x4"
        and run.data.tags["linearard.registered_version"] == "1"
    )
    # the same run exporting again updates its version; a copy asked for is logged once and registered
    again = tracking.register_student(lg, merged, "smol-x4", {**tags, "tokens_seen": 2048}, copy=False)
    assert again["version"] == "1" and client.get_model_version("smol-x4", "1").tags["tokens_seen"] == "2048"
    copied = tracking.register_student(lg, merged, "smol-x4", tags, copy=True)
    assert copied == {"registered_model": "smol-x4", "version": "2", "source": f"runs:/{run_id}/student"}
    assert {a.path for a in client.list_artifacts(run_id, "student")} == {
        "student/config.json",
        "student/model.safetensors",
    }


def test_evaluation_figures_reach_a_finished_run_without_reopening_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from linearard_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "link"), "job")
    tracking.RunLogger(uri, run_id).finish()
    tracking.log_to_finished_run(
        uri, run_id, {"report/main.ppl_512": 28.5, "nan": float("nan")}, 7, {"evaluation.mlflow_run_id": "e1"}
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"report/main.ppl_512": 28.5}
    assert run.data.tags["evaluation.mlflow_run_id"] == "e1"
    assert [h.step for h in MlflowClient(uri).get_metric_history(run_id, "report/main.ppl_512")] == [7]


def test_system_metrics_are_sampled_until_the_run_finishes(tmp_path):
    import time

    from mlflow.tracking import MlflowClient

    from linearard_ray import tracking
    from linearard_ray.config import TrackingConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "sys"), "job")
    lg = tracking.RunLogger(uri, run_id)
    assert not lg.start_system_metrics(TrackingConfig(system_metrics=False))
    assert lg.start_system_metrics(TrackingConfig(system_metrics_interval_s=0.2))
    time.sleep(1.5)
    lg.finish()
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    for key in (
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/disk_usage_percentage",
    ):
        assert key in metrics, sorted(metrics)
    steps = sorted(h.step for h in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert len(steps) >= 2 and steps == list(range(len(steps)))
    # a resumed run continues the steps instead of writing step 0 again
    resumed = tracking.RunLogger(uri, run_id)
    resumed.start_system_metrics(TrackingConfig(system_metrics_interval_s=0.2))
    time.sleep(0.6)
    resumed.finish()
    more = sorted(h.step for h in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert more[: len(steps)] == steps and len(more) > len(steps) and len(set(more)) == len(more)


# --------------------------------------------------------------------------- against a tracking server


def _wait_healthy(url: str, proc, timeout_s: float = 120.0) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer /health in {timeout_s}s")


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking and registry server on loopback over a sqlite store, stopped after."""
    import subprocess
    import sys

    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"),
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_registry_system_metrics_and_links_through_a_tracking_server(tmp_path, mlflow_server):
    """Through a server the registry refuses a local path outside the run's artifacts, so the
    student is logged into the run once and the version points there; system metrics and the
    evaluation's link arrive the same way."""
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from linearard_ray import tracking
    from linearard_ray.config import TrackingConfig

    uri = mlflow_server
    assert not tracking.registry_reads_local_paths(uri)
    run_id = tracking.create_run(uri, tracking.ensure_experiment(uri, "served"), "job")
    lg = tracking.RunLogger(uri, run_id)
    assert lg.start_system_metrics(TrackingConfig(system_metrics_interval_s=0.2))
    merged = _exported_dir(tmp_path)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("direct")
    with pytest.raises(MlflowException, match="local path"):  # why the copy is needed here
        client.create_model_version("direct", source=str(merged), run_id=run_id)

    got = tracking.register_student(lg, merged, "served-x4", {"teacher": "t", "rope_type": "yarn"}, copy=False)
    assert got["source"] == f"runs:/{run_id}/student" and got["version"] == "1"
    time.sleep(1.0)
    lg.finish()
    mv = client.get_model_version("served-x4", "1")
    assert mv.run_id == run_id and mv.tags == {"teacher": "t", "rope_type": "yarn"}
    assert {a.path for a in client.list_artifacts(run_id, "student")} == {
        "student/config.json",
        "student/model.safetensors",
    }
    local = client.download_artifacts(run_id, "student", str(tmp_path / "download"))
    assert (Path(local) / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()
    assert "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics

    tracking.log_to_finished_run(uri, run_id, {"report/main.ppl_512": 30.0}, 5, {"evaluation.mlflow_run_id": "e"})
    tracking.set_version_tags(uri, "served-x4", "1", {"eval.main.ppl_512": 30.0})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["report/main.ppl_512"] == 30.0
    assert client.get_model_version("served-x4", "1").tags["eval.main.ppl_512"] == "30.0"
