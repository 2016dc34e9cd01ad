"""Distillation on Ray Train V2: one ``TorchTrainer`` job per run name.

The driver (``run_distill``) validates what the config alone cannot (cluster GPUs, data volume
against the budget), preprocesses the data, opens the MLflow run and starts the trainer. Each
worker (``train_loop_per_worker``) holds a frozen teacher and a DDP-wrapped student, streams its
share of the token blocks deterministically, and writes checkpoints that let a failed worker
group, or the same job started again, continue at the exact step with the same data position.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from linearard_ray.config import Config, ConfigError, build_config, domain_metric, dump_config, flatten
from linearard_ray.data.streams import DEFAULT_SHUFFLE_TOKENS, BlockStream, Prefetcher
from linearard_ray.ray_env import ensure_ray, worker_env
from linearard_ray.storage import is_uri, read_text, write_text
from linearard_ray.training.checkpointing import (
    StreamPosition,
    TrainState,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from linearard_ray.training.schedule import build_scheduler

FAIL_MARKER = "linearard_fail_at_step.fired"
# Token blocks up to this size are read by the driver and held in the object store (int32 ids +
# int8 mask per token); larger corpora are streamed from parquet on every pass.
MATERIALIZE_BYTES = 2 << 30
BYTES_PER_TOKEN = 5
JOB_FILE = "linearard_job.json"


# --------------------------------------------------------------------------- job plan (driver side)


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        d = dict(d)
        d["streams"] = {k: StreamSpec(**v) for k, v in d["streams"].items()}
        return cls(**d)


@dataclass
class TrainResult:
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
    for s in streams.values():
        rows_per_epoch = (s.num_rows // world_size) // t.micro_batch_size * t.micro_batch_size
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


def _prepare_streams(cfg: Config) -> tuple[dict[str, StreamSpec], str, dict[str, Any]]:
    """Preprocess (or find) the token blocks of every stream; returns specs, the primary name and
    the Ray datasets."""
    from linearard_ray.data import preprocess as data_mod

    specs: dict[str, StreamSpec] = {}
    datasets: dict[str, Any] = {}
    needs_main = cfg.objective.needs_teacher or not cfg.uses_lm_stream()
    wanted = (["train"] if needs_main else []) + (["lm"] if cfg.uses_lm_stream() else [])
    for name in wanted:
        d = data_mod.ensure_preprocessed(cfg) if name == "train" else data_mod.ensure_preprocessed(cfg, stream="lm")
        manifest = data_mod.read_manifest(d)
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
        specs[name] = StreamSpec(name=name, directory=str(Path(d).resolve()), num_rows=int(n), ctx_len=int(ctx))
        datasets[name] = ds
    primary = "train" if needs_main else "lm"
    return specs, primary, datasets


def _in_memory_blocks(directory: Path, manifest: dict):
    """Small corpora: the blocks read once here and put in the object store.

    Every worker reads the whole stream on every epoch (train_stream.py says why); from memory a
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


# --------------------------------------------------------------------------- storage helpers


def resolve_storage_path(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


# --------------------------------------------------------------------------- worker helpers


def _device_for_worker(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
        return dev
    # Ray sets OMP_NUM_THREADS to the worker's logical CPUs (often 1); on CPU, use this node's cores
    # shared among the workers placed on it.
    import ray.train

    local = max(1, ray.train.get_context().get_local_world_size())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.device("cpu")


def _quiet_libraries() -> None:
    """Weight-loading progress bars from every worker would interleave with the step lines."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def _autocast(cfg: Config, device: torch.device):
    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    if prec == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class ObjectiveModule(torch.nn.Module):
    """The objective as a module whose only submodule is the student.

    The objective runs the student's decoder directly (not its top-level forward), so DDP cannot
    wrap the student itself: its reducer is armed in the wrapper's forward. Wrapping this module
    instead makes one DDP forward = one objective evaluation. The teacher and the objective are
    kept out of the module tree so DDP neither broadcasts nor tracks the frozen teacher.
    """

    def __init__(self, objective, student, teacher):
        super().__init__()
        self.student = student
        self._frozen = {"objective": objective, "teacher": teacher}
        self.last_metrics: dict[str, float] = {}

    def forward(self, batch: dict, lm_batch: dict | None = None) -> torch.Tensor:
        out = self._frozen["objective"](self._frozen["teacher"], self.student, batch, lm_batch)
        self.last_metrics = out.metrics
        return out.loss


def wrap_ddp(module: ObjectiveModule, device: torch.device):
    """DDP over the student's trainable parameters only.

    Frozen weights and buffers are excluded from DDP's start-up broadcast (every rank loads the
    same checkpoint; a 7B base would otherwise be sent over the wire for nothing).
    find_unused_parameters: with a layer selection that stops early, or a relation weight of 0,
    some adapters get no gradient in a step.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    kw: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    # Buffers (RoPE tables) are identical on every rank: no per-forward sync. Newer torch renames
    # the switch; the ignore list above already keeps them out of the start-up sync.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    return DDP(module, find_unused_parameters=True, **kw)


def _num_layers(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.num_hidden_layers)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def say(msg: str) -> None:
    """One line to stdout. Ray Train patches ``print`` in workers and, when stdout is wrapped,
    emits every line twice; writing to the stream directly keeps it once."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, m: dict[str, float], eta_s: float, loss_avg: float | None = None) -> str:
    """One step as a line; ``loss_avg`` (a running mean) shows the trend through per-block noise."""
    rel = " ".join(
        f"{k.removeprefix('relation_')} {m[k]:.4f}"
        for k in ("relation_q", "relation_k", "relation_v", "relation_qk")
        if k in m
    )
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}" + (f" (avg {loss_avg:.4f})" if loss_avg is not None else ""),
    ]
    if rel:
        parts.append(f"rel {rel}")
    for k, label in (("logit_kl", "logit_kl"), ("next_token", "ce")):
        if k in m:
            parts.append(f"{label} {m[k]:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:.0f} tok/s", f"ETA {_fmt_eta(eta_s)}"]
    return "[distill] " + " | ".join(parts)


# --------------------------------------------------------------------------- in-training evaluation


DEFAULT_EVAL_SOURCE = "builtin:sotu/eval"


class HeldOutEval:
    """Mean next-token NLL of the student (and once, the teacher) on the held-out blocks of one
    text domain: the first ``train.eval_texts`` documents of at least ``data.ctx_len`` tokens, cut
    to that length, and with ``train.eval_long_len`` the start of the documents joined.

    Windows are split across workers and the sums all-reduced, so every worker ends with the same
    numbers (they are reported through ``ray.train.report``, where a sweep reads them). Metric
    names carry ``prefix`` (empty for held-out SOTU, ``eval_<name>_`` for a train.eval_sources
    domain); ``field`` is the config field that errors name.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer,
        device: torch.device,
        rank: int,
        world: int,
        *,
        sources: tuple[str, ...] = (DEFAULT_EVAL_SOURCE,),
        prefix: str = "",
        field: str = "train.eval_every",
    ):
        self.cfg, self.device, self.rank, self.world, self.prefix = cfg, device, rank, world, prefix
        T, L = cfg.data.ctx_len, cfg.train.eval_long_len
        ids = self._documents(tokenizer, sources, field)
        short = [d[:T] for d in ids if len(d) >= T][: cfg.train.eval_texts]
        if not short:
            raise ConfigError(f"{field}: no held-out document of {', '.join(sources)} has data.ctx_len={T} tokens")
        self.short = short
        self.long: list[list[int]] = []
        if L:
            flat = [t for d in ids for t in d]
            n = min(max(1, world), len(flat) // L)
            if n == 0:
                raise ConfigError(f"train.eval_long_len={L}: the held-out text of {field} has only {len(flat)} tokens")
            self.long = [flat[i * L : (i + 1) * L] for i in range(n)]
        self.teacher_nll: float | None = None

    def _documents(self, tokenizer, sources: tuple[str, ...], field: str) -> list[list[int]]:
        """Token ids (with EOS) of the documents in order, tokenized only until there are enough
        for the windows: a large domain (all of pydocs) is not tokenized whole on every worker."""
        from linearard_ray.evaluation.texts import TextsError, load_documents

        c = self.cfg
        T, n_short, n_flat = c.data.ctx_len, c.train.eval_texts, self.world * (c.train.eval_long_len or 0)
        try:
            docs = load_documents(sources, c.data.text_column).documents
        except TextsError as e:
            raise ConfigError(f"{field}: {e}") from None
        eos = tokenizer.eos_token_id
        out: list[list[int]] = []
        long_enough = total = 0
        for doc in docs:
            ids = list(tokenizer(doc.text)["input_ids"]) + ([eos] if eos is not None else [])
            out.append(ids)
            long_enough += len(ids) >= T
            total += len(ids)
            if long_enough >= n_short and total >= n_flat:
                break
        return out

    def _mean_nll(self, model, windows: list[list[int]]) -> float:
        from linearard_ray.evaluation.metrics import sequence_nll

        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad(), _autocast(self.cfg, self.device):
            for i, w in enumerate(windows):
                if i % self.world != self.rank:
                    continue
                ids = torch.tensor([w], dtype=torch.long, device=self.device)
                s, c = sequence_nll(model, ids, torch.ones_like(ids))
                total += s
                count += c
        if was_training:
            model.train()
        total, count = _all_reduce_sum([total, float(count)], self.device)
        return total / max(count, 1.0)

    def compute_teacher(self, teacher) -> None:
        self.teacher_nll = self._mean_nll(teacher, self.short)

    def __call__(self, student) -> dict[str, float]:
        from linearard_ray.evaluation.report import restoration

        s = self._mean_nll(student, self.short)
        out = {"student_nll": s}
        if self.teacher_nll is not None:
            out["teacher_nll"] = self.teacher_nll
            out["nll_gap"] = s - self.teacher_nll
            # the evaluation report's recovery: 100 × teacher perplexity ÷ student perplexity
            out["recovery_pct"] = restoration(self.teacher_nll, None, s)["recovery_pct"]
        if self.long:
            out["long_nll"] = self._mean_nll(student, self.long)
        return {self.prefix + k: v for k, v in out.items()}


def held_out_evals(cfg: Config, tokenizer, device: torch.device, rank: int, world: int) -> list[HeldOutEval]:
    """Held-out SOTU, then one evaluation per ``train.eval_sources`` domain (same windows rule,
    same cadence, metrics named ``eval_<name>_<metric>``)."""
    evals = [HeldOutEval(cfg, tokenizer, device, rank, world)]
    for name, sources in cfg.train.eval_sources.items():
        evals.append(
            HeldOutEval(
                cfg,
                tokenizer,
                device,
                rank,
                world,
                sources=tuple(sources),
                prefix=domain_metric(name, ""),
                field=f"train.eval_sources.{name}",
            )
        )
    return evals


def check_eval_sources(cfg: Config) -> None:
    """Driver side, before Ray starts: every local train.eval_sources path exists (the schema
    checked the rest). Workers read them at the same paths, so on a cluster they must be on
    storage every node sees; builtin: corpora ship with the package."""
    from linearard_ray.evaluation.texts import TextsError, check_source

    for name, sources in cfg.train.eval_sources.items():
        for src in sources:
            try:
                check_source(src)
            except TextsError as e:
                raise ConfigError(f"train.eval_sources.{name}: {e}") from None


def check_train_sources(cfg: Config) -> None:
    """Driver side, before Ray starts: every local or built-in training source exists, so a
    mistyped path fails in a second with the field's name rather than a traceback from inside
    preprocessing. Hub sources are left to preprocessing, which may need the network."""
    if cfg.data.preprocessed:
        return  # the manifest's blocks are used; the sources are not read again
    from linearard_ray.data.sources import HF_PREFIX, DataError, resolve_source

    for name, sources in (("data.sources", cfg.data.sources), ("data.lm_sources", cfg.data.lm_sources or [])):
        for i, src in enumerate(sources):
            if src.startswith(HF_PREFIX):
                continue
            try:
                resolve_source(i, src, cfg.data.format, field=name)
            except DataError as e:
                raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------- the worker loop


def _open_stream(name: str, spec: StreamSpec, cfg: Config, rank: int, world: int, start: StreamPosition | None):
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        raise RuntimeError(f"dataset {name!r} was not passed to the trainer")
    buffer = max(1, DEFAULT_SHUFFLE_TOKENS // spec.ctx_len)
    return BlockStream(
        lambda: shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=1),
        num_rows=spec.num_rows,
        rank=rank,
        world_size=world,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed + (0 if name == "train" else 7919),
        shuffle=cfg.data.shuffle,
        shuffle_buffer=buffer,
        max_epochs=cfg.train.epochs_max,
        start=start,
        name=name,
    )


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _fail_marker_path(job: JobSpec) -> str:
    return f"{job.storage_dir.rstrip('/')}/{FAIL_MARKER}"


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker: ``config = {"cfg": <Config as dict>, "job": <JobSpec as dict>}``."""
    import ray.train
    from ray.train import Checkpoint

    from linearard_ray.models import loading as models
    from linearard_ray.objective.loss import Objective

    cfg = build_config(config["cfg"])
    job = JobSpec.from_dict(config["job"])
    _quiet_libraries()
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device_for_worker(job.use_gpu)

    # ---- resume state
    loaded = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            loaded = load_checkpoint(d)
        if loaded.state.world_size != world:
            raise RuntimeError(
                f"checkpoint was written by {loaded.state.world_size} workers; resuming with {world} would change "
                "the data order. Keep train.num_workers or start a new train.run_name."
            )

    # ---- models (identical init on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(t.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    teacher = models.load_teacher(cfg.model, device=device) if cfg.objective.needs_teacher else None
    student = models.load_student(
        cfg.model, cfg.rope, cfg.lora, device=device, gradient_checkpointing=t.gradient_checkpointing
    )
    if loaded is not None:
        models.load_trainable_state_dict(student, loaded.trainable)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the student has no trainable parameters (check lora.target_modules)")

    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, t.warmup_steps, job.total_steps, t.min_lr_ratio)
    own_lm = own_lm_stream(job.streams)
    if loaded is not None:
        optimizer.load_state_dict(loaded.optimizer_state)
        scheduler.load_state_dict(loaded.scheduler_state)
        state = loaded.state
        state.total_steps = job.total_steps
        restore_rng(loaded.rng_states[rank])
    else:
        state = TrainState(
            total_steps=job.total_steps,
            world_size=world,
            mlflow_run_id=job.mlflow_run_id,
            lm_data=StreamPosition() if own_lm else None,
        )
        torch.manual_seed(t.seed + 1000 + rank)  # dropout etc. differ per rank

    objective = Objective(cfg.objective, cfg.rope, _num_layers(student), t.op_backend, own_lm_stream=own_lm)
    every = lm_every(cfg, job.streams)
    loss_module = ObjectiveModule(objective, student, teacher)
    step_fn = wrap_ddp(loss_module, device) if world > 1 else loss_module

    # ---- data
    pin = device.type == "cuda"
    primary = Prefetcher(
        _open_stream(
            job.primary,
            job.streams[job.primary],
            cfg,
            rank,
            world,
            state.data if job.primary == "train" else (state.lm_data or state.data),
        ),
        pin_memory=pin,
    )
    lm_stream = None
    if own_lm:
        lm_stream = Prefetcher(_open_stream("lm", job.streams["lm"], cfg, rank, world, state.lm_data), pin_memory=pin)

    # ---- tracking (rank 0 only)
    logger = None
    run_id = state.mlflow_run_id or job.mlflow_run_id
    if rank == 0 and job.tracking_uri and run_id:
        from linearard_ray.tracking import RunLogger

        logger = RunLogger(job.tracking_uri, run_id)
        params_flat = flatten(cfg)
        params_flat.update(
            {"job.total_steps": job.total_steps, "job.tokens_per_step": job.tokens_per_step, "job.world_size": world}
        )
        for name, spec in job.streams.items():
            params_flat[f"job.{name}.blocks"] = spec.num_rows
            params_flat[f"job.{name}.ctx_len"] = spec.ctx_len
        params_flat["job.primary_stream"] = job.primary
        params_flat["job.teacher_loaded"] = teacher is not None
        params_flat["job.dropped_blocks_per_epoch"] = primary.stream.dropped_per_epoch
        logger.log_params(params_flat)
        if loaded is not None:
            logger.set_tags({"resumed_from_step": state.step})
    state.mlflow_run_id = run_id
    if rank == 0:
        if primary.stream.dropped_per_epoch:
            say(
                f"[distill] {primary.stream.dropped_per_epoch} of {primary.stream.num_rows} blocks per epoch are left out so that "
                f"{world} workers × micro-batch {t.micro_batch_size} divide evenly"
            )
        if loaded is not None:
            say(f"[distill] resumed at step {state.step}/{job.total_steps} ({state.tokens_seen} tokens seen)")

    # ---- held-out evaluation: the teacher's numbers of every domain are measured once, here
    evaluators: list[HeldOutEval] = []
    if t.eval_every:
        evaluators = held_out_evals(cfg, tokenizer, device, rank, world)
        ref = teacher if teacher is not None else models.load_teacher(cfg.model, device=device)
        for ev in evaluators:
            ev.compute_teacher(ref)
        if teacher is None:  # cpt trains without a teacher; it was loaded only for these measurements
            del ref
            if device.type == "cuda":
                torch.cuda.empty_cache()

    fail_at = t.fail_at_step
    # The injected failure fires on the last rank (a worker other than rank 0 when there are two).
    if fail_at is not None and rank != world - 1:
        fail_at = None
    if fail_at is not None:
        if read_text(_fail_marker_path(job)) is not None:
            fail_at = None  # already fired on an earlier attempt

    last_eval: dict[str, float] = {}
    step_times: list[float] = []
    recent_loss: collections.deque[float] = collections.deque(maxlen=10)
    metrics: dict[str, float] = {}
    while state.step < job.total_steps:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        tokens_local = 0
        # drawn on a schedule of the step number, so a resumed run draws where the first would have
        draw_lm = lm_stream is not None and state.step % every == 0
        for micro in range(t.grad_accum):
            host = next(primary)
            host_lm = next(lm_stream) if draw_lm else None
            # counted on the host copies: a count of device tensors would stall on the GPU
            tokens_local += int(host["attention_mask"].sum()) + (int(host_lm["attention_mask"].sum()) if host_lm else 0)
            batch = _to_device(host, device)
            lm_batch = _to_device(host_lm, device) if host_lm is not None else None
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = step_fn.no_sync() if world > 1 and micro < t.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with _autocast(cfg, device):
                    loss = step_fn(batch, lm_batch)
                (loss / t.grad_accum).backward()
            for k, v in loss_module.last_metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / t.grad_accum
        grad_norm_t = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)  # read after the sync below
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        state.step += 1

        keys = sorted(sums)
        reduced = _all_reduce_sum([sums[k] for k in keys] + [float(tokens_local)], device)
        metrics = {k: v / world for k, v in zip(keys, reduced[:-1], strict=False)}
        grad_norm = float(grad_norm_t)
        step_tokens = int(reduced[-1])
        state.tokens_seen += step_tokens
        state.data = primary.position if job.primary == "train" else state.data
        if job.primary == "lm":
            state.lm_data = primary.position
        elif lm_stream is not None:
            state.lm_data = lm_stream.position
        dt = time.perf_counter() - t0
        step_times.append(dt)
        metrics.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=step_tokens / dt,
            step_time_s=dt,
            tokens_seen=float(state.tokens_seen),
            epoch=float(primary.position.epoch),
        )
        if device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30

        if fail_at is not None and state.step == fail_at:
            write_text(_fail_marker_path(job), f"fired at step {state.step}\n")
            raise RuntimeError(f"train.fail_at_step={fail_at}: injected worker failure (rank {rank})")

        is_last = state.step == job.total_steps
        did_eval = bool(evaluators) and (state.step % t.eval_every == 0 or is_last)
        if did_eval:
            last_eval = {k: v for ev in evaluators for k, v in ev(student).items()}
            metrics.update(last_eval)

        recent_loss.append(metrics["loss"])
        if rank == 0:
            recent = step_times[-10:]
            eta = (job.total_steps - state.step) * (sum(recent) / len(recent))
            if state.step % t.log_every == 0 or is_last:
                say(progress_line(state.step, job.total_steps, metrics, eta, sum(recent_loss) / len(recent_loss)))
                if did_eval:
                    say("[distill] eval " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if logger is not None:
                logger.log_metrics(metrics, step=state.step)

        do_ckpt = state.step % t.checkpoint_every == 0 or is_last
        if do_ckpt or did_eval:
            report = {"step": state.step, "tokens_seen": state.tokens_seen, **metrics, **last_eval}
            if do_ckpt:
                rng_states = _gather_objects(capture_rng())
                if rank == 0:
                    with tempfile.TemporaryDirectory(prefix="linearard_ckpt_") as tmp:
                        save_checkpoint(
                            tmp,
                            trainable=models.trainable_state_dict(student),
                            optimizer_state=optimizer.state_dict(),
                            scheduler_state=scheduler.state_dict(),
                            rng_states=rng_states,
                            state=state,
                        )
                        ray.train.report(
                            report,
                            checkpoint=Checkpoint.from_directory(tmp),
                            checkpoint_dir_name=f"checkpoint_step{state.step:07d}",
                        )
                else:
                    ray.train.report(report)
            else:
                ray.train.report(report)

    primary.close()
    if lm_stream is not None:
        lm_stream.close()

    # ---- export (rank 0): the merged student and the adapter
    if rank != 0:
        return None
    out_dir = Path(job.output_dir)
    paths = models.export_student(student, tokenizer, out_dir, cfg.rope)
    (out_dir / "distill_config.yaml").write_text(dump_config(cfg))
    say(f"[distill] student exported to {paths.get('merged', out_dir)}")
    if logger is not None:
        logger.log_text(dump_config(cfg), "config.yaml")
        for name, spec in job.streams.items():
            mf = Path(spec.directory) / "manifest.json"
            if mf.exists():
                logger.log_artifact(mf, f"data/{name}")
        if "adapter" in paths:
            logger.log_artifact(paths["adapter"], "adapter")
        logger.log_artifact(paths["merged"], "student")
        logger.finish("FINISHED")
    return {
        "student_dir": str(paths.get("merged", out_dir)),
        "export_dir": str(out_dir),
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "mlflow_run_id": run_id,
        "metrics": {k: float(v) for k, v in {**metrics, **last_eval}.items()},
    }


# --------------------------------------------------------------------------- driver


def resolve_use_gpu(cfg: Config) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.use_gpu is None:
        return gpus > 0
    if cfg.train.use_gpu and gpus == 0:
        raise ConfigError("train.use_gpu is true but the Ray cluster has no GPUs")
    return cfg.train.use_gpu


def build_trainer(
    cfg: Config,
    job: JobSpec,
    datasets: dict[str, Any],
    *,
    worker_env: dict[str, str] | None = None,
    callbacks: list | None = None,
):
    """The ``TorchTrainer`` for this job (does not start it)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if job.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=job.use_gpu,
        resources_per_worker=resources,
        accelerator_type=t.accelerator_type if job.use_gpu else None,
    )
    storage_root, _, name = job.storage_dir.rstrip("/").rpartition("/")
    run_config = RunConfig(
        name=name,
        storage_path=storage_root,
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        failure_config=FailureConfig(max_failures=t.max_failures),
        worker_runtime_env={"env_vars": worker_env or {}},
        callbacks=callbacks,
    )
    # Every worker reads the whole order-preserving stream and keeps its own rows (train_stream.py
    # says why), so nothing is split here.
    data_config = DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "job": job.to_dict()},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=data_config,
    )


def _open_mlflow_run(cfg: Config, storage_dir: str) -> tuple[str | None, str | None, str | None]:
    """(uri, experiment id, run id): the run recorded for this run name, or a new one."""
    if not cfg.tracking.enabled:
        return None, None, None
    from linearard_ray import tracking

    uri = cfg.tracking.resolved_uri()
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    job_file = f"{storage_dir}/{JOB_FILE}"
    prior = read_text(job_file)
    if prior:
        info = json.loads(prior)
        if info.get("tracking_uri") == uri and info.get("mlflow_run_id"):
            try:
                tracking.RunLogger(uri, info["mlflow_run_id"])  # exists and is marked running again
                return uri, info.get("experiment_id", exp_id), info["mlflow_run_id"]
            except Exception:
                pass  # the run was deleted from the store: start a new one
    run_id = tracking.create_run(uri, exp_id, cfg.train.run_name, tags={"linearard.storage": storage_dir})
    write_text(job_file, json.dumps({"tracking_uri": uri, "experiment_id": exp_id, "mlflow_run_id": run_id}))
    return uri, exp_id, run_id


def prepare_job(cfg: Config) -> tuple[JobSpec, dict[str, Any]]:
    """Everything the driver checks and resolves before any worker starts."""
    storage_dir = f"{resolve_storage_path(cfg.train.storage_path).rstrip('/')}/{cfg.train.run_name}"
    output_dir = str(Path(cfg.train.output_dir).expanduser().resolve() / cfg.train.run_name)
    use_gpu = resolve_use_gpu(cfg)
    streams, primary, datasets = _prepare_streams(cfg)
    total, tokens_per_step = plan_steps(cfg, streams, primary, cfg.train.num_workers)
    uri, exp_id, run_id = _open_mlflow_run(cfg, storage_dir)
    job = JobSpec(
        run_name=cfg.train.run_name,
        storage_dir=storage_dir,
        output_dir=output_dir,
        total_steps=total,
        tokens_per_step=tokens_per_step,
        streams=streams,
        primary=primary,
        use_gpu=use_gpu,
        tracking_uri=uri,
        experiment_id=exp_id,
        mlflow_run_id=run_id,
    )
    return job, datasets


def _check_semantics(cfg: Config) -> None:
    """Checks that need no cluster: fail before Ray starts."""
    t = cfg.train
    if t.eval_long_len is not None and t.eval_long_len < 2:
        raise ConfigError("train.eval_long_len must be at least 2 tokens")
    if t.fail_at_step is not None and t.fail_at_step < 1:
        raise ConfigError("train.fail_at_step must be a step number >= 1")
    if "/" in t.run_name or not t.run_name.strip():
        raise ConfigError(f"train.run_name {t.run_name!r} must be a non-empty name without '/'")
    if cfg.data.lm_every > 1 and not (cfg.uses_lm_stream() and cfg.objective.needs_teacher):
        raise ConfigError(
            f"data.lm_every={cfg.data.lm_every} spaces out the next-token term's own stream between the KL terms' "
            "steps; it needs objective.next_token.weight > 0, a stream of its own (data.lm_sources, or a "
            "data.lm_ctx_len other than data.ctx_len) and a relation or logit term"
        )
    check_eval_sources(cfg)
    check_train_sources(cfg)


def run_distill(cfg: Config, *, callbacks: list | None = None) -> TrainResult:
    """Run (or resume) the distillation job named ``cfg.train.run_name``; export and report where
    the student and the MLflow run are."""
    _check_semantics(cfg)
    uri = cfg.tracking.resolved_uri() if cfg.tracking.enabled else None
    env = worker_env(uri)
    ensure_ray(env)
    from linearard_ray.data.teacher_samples import with_teacher_samples

    cfg = with_teacher_samples(cfg, resolve_use_gpu(cfg))
    job, datasets = prepare_job(cfg)
    print(
        f"[distill] run {job.run_name}: {job.total_steps} steps × {job.tokens_per_step} tokens "
        f"on {cfg.train.num_workers} {'GPU' if job.use_gpu else 'CPU'} worker(s); storage {job.storage_dir}",
        flush=True,
    )
    trainer = build_trainer(cfg, job, datasets, worker_env=env, callbacks=callbacks)
    try:
        result = trainer.fit()  # Train V2 raises on failure; older code paths return result.error
        if result.error is not None:
            raise result.error
    except BaseException:
        if job.mlflow_run_id and job.tracking_uri:
            # FAILED until the same run name is started again, which resumes and reopens this run
            from linearard_ray.tracking import RunLogger

            try:
                RunLogger(job.tracking_uri, job.mlflow_run_id).finish("FAILED")
            except Exception as e:  # never hide the training error behind a tracking one
                print(f"[distill] could not mark the MLflow run failed: {e}", file=sys.stderr, flush=True)
        raise
    ret = result.return_value or {}
    res = TrainResult(
        run_name=job.run_name,
        student_dir=ret.get("student_dir"),
        final_step=int(ret.get("step", 0)),
        tokens_seen=int(ret.get("tokens_seen", 0)),
        metrics=ret.get("metrics", dict(result.metrics or {})),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_dir=job.storage_dir,
        tracking_uri=job.tracking_uri,
        mlflow_experiment_id=job.experiment_id,
        mlflow_run_id=ret.get("mlflow_run_id") or job.mlflow_run_id,
    )
    if cfg.train.evaluate_at_end and res.student_dir:
        res.evaluation = _evaluate_student(cfg, res)
    print(f"[distill] student: {res.student_dir}", flush=True)
    if res.mlflow_run_id:
        from linearard_ray.tracking import run_url

        print(
            f"[distill] MLflow run: {run_url(res.tracking_uri, res.mlflow_experiment_id, res.mlflow_run_id)}",
            flush=True,
        )
    return res


def _evaluate_student(cfg: Config, res: TrainResult) -> dict[str, Any] | None:
    """``train.evaluate_at_end``: the evaluation stage on the exported student; its headline
    numbers are also logged into this training run, its own report and MLflow run stay separate."""
    from linearard_ray.evaluation.evaluate import evaluate_student

    report = evaluate_student(cfg, res.student_dir)
    if res.mlflow_run_id and res.tracking_uri and isinstance(report, dict):
        from linearard_ray.tracking import RunLogger

        numeric = {
            f"eval.{k}": v
            for k, v in flatten(report).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        lg = RunLogger(res.tracking_uri, res.mlflow_run_id)
        try:
            lg.log_metrics(numeric, step=res.final_step)
        except Exception as e:  # a report key MLflow will not take as a metric name
            print(f"[distill] could not log evaluation metrics into the training run: {e}", file=sys.stderr, flush=True)
        if isinstance(report.get("mlflow"), dict) and report["mlflow"].get("run_id"):
            lg.set_tags({"evaluation.mlflow_run_id": report["mlflow"]["run_id"]})
        lg.finish("FINISHED")
    print(
        "[distill] evaluation done"
        + (f": {report.get('output_dir')}" if isinstance(report, dict) and report.get("output_dir") else ""),
        flush=True,
    )
    return report
