"""The job plan the driver resolves before any worker starts: the token-block streams, the step
count, and where the job's files live. Everything here is plain data the workers receive."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from linearard_ray.config import Config, ConfigError
from linearard_ray.logs import get_logger
from linearard_ray.paths import output_path

# Written into the job's storage directory once train.fail_at_step has fired, so that the
# retried worker group (or the job started again) does not fail a second time.
FAIL_MARKER = "linearard_fail_at_step.fired"
# Where the driver records the MLflow run of a run name, to reopen it when the job starts again.
JOB_FILE = "linearard_job.json"
# Token blocks up to this size are read by the driver and held in the object store (int32 ids +
# int8 mask per token); larger corpora are streamed from parquet on every pass.
MATERIALIZE_BYTES = 2 << 30
BYTES_PER_TOKEN = 5


@dataclass
class StreamSpec:
    """One token-block stream the workers read: its data dir, size and block length."""

    name: str
    directory: str
    num_rows: int
    ctx_len: int


@dataclass
class JobSpec:
    """What the driver resolved for the workers (everything here is plain data)."""

    run_name: str
    storage_dir: str  # <storage_path>/<run_name>
    output_dir: str  # where the student is exported
    total_steps: int
    tokens_per_step: int
    streams: dict[str, StreamSpec]
    primary: str  # the stream the main batch comes from
    use_gpu: bool
    tracking_uri: str | None = None
    experiment_id: str | None = None
    mlflow_run_id: str | None = None
    lock_token: str | None = None  # the run lock this job holds; workers stop when it is not theirs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        d = dict(d)
        d["streams"] = {k: StreamSpec(**v) for k, v in d["streams"].items()}
        return cls(**d)


@dataclass
class TrainResult:
    """What ``run_distill`` hands back: where the student, the checkpoints and the MLflow run are."""

    run_name: str
    student_dir: str | None
    final_step: int
    tokens_seen: int
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    storage_dir: str | None = None
    tracking_uri: str | None = None
    mlflow_experiment_id: str | None = None
    mlflow_run_id: str | None = None
    evaluation: dict[str, Any] | None = None


def own_lm_stream(streams: dict) -> bool:
    """Whether the next-token term reads a stream of its own beside the KL terms' one (not the
    lone stream of a next-token-only objective, which drives every step)."""
    return "lm" in streams and len(streams) > 1


def lm_every(cfg: Config, streams: dict) -> int:
    """Optimizer steps per batch of the next-token term's own stream: ``data.lm_every`` when that
    stream runs beside the KL terms' one, else 1."""
    return cfg.data.lm_every if own_lm_stream(streams) else 1


def epoch_unit(cfg: Config, world_size: int) -> int:
    """What a stream's epoch length is a multiple of (``data/streams.py``): one micro-batch of
    every worker under DDP; a whole optimizer step's global batch under FSDP, so that a checkpoint
    can resume on any worker count that keeps the global batch (its epochs stay the same length)."""
    t = cfg.train
    unit = world_size * t.micro_batch_size
    return unit * t.grad_accum if t.parallelism == "fsdp" else unit


def plan_steps(cfg: Config, streams: dict[str, StreamSpec], primary: str, world_size: int) -> tuple[int, int]:
    """(total optimizer steps, tokens per optimizer step over all workers).

    Tokens per step counts every block a step reads (both streams when the next-token term has its
    own); with both ``budget_tokens`` and ``max_steps`` set, the smaller budget wins.
    """
    t = cfg.train
    per_rank_rows = t.micro_batch_size * t.grad_accum
    every = {s.name: lm_every(cfg, streams) if s.name == "lm" else 1 for s in streams.values()}
    # the mean over steps: a stream drawn every N steps adds 1/N of its blocks to each
    mean_tokens = world_size * per_rank_rows * sum(s.ctx_len / every[s.name] for s in streams.values())
    tokens_per_step = round(mean_tokens)
    candidates = []
    if t.max_steps is not None:
        candidates.append(t.max_steps)
    if t.budget_tokens is not None:
        candidates.append(max(1, math.ceil(t.budget_tokens / mean_tokens)))
    total = min(candidates)
    from linearard_ray.data.streams import default_epoch_rows  # torch: not at the driver's import

    unit = epoch_unit(cfg, world_size)
    for s in streams.values():
        rows_per_epoch = default_epoch_rows(s.num_rows, unit) // world_size
        if rows_per_epoch == 0:
            raise ConfigError(
                f"data: the {s.name} stream has {s.num_rows} blocks of {s.ctx_len} tokens, too few for "
                f"train.num_workers={world_size} × train.micro_batch_size={t.micro_batch_size}"
            )
        epochs = math.ceil(math.ceil(total / every[s.name]) * per_rank_rows / rows_per_epoch)
        if epochs > t.epochs_max:
            raise ConfigError(
                f"train.budget_tokens/train.max_steps: {total} steps need {epochs} passes over the {s.name} stream "
                f"({s.num_rows} blocks), more than train.epochs_max={t.epochs_max}; add data or raise train.epochs_max"
            )
    return total, tokens_per_step


def resolve_storage_path(path: str) -> str:
    """A URI as given; a local path made absolute, a relative one under the output base
    (``linearard_ray.paths``: not Ray's temporary copy of a submitted job's working_dir).
    Workers on other nodes resolve nothing."""
    return output_path(path)


def job_paths(cfg: Config) -> tuple[str, str]:
    """(storage dir, export dir) of the run: ``<storage_path>/<run_name>``, ``<output_dir>/<run_name>``,
    both absolute."""
    storage_dir = f"{resolve_storage_path(cfg.train.storage_path).rstrip('/')}/{cfg.train.run_name}"
    output_dir = f"{output_path(cfg.train.output_dir).rstrip('/')}/{cfg.train.run_name}"
    return storage_dir, output_dir


def fail_marker_path(job: JobSpec) -> str:
    return f"{job.storage_dir.rstrip('/')}/{FAIL_MARKER}"


# --------------------------------------------------------------------------- the streams' data (driver side)


def prepare_streams(cfg: Config) -> tuple[dict[str, StreamSpec], str, dict[str, Any]]:
    """Preprocess (or find) the token blocks of every stream; returns specs, the primary name and
    the Ray datasets."""
    needs_main = cfg.objective.needs_teacher or not cfg.uses_lm_stream()
    wanted = (["train"] if needs_main else []) + (["lm"] if cfg.uses_lm_stream() else [])
    specs: dict[str, StreamSpec] = {}
    datasets: dict[str, Any] = {}
    for name in wanted:
        specs[name], datasets[name] = _prepare_stream(cfg, name)
    primary = "train" if needs_main else "lm"
    return specs, primary, datasets


def _prepare_stream(cfg: Config, name: str) -> tuple[StreamSpec, Any]:
    from linearard_ray.data import preprocess as data_mod

    progress = get_logger(__name__).isEnabledFor(logging.INFO)  # Ray Data's progress lines: not under --quiet
    d = data_mod.ensure_preprocessed(cfg, stream="main" if name == "train" else "lm", progress=progress)
    manifest = data_mod.read_manifest(d)
    get_logger(__name__).info(_stream_summary(name, manifest, d))
    ctx = _manifest_ctx_len(manifest) or (
        cfg.data.ctx_len if name == "train" else (cfg.data.lm_ctx_len or cfg.data.ctx_len)
    )
    n = _manifest_blocks(manifest)
    ds = None
    if n is not None and n * ctx * BYTES_PER_TOKEN <= MATERIALIZE_BYTES:
        ds = _in_memory_blocks(Path(d), manifest)
    if ds is None:
        ds = data_mod.load_blocks(d)
        if n is None:
            n = ds.count()
    # Workers iterate it many times (every epoch, every resume); per-pass progress bars would
    # drown the step lines.
    ds.context.enable_progress_bars = False
    ds.context.enable_operator_progress_bars = False
    return StreamSpec(name=name, directory=str(Path(d).resolve()), num_rows=int(n), ctx_len=int(ctx)), ds


def _stream_summary(name: str, m: dict, directory) -> str:
    """One line on what a stream holds (preprocessing's own lines are progress snapshots)."""
    skipped = f" ({m['docs_skipped']} skipped, reasons in its manifest)" if m.get("docs_skipped") else ""
    return (
        f"[distill] {name} stream: {m.get('docs_used', '?')} documents{skipped}, {m.get('blocks', '?')} blocks of "
        f"{m.get('ctx_len', '?')} tokens ({m.get('tokens_in_blocks', '?')} tokens) in {directory}"
    )


def _in_memory_blocks(directory: Path, manifest: dict):
    """Small corpora: the blocks read once here and put in the object store.

    Every worker reads the whole stream on every epoch (data/streams.py says why); from memory a
    pass launches no read tasks, which on a small cluster would also compete for the CPUs the
    training workers hold. Same rows, same order as ``data.load_blocks``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    shards = manifest.get("shards")
    if not shards or not all(isinstance(s, dict) and "file" in s for s in shards):
        return None
    cols = ["input_ids", "attention_mask", "doc_id", "block_index"]
    tables = [pq.read_table(directory / s["file"], columns=cols) for s in shards]
    return ray.data.from_arrow(pa.concat_tables(tables))


def _manifest_blocks(m: dict) -> int | None:
    for k in ("num_blocks", "blocks", "n_blocks"):
        if isinstance(m.get(k), int):
            return m[k]
    return None


def _manifest_ctx_len(m: dict) -> int | None:
    v = m.get("ctx_len")
    return v if isinstance(v, int) else None
