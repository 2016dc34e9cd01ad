"""linearard_ray.tracking against a real sqlite-backed MLflow store."""

from __future__ import annotations

import numpy as np


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
