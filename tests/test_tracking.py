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
