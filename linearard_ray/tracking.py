"""MLflow tracking for training jobs: one run per job, written from rank 0 only.

The driver resolves one absolute tracking URI (``TrackingConfig.resolved_uri()``) and creates the
experiment, so every process writes to the same store and artifacts land next to a local sqlite
database rather than in whichever directory a Ray worker happens to start in. Rank 0 then logs
through an explicit ``MlflowClient`` (no global active-run state, so nothing leaks between jobs
that share a worker process).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
RUN_NAME_TAG = "linearard.run_name"
_NOT_READ = object()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def local_artifact_root(uri: str) -> str | None:
    """Artifact root beside a local sqlite database (``sqlite:////abs/dir/mlflow.db`` → ``/abs/dir/mlartifacts``)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.parent / "mlartifacts").resolve().as_uri()


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, creating it if needed."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(uri))
    except Exception:
        # another job created it between the lookup and the create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def create_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    client = _client(uri)
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def run_status(uri: str, run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None when the store has no such
    run (deleted, or a different store)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _client(uri).get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage == "deleted":
        return None
    return run.info.status


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to find the run: a UI path for http stores, or the store plus ids for local ones."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} (experiment {experiment_id}, run {run_id}; view with `mlflow ui --backend-store-uri {uri}`)"


def _param_value(v: Any) -> str:
    s = "None" if v is None else str(v)
    if len(s) > MAX_PARAM_LEN:
        s = s[: MAX_PARAM_LEN - 20] + "...[truncated]"
    return s


class RunLogger:
    """Logs params, metrics and artifacts into one existing MLflow run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.entities import RunStatus

        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
        run = self.client.get_run(run_id)
        self.experiment_id = run.info.experiment_id
        self._logged_through: int | None | object = _NOT_READ
        if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log params; on a resumed run, params already there with the same value are skipped and
        changed ones (MLflow forbids overwriting) are recorded as tags. Returns the changed ones."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new, changed = [], {}
        for k, v in params.items():
            s = _param_value(v)
            if k not in existing:
                new.append(Param(k, s))
            elif existing[k] != s:
                changed[k] = (existing[k], s)
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        for k, (old, s) in changed.items():
            self.client.set_tag(self.run_id, f"resume.changed.{k}", _param_value(f"{old} -> {s}"))
        return changed

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, int(step))
            for k, v in metrics.items()
            if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def last_logged_step(self, key: str = "loss") -> int | None:
        """The highest step at which ``key`` was logged, or None before the first."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)

    def log_step_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """A training step's metrics, once per step: steps the run already has (logged by an attempt
        that ended after its last checkpoint, whose resume trains them again) are not logged again.
        A resume reproduces those steps exactly, so the points already there are the same numbers."""
        if self._logged_through is _NOT_READ:
            self._logged_through = self.last_logged_step()
        if self._logged_through is not None and step <= self._logged_through:
            return
        self.log_metrics(metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, _param_value(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
