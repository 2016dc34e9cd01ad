"""The model, RoPE, objective and LoRA sections: what is distilled into what, and how."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from linearard_ray.config.base import ConfigError, Section

# --------------------------------------------------------------------------- model / rope


class ModelConfig(Section):
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


class RopeConfig(Section):
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


class LayerSelection(Section):
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
        try:
            if ":" in s:
                kind, arg = s.split(":", 1)
                if kind in ("first", "last"):
                    return {"strategy": kind, "n": int(arg)}
                if kind == "every":
                    return {"strategy": "every", "k": int(arg)}
                if kind == "range":
                    a, b = arg.split("-", 1)
                    return {"strategy": "range", "start": int(a), "stop": int(b)}
                raise ValueError(kind)
            return {"strategy": "list", "layers": [int(x) for x in s.split(",") if x.strip()]}
        except ValueError:
            raise ValueError(
                f"cannot parse layer selection {v!r}; use all, first:N, last:N, every:K, range:A-B or a list"
            ) from None

    @model_validator(mode="after")
    def _check(self) -> LayerSelection:
        need = {"first": "n", "last": "n", "every": "k", "list": "layers", "range": "start"}
        f = need.get(self.strategy)
        if f and getattr(self, f) is None:
            raise ValueError(f"layer selection strategy {self.strategy!r} needs field {f!r}")
        if self.strategy == "range" and (self.stop is None or self.stop <= self.start):
            raise ValueError("layer selection 'range' needs stop > start")
        return self

    def spelled(self) -> str:
        """The selection as the string form accepts it, e.g. 'last:4' (for messages)."""
        if self.strategy == "all":
            return "all"
        if self.strategy in ("first", "last"):
            return f"{self.strategy}:{self.n}"
        if self.strategy == "every":
            return f"every:{self.k}" + (f" (offset {self.offset})" if self.offset else "")
        if self.strategy == "range":
            return f"range:{self.start}-{self.stop}"
        return ",".join(str(i) for i in self.layers)

    def missing_layers(self, num_layers: int) -> str | None:
        """What this selection names that a model of `num_layers` layers lacks, or None."""
        L = num_layers
        if self.strategy in ("first", "last") and self.n > L:
            return f"{self.n} layers"
        if self.strategy == "every" and self.offset >= L:
            return f"layer {self.offset} (the offset)"
        if self.strategy == "range" and self.stop > L:
            return f"layers up to {self.stop - 1}"
        if self.strategy == "list":
            bad = [i for i in self.layers if not -L <= i < L]
            if bad:
                return f"layer indices {bad}"
        return None

    def check_fits(self, num_layers: int, field: str = "objective.relation.layers", model: str = "the model") -> None:
        """ConfigError naming `field`, the selection and the layer count when the selection names
        a layer the model lacks: a too-large selection is refused rather than quietly cut down."""
        missing = self.missing_layers(num_layers)
        if missing is not None:
            raise ConfigError(
                f"{field}: {self.spelled()!r} selects {missing}, but {model} has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )

    def resolve(self, num_layers: int) -> list[int]:
        """The sorted layer indices this selection picks in a model of `num_layers` layers."""
        L = num_layers
        self.check_fits(L)
        if self.strategy == "all":
            out = list(range(L))
        elif self.strategy == "first":
            out = list(range(self.n))
        elif self.strategy == "last":
            out = list(range(L - self.n, L))
        elif self.strategy == "every":
            out = list(range(self.offset, L, self.k))
        elif self.strategy == "range":
            out = list(range(self.start, self.stop))
        else:
            out = sorted({i % L for i in self.layers})
        if not out:
            raise ConfigError(f"objective.relation.layers selects no layer of a model with {L} layers")
        return out


class RelationTerm(Section):
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
        "ops.relation_kl_triton.set_backward_mode; sweep unless changed), sweep (two recomputes, no "
        "extra memory) or "
        "rowfwd (the forward also keeps the row part of the gradient, an fp32 buffer twice the "
        "size of each student q/k/v, until the backward; faster at head dim 128 from about 2K "
        "tokens, slower at head dim 64 at short lengths: benchmarks/README.md). Both are bitwise "
        "reproducible.",
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

    @model_validator(mode="after")
    def _some_relation(self) -> RelationTerm:
        # A term switched on with every part switched off computes nothing: refuse it here rather
        # than let every worker fail on it.
        if self.weight > 0 and not any(w > 0 for w in self.weights.values()):
            parts = ", ".join(f"weights.{k}=0" for k in self.weights)
            raise ValueError(
                f"objective.relation.weight={self.weight:g} but every per-relation weight is 0 ({parts}): "
                "the relation term would compute nothing; give one of objective.relation.weights.q/k/v/qk "
                "a weight > 0, or set objective.relation.weight=0"
            )
        return self


class LogitTerm(Section):
    weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k_positions: int | None = Field(
        None, ge=1, description="Only the k positions with the largest teacher-student KL contribute."
    )
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk; the full fp32 logits are never materialised.")


class NextTokenTerm(Section):
    weight: float = Field(0.0, ge=0)


class ObjectiveConfig(Section):
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
            raise ValueError(
                "objective: every term has weight 0 (objective.relation.weight, objective.logits.weight, "
                "objective.next_token.weight); nothing to train"
            )
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.relation.weight > 0 or self.logits.weight > 0


# --------------------------------------------------------------------------- lora


class LoraConfig(Section):
    enabled: bool = Field(True, description="LoRA adapters on the target modules; false = full fine-tuning of them.")
    r: int = Field(128, ge=1)
    alpha: float = Field(256.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
