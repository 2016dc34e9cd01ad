"""The data, train and tracking sections: what the job reads, how it trains, where it logs."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from linearard_ray.config.base import Section
from linearard_ray.data.corpus import check_builtin, is_builtin
from linearard_ray.paths import sqlite_uri

# --------------------------------------------------------------------------- data


def _default_sources() -> list[str]:
    return ["builtin:sotu/train"]


class SampleSpec(Section):
    """How text is sampled from the teacher (linearard_ray.data.sampling)."""

    num_samples: int = Field(..., ge=1, description="Samples to write.")
    max_new_tokens: int = Field(2048, ge=1, description="Tokens generated per sample (stops early at EOS).")
    min_tokens: int = Field(64, ge=1, description="Samples that end sooner are skipped (counted).")
    batch_size: int = Field(
        64, ge=1, description="Samples generated at once (on a GPU, large: decoding is overhead-bound)."
    )
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus; below 1 keeps a small teacher's far tail out.")
    seed: int = 0

    @model_validator(mode="after")
    def _reachable(self):
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} is more than max_new_tokens={self.max_new_tokens}: "
                "every sample would be skipped"
            )
        return self


class TeacherSamplesConfig(SampleSpec):
    path: str | None = Field(
        None,
        description="JSONL to write or reuse; default "
        "outputs/data/teacher-samples/<hash of teacher and settings>.jsonl.",
    )

    @field_validator("path")
    @classmethod
    def _jsonl(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".jsonl"):
            raise ValueError(f"must name a .jsonl file, got {v!r}")
        return v


class DataConfig(Section):
    sources: list[str] = Field(
        default_factory=_default_sources,
        description="Files, globs, directories (local, s3://, gs://), 'hf:<dataset>[:split]', "
        "'hf:<dataset>:<config>:[split]' or 'builtin:sotu/<split>'.",
    )
    format: Literal["auto", "text", "jsonl", "json", "parquet"] = Field(
        "auto",
        description="Input format; 'auto' = from each file's extension (.txt/.md, .jsonl/.ndjson, .json, "
        ".parquet; .gz/.bz2/.xz ok).",
    )
    text_column: str = Field(
        "text", description="Field/column holding the document text in jsonl, json and parquet inputs."
    )
    encoding: str = Field(
        "utf-8", description="Text encoding of text, jsonl and json inputs (Python codec name, e.g. latin-1, cp1252)."
    )
    encoding_errors: Literal["skip", "replace"] = Field(
        "skip",
        description="Bytes that are not valid in data.encoding: skip the file (text, json) or line (jsonl), counted "
        "in the report; or replace them with U+FFFD, the replaced characters counted.",
    )
    ctx_len: int = Field(512, ge=8, description="Tokens per training block.")
    pack: bool | Literal["best_fit"] = Field(
        False,
        description="Pack across documents with EOS separators instead of cutting per document. best_fit: "
        "long documents give their own full blocks from their start; short ones (and long ones' remainders) "
        "go whole into the open block they fill best, so none is split across blocks; nothing is dropped.",
    )
    tail: Literal["drop", "pad"] = Field(
        "drop",
        description="What to do with a document's (or the packed stream's) last partial block; best_fit pads.",
    )
    min_doc_tokens: int = Field(64, ge=1, description="Documents with fewer tokens are skipped (and counted).")
    add_bos: bool | None = Field(None, description="Default: what the tokenizer does.")
    add_eos: bool = Field(
        True, description="Append EOS to each document (always on when packing: it separates documents)."
    )
    shuffle: bool = Field(True, description="Seeded shuffle of the blocks before they are written.")
    seed: int = Field(0, description="Seed of the block shuffle.")
    output_dir: str | None = Field(None, description="Where token blocks go; default outputs/data/<hash of config>.")
    preprocessed: str | None = Field(None, description="Directory with manifest.json from an earlier preprocess run.")
    tokenizer_actors: int = Field(1, ge=1, description="Size of the Ray Data tokenizer actor pool.")
    tokenizer_batch_size: int = Field(16, ge=1, description="Documents per tokenizer call.")
    rows_per_shard: int = Field(2048, ge=1, description="Blocks per parquet shard.")
    lm_ctx_len: int | None = Field(
        None, description="Block length for the next-token term's own stream; default ctx_len."
    )
    lm_sources: list[str] | None = Field(None, description="Data for the next-token term; default: sources.")
    lm_every: int = Field(
        1,
        ge=1,
        description="With its own stream, the next-token term gets a batch every N optimizer "
        "steps (1 = every step), so long blocks need not outweigh the KL terms' "
        "short ones in the token budget.",
    )
    teacher_samples: TeacherSamplesConfig | None = Field(
        None,
        description="Text sampled from the teacher before training (on a GPU when train.use_gpu), resumable, "
        "and appended to data.sources; e.g. {num_samples: 2080, batch_size: 1040, top_p: 0.95}.",
    )

    @field_validator("pack", mode="before")
    @classmethod
    def _known_layout(cls, v):
        # One message naming the three layouts, instead of one error per member of the union; a
        # string pydantic reads as a boolean ("yes", "off", ...) stays one.
        if isinstance(v, str) and v != "best_fit":
            try:
                TypeAdapter(bool).validate_python(v)
            except ValidationError:
                raise ValueError(f"must be false (per document), true (packed) or best_fit, not {v!r}") from None
        return v

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
            "".encode(v).decode(v)  # a bytes-to-text codec, not base64 or rot13
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r}; use a Python codec name such as utf-8 or latin-1") from None
        except (TypeError, AttributeError):
            raise ValueError(f"{v!r} is not a text encoding; use one such as utf-8 or latin-1") from None
        return v

    def lm_data_differs(self) -> bool:
        """Whether the next-token term's blocks differ from the KL terms' ones: other sources or
        another block length. Naming the same sources or length again is not a difference."""
        own_sources = self.lm_sources is not None and list(self.lm_sources) != list(self.sources)
        own_length = self.lm_ctx_len is not None and self.lm_ctx_len != self.ctx_len
        return own_sources or own_length


# --------------------------------------------------------------------------- train


# The embedded default's budget: SmolLM2-135M at 512 tokens runs ~6 s a step on two CPU cores,
# so the whole default job (download, conversion, preprocessing, training) stays under 5 minutes.
DEFAULT_MAX_STEPS = 24


# What the in-training held-out evaluation reports for each text domain. The default domain
# (held-out SOTU) reports them under these names; a train.eval_sources domain under
# domain_metric(name, metric), e.g. eval_pydocs_nll_gap.
HELDOUT_METRICS = ("student_nll", "teacher_nll", "nll_gap", "recovery_pct", "long_nll")
# Over all train.eval_sources domains: the mean and the lowest of their recovery_pct.
UNSEEN_MEAN = "unseen_mean_recovery_pct"
UNSEEN_WORST = "unseen_worst_recovery_pct"
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def domain_metric(domain: str, metric: str) -> str:
    """The metric name (MLflow, ray.train.report, tune.metric) of one train.eval_sources domain."""
    return f"eval_{domain}_{metric}"


def _check_domain_name(name: str) -> str:
    # The name becomes part of metric names: keep it to characters MLflow and Tune take as they are.
    if not _DOMAIN_NAME.fullmatch(name):
        raise ValueError(
            f"domain name {name!r}: use letters, digits, '_' and '-' (metrics are named eval_<name>_nll_gap, ...)"
        )
    return name


def _one_source_as_list(v: Any) -> Any:
    # `--set train.eval_sources.pydocs=builtin:pydocs` gives a bare string.
    return [v] if isinstance(v, str) else v


def _check_domain_sources(sources: list[str]) -> list[str]:
    """Structure and built-in names only: whether local files exist is checked by the driver
    (training.checks.check_eval_sources), since workers re-validate this config on other machines."""
    if not sources:
        raise ValueError("no sources: give at least one, e.g. [builtin:pydocs]")
    for src in sources:
        if not src.strip():
            raise ValueError("empty source string")
        if "://" in src or src.startswith("hf:"):
            raise ValueError(
                f"{src!r}: the in-training evaluation reads builtin: corpora and local files, "
                "directories and globs only"
            )
        if is_builtin(src):
            check_builtin(src)
    return sources


EvalDomainName = Annotated[str, AfterValidator(_check_domain_name)]
EvalDomainSources = Annotated[list[str], BeforeValidator(_one_source_as_list), AfterValidator(_check_domain_sources)]


class FsdpConfig(Section):
    offload_teacher: bool = Field(
        False,
        description="Keep the frozen teacher's shards in host memory (FSDP2 CPUOffloadPolicy); each layer is "
        "brought to the GPU for its forward. Saves the teacher's share of GPU memory for PCIe traffic.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free each student layer's gathered parameters after its forward and gather them again for "
        "the backward (FSDP2's ZeRO-3); false keeps them (ZeRO-2: more memory, one all-gather less).",
    )


class TrainConfig(Section):
    run_name: str = Field("linearard-default", description="Deterministic name; starting a job again with it resumes.")
    storage_path: str = Field("outputs/ray", description="Ray Train storage (local dir or s3://).")
    output_dir: str = Field(
        "outputs/students", description="Where the exported student goes (<output_dir>/<run_name>)."
    )
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = Field(None, description="Default: true when the cluster has GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    accelerator_type: str | None = Field(
        None,
        description="GPU model the workers need, e.g. 'A10G', 'A100', 'H100' "
        "(ScalingConfig.accelerator_type; cluster.yaml node types).",
    )
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU in GiB, for the memory estimate of --dry-run (docs/memory.md); default: "
        "from train.accelerator_type's known cards (H100 79.1, H200 139.8, A100-80G 79.1, A10G 22.1, ...).",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole teacher and student. fsdp: both are sharded per decoder "
        "layer over all workers with FSDP2 (fully_shard), for models that do not fit one GPU.",
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="Settings used when parallelism is fsdp.")
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(4, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(5.0, gt=0)
    budget_tokens: int | None = Field(None, ge=1, description="Stop after this many training tokens (all workers).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    epochs_max: int = Field(100, ge=1, description="Upper bound on passes over the data to reach the budget.")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    takeover: bool = Field(
        False,
        description="Take over this run name even if another job seems to hold it (its owner cannot be checked, "
        "e.g. on another host); a lock whose owner is gone is taken over without it. distill --force sets it.",
    )
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    op_backend: Literal["auto", "triton", "torch"] = "auto"
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1, description="Held-out NLL gap every N steps (used by sweeps).")
    eval_texts: int = Field(4, ge=1, description="Held-out blocks for the in-training evaluation.")
    eval_long_len: int | None = Field(None, description="Also report NLL at this length during training.")
    eval_sources: dict[EvalDomainName, EvalDomainSources] = Field(
        default_factory=dict,
        description="Extra held-out text domains for the in-training evaluation, name -> sources (builtin:<corpus>, "
        "local files, directories, globs), e.g. {pydocs: [builtin:pydocs]}; each reports eval_<name>_nll_gap, "
        "eval_<name>_recovery_pct, ... every train.eval_every steps. {} = held-out SOTU only.",
    )
    evaluate_at_end: bool = False
    fail_at_step: int | None = Field(
        None, description="Testing aid: raise once at this step (simulates a worker failure)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, v: Any) -> Any:
        # The embedded default's step budget applies whenever neither budget is given, not only
        # when the whole train section is absent (a `--set train.lr=...` must not drop it).
        if isinstance(v, dict) and "budget_tokens" not in v and "max_steps" not in v:
            v = {**v, "max_steps": DEFAULT_MAX_STEPS}
        return v

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.budget_tokens is None and self.max_steps is None:
            raise ValueError("train: set budget_tokens or max_steps")
        return self

    @model_validator(mode="after")
    def _eval_sources_need_cadence(self) -> TrainConfig:
        # Without eval_every nothing would be measured: say so instead of ignoring the domains.
        if self.eval_sources and self.eval_every is None:
            raise ValueError(
                "train.eval_sources are measured every train.eval_every steps: set train.eval_every, "
                "or train.eval_sources={} for no extra domain"
            )
        return self


# --------------------------------------------------------------------------- tracking


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None,
        description="Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db. A relative sqlite file lands in "
        "$LINEARARD_HOME when set, else the working directory (~/linearard_ray in a `ray job submit --working-dir` "
        "job), like relative output paths.",
    )
    experiment: str = "linearard"
    registered_model: str | None = Field(
        None,
        description="MLflow registered model the exported student becomes a version of (default: train.run_name).",
    )
    recipe: str | None = Field(
        None,
        description="Recipe name on the registered model version and the model card (e.g. the config file's "
        "name); default: objective.name.",
    )
    system_metrics: bool = Field(
        True, description="MLflow system metrics (CPU, memory, disk, network; GPU where NVML is) of rank 0's node."
    )
    system_metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between system-metric samples.")
    log_model_copy: bool = Field(
        False,
        description="Also copy the merged student and the adapter into the run's artifacts. Off: the registered "
        "version points at the exported directory (a copy is still logged when the registry cannot read a local "
        "path: an http tracking server).",
    )

    def resolved_uri(self) -> str:
        """The one URI every process of the job logs to: tracking.tracking_uri, else
        $MLFLOW_TRACKING_URI (a cluster's server), else sqlite:///mlflow.db; a sqlite file given
        relative lands under the output base, as relative output paths do (linearard_ray.paths)."""
        return sqlite_uri(self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


# --------------------------------------------------------------------------- export


class ExportConfig(Section):
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="dtype of the exported merged student; 'auto' = the dtype of the checkpoint the student's "
        "weights came from (bf16 for smollm2-135m).",
    )
