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
        self._system_metrics = None
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

    def start_system_metrics(self, tracking_cfg) -> bool:
        """``tracking.system_metrics``: sample this machine's CPU, memory, disk and network (and GPUs
        where NVML is) into the run as ``system/...`` metrics every ``system_metrics_interval_s``
        until ``finish``. False when off or psutil is missing."""
        if not tracking_cfg.system_metrics or self._system_metrics is not None:
            return False
        self._system_metrics = start_system_metrics(self.uri, self.run_id, tracking_cfg.system_metrics_interval_s)
        return self._system_metrics is not None

    def stop_system_metrics(self) -> None:
        """Stop sampling and flush what was sampled (the last sample included)."""
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            monitor.finish()

    def finish(self, status: str = "FINISHED") -> None:
        self.stop_system_metrics()  # before the run ends: the monitor stops at a run that is not RUNNING
        self.client.set_terminated(self.run_id, status=status)


# --------------------------------------------------------------------------- system metrics


def start_system_metrics(uri: str, run_id: str, interval_s: float):
    """MLflow's ``SystemMetricsMonitor`` on run `run_id`, started; None without psutil (which the
    CPU monitor needs). GPU metrics come with it where NVML (``nvidia-ml-py``) is importable.

    ``mlflow.start_run(log_system_metrics=True)`` needs the fluent active run; runs here are driven
    by an ``MlflowClient``, so the monitor is started on the run id directly. ``resume_logging``
    continues a resumed run's system-metric steps instead of writing step 0 again."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


# --------------------------------------------------------------------------- model registry


def registry_reads_local_paths(uri: str) -> bool:
    """Whether a model version may name a local directory as its source: a database store (sqlite,
    postgres, ...) accepts any source; a tracking server accepts a local path only inside the run's
    own artifacts (``mlflow.server.handlers._validate_source_run``)."""
    return not uri.startswith(("http://", "https://", "databricks"))


def _registry_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description="LinearARD students (linearard_ray)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it in between
            raise


def register_model_version(
    uri: str, name: str, source: str, run_id: str, tags: Mapping[str, Any], description: str | None = None
) -> str:
    """The version of registered model `name` (created if needed) made by run `run_id` from
    `source`, with `tags`; a job that exports again under the same run and source updates that
    version instead of adding one. Returns the version number as a string."""
    client = _registry_client(uri)
    _ensure_registered_model(client, name)
    str_tags = {k: _param_value(v) for k, v in tags.items()}
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.name == name and mv.source == source:
            set_version_tags(uri, name, mv.version, str_tags)
            return str(mv.version)
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=str_tags, description=description)
    return str(mv.version)


def set_version_tags(uri: str, name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = _registry_client(uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, _param_value(v))


def register_student(
    logger: RunLogger, model_dir: str | os.PathLike, name: str, tags: Mapping[str, Any], *, copy: bool
) -> dict[str, str]:
    """Register the exported student `model_dir` as a version of `name`, made by the logger's run.

    The version's source is the exported directory itself, so the weights exist once; with `copy`,
    or where the registry cannot take a local path (a tracking server), the directory is logged
    into the run's artifacts (``student/``) once and the version points there. The run is tagged
    with the registered model and version."""
    source = str(Path(model_dir).resolve())
    if copy or not registry_reads_local_paths(logger.uri):
        logger.log_artifact(model_dir, "student")
        source = f"runs:/{logger.run_id}/student"
    version = register_model_version(
        logger.uri, name, source, logger.run_id, tags, description=f"exported by run {logger.run_id}"
    )
    logger.set_tags({"linearard.registered_model": name, "linearard.registered_version": version})
    return {"registered_model": name, "version": version, "source": source}


# --------------------------------------------------------------------------- linking runs


def log_to_finished_run(
    uri: str, run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, Any] | None = None
) -> None:
    """Metrics and tags into an existing run without reopening it (a ``RunLogger`` would mark it
    RUNNING): an evaluation's results into the training run of the student it measured."""
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if math.isfinite(float(v))]
    run_tags = [RunTag(k, _param_value(v)) for k, v in (tags or {}).items()]
    client = _client(uri)
    for i in range(0, max(len(items), 1), 500):
        client.log_batch(run_id, metrics=items[i : i + 500], tags=run_tags if i == 0 else [])
