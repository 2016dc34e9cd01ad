"""Validated configuration for every stage.

One YAML file describes a whole job; each stage reads its own section. Every model forbids
unknown keys so that a typo fails at load time with the field's dotted path, before any Ray
worker starts.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from linearard_ray.data.corpus import check_builtin, is_builtin


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model / rope


class ModelConfig(_Section):
    teacher: str = Field(
        "smollm2-135m", description="Hub id, local directory, .gguf file, or built-in name 'smollm2-135m'."
    )
    student: str | None = Field(None, description="Checkpoint the student starts from; default: the teacher's weights.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' = bfloat16 on GPU, float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    cache_dir: str | None = Field(
        None, description="Where built-in models are fetched and converted (default ~/.cache/linearard_ray)."
    )


RopeType = Literal["linear", "dynamic", "yarn", "llama3", "longrope"]


class RopeConfig(_Section):
    type: RopeType = Field(
        "linear", description="Student RoPE scaling: linear (PI), dynamic (NTK), yarn, llama3, longrope."
    )
    factor: float = Field(4.0, description="Context extension factor; must be > 1.")
    original_max_position_embeddings: int | None = Field(
        None, description="Native window; default: the teacher's max_position_embeddings."
    )
    max_position_embeddings: int | None = Field(None, description="New window; default: native × factor.")
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # longrope
    long_factor: list[float] | None = None
    short_factor: list[float] | None = None
    yarn_logit_correction: Literal["divide", "keep"] = Field(
        "divide",
        description="YaRN multiplies cos/sin by an attention factor m, so Q·Qᵀ/K·Kᵀ logits carry m²; "
        "'divide' scales the student's relation logits by 1/m² so the loss compares the shapes of the distributions.",
    )

    @field_validator("factor")
    @classmethod
    def _factor_gt_one(cls, v: float) -> float:
        if not v > 1.0:
            raise ValueError(f"rope.factor must be > 1 to extend the context window, got {v}")
        return v


# --------------------------------------------------------------------------- objective


class LayerSelection(_Section):
    """Which decoder layers the relation loss aligns.

    Also accepted as a string: "all", "first:4", "last:8", "every:3", "range:2-10", "0,5,7".
    """

    strategy: Literal["all", "list", "first", "last", "every", "range"] = "all"
    n: int | None = Field(None, ge=1, description="for first/last")
    k: int | None = Field(None, ge=1, description="for every (every k-th layer, starting at offset)")
    offset: int = Field(0, ge=0)
    layers: list[int] | None = Field(None, description="for list")
    start: int | None = Field(None, ge=0, description="for range (inclusive)")
    stop: int | None = Field(None, ge=0, description="for range (exclusive)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {"strategy": "list", "layers": v}
        if not isinstance(v, str):
            return v
        s = v.strip().lower()
        if s == "all":
            return {"strategy": "all"}
        if ":" in s:
            kind, arg = s.split(":", 1)
            if kind in ("first", "last"):
                return {"strategy": kind, "n": int(arg)}
            if kind == "every":
                return {"strategy": "every", "k": int(arg)}
            if kind == "range":
                a, b = arg.split("-", 1)
                return {"strategy": "range", "start": int(a), "stop": int(b)}
        try:
            return {"strategy": "list", "layers": [int(x) for x in s.split(",") if x.strip()]}
        except ValueError:
            raise ValueError(
                f"cannot parse layer selection {v!r}; use all, first:N, last:N, every:K, range:A-B or a list"
            )

    @model_validator(mode="after")
    def _check(self) -> LayerSelection:
        need = {"first": "n", "last": "n", "every": "k", "list": "layers", "range": "start"}
        f = need.get(self.strategy)
        if f and getattr(self, f) is None:
            raise ValueError(f"layer selection strategy {self.strategy!r} needs field {f!r}")
        if self.strategy == "range" and (self.stop is None or self.stop <= self.start):
            raise ValueError("layer selection 'range' needs stop > start")
        return self

    def resolve(self, num_layers: int) -> list[int]:
        """The sorted layer indices this selection picks in a model of `num_layers` layers."""
        L = num_layers
        if self.strategy == "all":
            out = list(range(L))
        elif self.strategy == "first":
            out = list(range(min(self.n, L)))
        elif self.strategy == "last":
            out = list(range(max(0, L - self.n), L))
        elif self.strategy == "every":
            out = list(range(self.offset, L, self.k))
        elif self.strategy == "range":
            out = list(range(self.start, min(self.stop, L)))
        else:
            bad = [i for i in self.layers if not -L <= i < L]
            if bad:
                raise ConfigError(
                    f"objective.relation.layers: layer indices {bad} out of range for a model with {L} layers"
                )
            out = sorted({i % L for i in self.layers})
        if not out:
            raise ConfigError(f"objective.relation.layers selects no layer of a model with {L} layers")
        return out


class RelationTerm(_Section):
    weight: float = Field(1.0, ge=0)
    weights: dict[Literal["q", "k", "v", "qk"], float] = Field(
        default_factory=lambda: {"q": 1.0, "k": 1.0, "v": 1.0},
        description="Per-relation weights (Q/Q, K/K, V/V); a relation left out keeps weight 1, 0 switches it off. "
        "'qk' adds the attention map itself (the causal softmax of Q·Kᵀ, GQA heads shared; off unless given).",
    )
    layers: LayerSelection = Field(default_factory=LayerSelection)
    fused: bool = Field(True, description="One op call per layer for the three relations.")
    backward: Literal["auto", "sweep", "rowfwd"] = Field(
        "auto",
        description="Backward of the Triton relation kernels: auto (the op's process-wide mode, "
        "ops.relation_kl.set_backward_mode; sweep unless changed), sweep (two recomputes, no "
        "extra memory) or "
        "rowfwd (the forward also keeps the row part of the gradient, an fp32 buffer twice the "
        "size of each student q/k/v, until the backward; measured 1.10-1.14x faster at head dim "
        "128 from 2K tokens, slower at head dim 64 below 8K). Both are bitwise reproducible.",
    )
    overlap: bool = Field(
        True,
        description="Start each layer's relations as soon as the student's forward has its "
        "q/k/v, on a second CUDA stream, so they overlap the rest of the forward "
        "and (their backward) the model's backward. Same values; on CPU only "
        "the order changes.",
    )

    @field_validator("weights")
    @classmethod
    def _nonneg(cls, v: dict) -> dict:
        for k, w in v.items():
            if w < 0:
                raise ValueError(f"relation weight {k} must be >= 0, got {w}")
        # Unnamed relations keep the default 1: `--set objective.relation.weights.v=0.5` (or a
        # sweep over weights.v) must not switch Q/Q and K/K off behind the user's back. The
        # attention map (qk) is not part of LinearARD's three: present only when given.
        out = {"q": v.get("q", 1.0), "k": v.get("k", 1.0), "v": v.get("v", 1.0)}
        if "qk" in v:
            out["qk"] = v["qk"]
        return out


class LogitTerm(_Section):
    weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k_positions: int | None = Field(
        None, ge=1, description="Only the k positions with the largest teacher-student KL contribute."
    )
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk; the full fp32 logits are never materialised.")


class NextTokenTerm(_Section):
    weight: float = Field(0.0, ge=0)


class ObjectiveConfig(_Section):
    name: Literal["linearard", "linearard+logits", "cpt", "custom"] = "linearard"
    relation: RelationTerm = Field(default_factory=RelationTerm)
    logits: LogitTerm = Field(default_factory=LogitTerm)
    next_token: NextTokenTerm = Field(default_factory=NextTokenTerm)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, v: Any) -> Any:
        # A named recipe fills in the term weights the user did not set explicitly.
        if not isinstance(v, dict):
            return v
        v = copy.deepcopy(v)
        name = v.get("name", "linearard")
        presets = {
            "linearard": {"relation": 1.0, "logits": 0.0, "next_token": 0.0},
            "linearard+logits": {"relation": 1.0, "logits": 1.0, "next_token": 0.0},
            "cpt": {"relation": 0.0, "logits": 0.0, "next_token": 1.0},
        }
        if name in presets:
            for term, w in presets[name].items():
                sec = v.setdefault(term, {})
                if isinstance(sec, dict):
                    sec.setdefault("weight", w)
        return v

    @model_validator(mode="after")
    def _some_term(self) -> ObjectiveConfig:
        if self.relation.weight == 0 and self.logits.weight == 0 and self.next_token.weight == 0:
            raise ValueError("objective: every term has weight 0; nothing to train")
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.relation.weight > 0 or self.logits.weight > 0


# --------------------------------------------------------------------------- lora


class LoraConfig(_Section):
    enabled: bool = Field(True, description="LoRA adapters on the target modules; false = full fine-tuning of them.")
    r: int = Field(128, ge=1)
    alpha: float = Field(256.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


# --------------------------------------------------------------------------- data


def _default_sources() -> list[str]:
    return ["builtin:sotu/train"]


class SampleSpec(_Section):
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


class DataConfig(_Section):
    sources: list[str] = Field(
        default_factory=_default_sources,
        description="Files, globs, directories (local, s3://, gs://), 'hf:<dataset>[:split]', or 'builtin:sotu/<split>'.",
    )
    format: Literal["auto", "text", "jsonl", "json", "parquet"] = Field(
        "auto",
        description="Input format; 'auto' = from each file's extension (.txt/.md, .jsonl/.ndjson, .json, .parquet; .gz/.bz2/.xz ok).",
    )
    text_column: str = Field(
        "text", description="Field/column holding the document text in jsonl, json and parquet inputs."
    )
    ctx_len: int = Field(512, ge=8, description="Tokens per training block.")
    pack: bool = Field(False, description="Pack across documents with EOS separators instead of cutting per document.")
    tail: Literal["drop", "pad"] = Field("drop", description="What to do with a document's last partial block.")
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
    (train.check_eval_sources), since workers re-validate this config on other machines."""
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


class TrainConfig(_Section):
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
        description="GPU model the workers need, e.g. 'A10G', 'A100', 'H100' (ScalingConfig.accelerator_type; cluster.yaml node types).",
    )
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


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="Default: sqlite:///<cwd>/mlflow.db (one absolute URI for every worker)."
    )
    experiment: str = "linearard"

    def resolved_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


# --------------------------------------------------------------------------- evaluation


class EvalModelSpec(_Section):
    name: str
    path: str = Field(..., description="Hub id, directory, exported student, .gguf or 'smollm2-135m'.")
    rope: RopeConfig | None = Field(None, description="RoPE settings to apply; default: as in the checkpoint.")


class EvalConfig(_Section):
    models: list[EvalModelSpec] = Field(
        default_factory=list, description="Default: teacher, unrestored student, restored student."
    )
    student_path: str | None = Field(None, description="The restored student to evaluate (exported directory).")
    texts: list[str] = Field(default_factory=lambda: ["builtin:sotu/eval"])
    other_texts: list[str] = Field(
        default_factory=lambda: ["builtin:pydocs"],
        description="A second domain not used in training (default: Python 3.11 docs); [] = none.",
    )
    short_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    long_lengths: list[int] = Field(default_factory=lambda: [4096, 8192])
    max_windows: int = Field(8, ge=1, description="Windows per length (more = less noise, more time).")
    passkey_lengths: list[int] = Field(default_factory=lambda: [1024, 4096])
    passkey_depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_trials: int = Field(3, ge=1)
    passkey_choices: int = Field(
        10,
        ge=0,
        description="Forced-choice retrieval beside the greedy answer: the true key "
        "and N-1 seeded distractors are scored by the model's log-probability "
        "after the question, so reading the key is measured apart from how the "
        "model words its answer (chance 1/N); 0 = off.",
    )
    passkey_distractors: Literal["random", "one_digit"] = Field(
        "random",
        description="Where the forced choice's distractors come from: 'random' five-digit keys (any "
        "retrieval tells them apart) or keys 'one_digit' away from the true one (only a model "
        "that holds every digit picks it; at most 45 choices).",
    )
    relation_kl: bool = True
    batch_size: int = Field(1, ge=1)
    seed: int = 0
    output_dir: str = "outputs/eval"
    resume: bool = Field(
        True,
        description="Reuse finished jobs from <output_dir>/jobs.jsonl (same models, inputs "
        "and settings); false = run everything again.",
    )
    device: str = "auto"
    lm_eval_tasks: list[str] = Field(default_factory=list)

    @field_validator("passkey_choices")
    @classmethod
    def _choices(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 leaves nothing to choose between; use 0 to turn the forced choice off, or 2 or more")
        return v

    @model_validator(mode="after")
    def _one_digit_choices(self) -> EvalConfig:
        if self.passkey_distractors == "one_digit" and self.passkey_choices > 45:
            raise ValueError(
                f"passkey_choices: {self.passkey_choices} with passkey_distractors 'one_digit', but a key "
                "has only 44 keys one digit away (at most 45 choices)"
            )
        return self


# --------------------------------------------------------------------------- tune


class TuneConfig(_Section):
    sweep_name: str = "linearard-sweep"
    space: dict[str, Any] = Field(
        default_factory=lambda: {
            "rope.factor": {"grid": [2.0, 4.0]},
            "objective.relation.layers": {"grid": ["all", "last:2"]},
        },
        description="Dotted config path -> {grid: [...]} | {choice: [...]} | {uniform: [a,b]} | {loguniform: [a,b]} | {randint: [a,b]}.",
    )
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(
        1,
        ge=1,
        description="Repeats of the grid (repeat k trains with train.seed + k: "
        "another LoRA init and block order; the summary gives each configuration's mean and range "
        "and the best configuration is the best mean), or samples for "
        "random/optuna.",
    )
    metric: str = "nll_gap"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: int | None = None
    trial_max_failures: int = Field(1, ge=0)
    keep_students: Literal["best", "all"] = Field(
        "best", description="Exported students kept after the sweep: the best trial's, or every trial's."
    )
    storage_path: str = "outputs/tune"


# --------------------------------------------------------------------------- top level


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    rope: RopeConfig = Field(default_factory=RopeConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=DEFAULT_MAX_STEPS))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def uses_lm_stream(self) -> bool:
        """Whether the next-token term reads a stream of blocks of its own (the one place this is
        decided: preprocessing, training and sweeps all ask here)."""
        return self.objective.next_token.weight > 0 and self.data.lm_data_differs()


# --------------------------------------------------------------------------- loading


def _parse_value(raw: str) -> Any:
    return yaml.safe_load(raw) if raw != "" else ""


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """Set d[a][b][c] = value for dotted 'a.b.c', creating sections as needed."""
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


RECIPE_NAMES = ("linearard", "linearard+logits", "cpt")
OBJECTIVE_TERMS = ("relation", "logits", "next_token")


def select_named_objective(raw: dict, values: dict[str, Any]) -> None:
    """Before the dotted `values` are applied to `raw`: when they name an objective recipe, drop
    the term weights `raw` already has, except those set alongside, so the recipe fills them in.

    A written-out config (configs/default.yaml, a dumped best_config.yaml) spells out every weight,
    so `--set objective.name=linearard+logits` on it would otherwise keep logits.weight 0 and train
    plain LinearARD under the other name. 'custom' keeps the weights."""
    if values.get("objective.name") not in RECIPE_NAMES:
        return
    obj = raw.get("objective")
    if not isinstance(obj, dict):
        return
    for term in OBJECTIVE_TERMS:
        sec = obj.get(term)
        if isinstance(sec, dict) and f"objective.{term}.weight" not in values:
            sec.pop("weight", None)


def build_config(data: dict | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Validate a raw dict (plus dotted overrides) into a Config, or raise ConfigError naming the field."""
    raw = copy.deepcopy(data or {})
    select_named_objective(raw, overrides or {})
    for k, v in (overrides or {}).items():
        set_dotted(raw, k, v)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read YAML (or nothing: the embedded default), apply `--set` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded or {}
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return build_config(data, ov)


def dump_config(cfg: Config) -> str:
    """YAML that `load_config` accepts as it is."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> scalar, for MLflow params."""
    d = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
