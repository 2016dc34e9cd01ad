"""How much GPU memory a distillation step needs, per GPU, from the model's config alone.

``estimate_memory(model_config, TrainingSetup(...), gpu_memory_gib)`` counts, for one worker:

- **teacher weights**: every parameter of the frozen teacher in the model's dtype;
- **student weights**: the student's base weights (a RoPE-scaled copy of the teacher's);
- **trainable state**: LoRA's parameters in fp32 (peft keeps adapters of a 16-bit model in
  fp32) with their fp32 gradients and AdamW's two fp32 moments, 16 bytes a parameter (with
  ``lora.enabled`` off: the target modules' own weights, whose gradients and moments take the
  weights' dtype);
- **activations**: the rest of the step's peak, from the phase where the step peaks (below).

Parameter counts are exact for Llama-family decoders (Llama, Mistral, Qwen2/3: q/k/v/o and a
gated MLP per layer, RMSNorm, optional biases and tied embeddings); tests/training/test_memory.py
checks them against models built on the meta device with peft's LoRA.

The step's peak is the largest of three moments, each "what is allocated then":

1. **end of the student's forward**: the checkpointed layer inputs; the captured Q/K/V of the
   student and of the teacher; the relation op's own forward buffers; the autocast cache of the
   LoRA weights cast to bf16; the last layer's MLP working set, or the logit terms' chunk.
2. **backward**: the gradients of all trainable parameters, the relation op's kept buffers, the
   gradients the relation op returns for every layer's q/k/v, and one layer recomputed.
3. **optimizer step**: gradients plus AdamW's temporary, the size of one moment.

Calibrated on the LLaMA-2-7B-shaped step on one H100 (benchmarks/README.md, 'Distillation
step': T=4096, B=1, bf16, gradient checkpointing, LoRA r=1024 on q/k/v, relations on all 32
layers), whose measured peaks are all at the end of the forward: 43.0 GiB without the relation
op (null), 49.1 GiB with the op's default backward, 55.1 GiB with ``rowfwd``. This model gives
42.97, 48.97 and 54.97 GiB there (tests/training/test_memory.py holds it to 0.3 GiB).

Under ``train.parallelism: fsdp`` (linearard_ray/training/fsdp.py) the weights, the trainable
state and AdamW's temporary are divided by the worker count; each model adds what FSDP2 gathers:
its root group (embeddings, final norm) and two decoder layers (the one running and the next,
prefetched), in bf16. The LM head stays whole on every worker. ``offload_teacher`` moves the
teacher's shards to host memory (its gathered layers still come to the GPU). Activations do
not divide: every worker runs its own micro-batch through every layer.

What it leaves out: the CUDA context, NCCL's buffers and the allocator's fragmentation, which a
peak of allocated memory does not show; ``fits`` keeps a margin free for them
(``MARGIN_SHARE`` of the card, at least ``MARGIN_MIN_GIB``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GIB = 2**30

# Kept free of the estimate: the CUDA context (~0.5 GiB), NCCL's communicators and the caching
# allocator's fragmentation are not in a measured torch.cuda.max_memory_allocated() peak.
MARGIN_SHARE = 0.08
MARGIN_MIN_GIB = 2.0

# Memory torch reports for each card (torch.cuda.get_device_properties().total_memory), in GiB.
# Keys are lower-case train.accelerator_type values (Ray's names) and common spellings. A bare
# "A100" is Ray's name for both sizes: the 40 GB one is assumed (the estimate must not promise
# memory the card may lack).
GPU_MEMORY_GIB: dict[str, float] = {
    "h100": 79.1,
    "h100-80g": 79.1,
    "h200": 139.8,
    "h20": 94.6,
    "b200": 178.4,
    "gh200": 94.5,
    "a100": 39.4,
    "a100-40g": 39.4,
    "a100-80g": 79.1,
    "a10g": 22.1,
    "a10": 22.1,
    "l4": 22.0,
    "l40": 44.4,
    "l40s": 44.4,
    "t4": 14.6,
    "v100": 15.8,
    "v100-16g": 15.8,
    "v100-32g": 31.7,
    "rtx4090": 23.6,
    "a6000": 47.5,
}

# How much the captured q/k/v take per layer relative to their heads, per relation.
_SELF_RELATIONS = ("q", "k", "v")


def gpu_memory_gib(accelerator_type: str | None) -> float | None:
    """The memory of a known card (``train.accelerator_type``, case and 'NVIDIA ' ignored), or None."""
    if not accelerator_type:
        return None
    key = accelerator_type.strip().lower().removeprefix("nvidia").strip(" -_").replace(" ", "-")
    return GPU_MEMORY_GIB.get(key)


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a Llama-family decoder's parameters and activations."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = False  # Llama's: a bias on q, k, v and o
    mlp_bias: bool = False
    qkv_bias: bool = False  # Qwen2's: a bias on q, k and v only, whatever attention_bias says

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or a dict with its field names."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
            if get(k) is None
        ]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: not a Llama-family decoder config")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            hidden=hidden,
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate=int(get("intermediate_size")),
            vocab=int(get("vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            qkv_bias=get("model_type") == "qwen2",
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of a decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def module_params(self, name: str) -> int:
        fan_in, fan_out = self.linear_dims()[name]
        if name in ("q_proj", "k_proj", "v_proj"):
            bias = self.attention_bias or self.qkv_bias
        else:
            bias = self.attention_bias if name == "o_proj" else self.mlp_bias
        return fan_in * fan_out + (fan_out if bias else 0)

    def layer_params(self) -> int:
        """One decoder layer: its linear modules and two RMSNorm weights."""
        return sum(self.module_params(n) for n in self.linear_dims()) + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The LM head's own weight (none when tied to the embeddings)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def root_params(self) -> int:
        """What is neither a decoder layer nor the LM head: the embeddings and the final norm."""
        return self.embedding_params() + self.hidden

    def total_params(self) -> int:
        return self.layers * self.layer_params() + self.root_params() + self.head_params()

    def lora_params(self, rank: int, targets: tuple[str, ...] | list[str]) -> int:
        """peft LoRA on ``targets`` of every layer: A is rank × in, B is out × rank."""
        dims = self.linear_dims()
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not modules of a Llama-family layer ({', '.join(dims)})")
        return self.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)

    def target_params(self, targets: tuple[str, ...] | list[str]) -> int:
        """The target modules' own weights (and biases), trained directly when LoRA is off."""
        return self.layers * sum(self.module_params(t) for t in targets)


# --------------------------------------------------------------------------- the step's setup


@dataclass(frozen=True)
class TrainingSetup:
    """One worker's step: what ``estimate_memory`` needs besides the model's shape."""

    seq_len: int
    micro_batch: int = 1
    lora_rank: int = 128
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    lora_enabled: bool = True
    workers: int = 1
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    offload_teacher: bool = False
    gradient_checkpointing: bool = True
    # the relations with a weight above 0: any of q, k, v and qk (the attention map); () = none
    relations: tuple[str, ...] = ("q", "k", "v")
    relation_layers: int | None = None  # how many layers carry relations; None = all
    relation_backward: Literal["default", "rowfwd"] = "default"
    # "null": the benchmark's stand-in for the op (bench_distill_step.py --relation-impl null):
    # q/k/v captured as usual, none of the op's own buffers
    relation_impl: Literal["op", "null"] = "op"
    logit_kl: bool = False
    next_token: bool = False
    next_token_seq_len: int | None = None  # the next-token term's own stream, when its blocks differ
    logit_chunk: int = 1024
    weight_bytes: int = 2  # the models' dtype: 2 for bf16/fp16, 4 for fp32
    activation_bytes: int = 2  # bf16 autocast: 2; fp32 training: 4

    def __post_init__(self):
        bad = [r for r in self.relations if r not in (*_SELF_RELATIONS, "qk")]
        if bad:
            raise ValueError(f"relations {bad}: choose from q, k, v, qk")
        if self.parallelism not in ("ddp", "fsdp"):
            raise ValueError(f"parallelism {self.parallelism!r}: ddp or fsdp")
        if self.relation_impl not in ("op", "null"):
            raise ValueError(f"relation_impl {self.relation_impl!r}: op or null")
        if self.relation_backward not in ("default", "rowfwd"):
            raise ValueError(f"relation_backward {self.relation_backward!r}: default or rowfwd")
        if min(self.seq_len, self.micro_batch, self.lora_rank, self.workers) < 1:
            raise ValueError("seq_len, micro_batch, lora_rank and workers must be at least 1")

    @property
    def needs_teacher(self) -> bool:
        return bool(self.relations) or self.logit_kl

    @property
    def sharded(self) -> bool:
        return self.parallelism == "fsdp"


# --------------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Per-GPU bytes; ``parts`` holds the terms of the phase the step peaks in."""

    teacher_weights: int
    student_weights: int
    trainable_state: int
    activations: int
    trainable_params: int
    peak_phase: str
    gpu_memory_gib: float | None = None
    parts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.teacher_weights + self.student_weights + self.trainable_state + self.activations

    @property
    def margin_gib(self) -> float | None:
        if self.gpu_memory_gib is None:
            return None
        return max(MARGIN_MIN_GIB, MARGIN_SHARE * self.gpu_memory_gib)

    @property
    def headroom_gib(self) -> float | None:
        """GPU memory left after the estimate and the margin (negative: it does not fit)."""
        if self.gpu_memory_gib is None:
            return None
        return self.gpu_memory_gib - self.margin_gib - self.total / GIB

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_gib is None else self.headroom_gib >= 0

    def breakdown_line(self) -> str:
        g = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
        return (
            f"teacher weights {g(self.teacher_weights)}, student weights {g(self.student_weights)}, "
            f"trainable state {g(self.trainable_state)} ({self.trainable_params / 1e6:.1f}M parameters), "
            f"activations {g(self.activations)}: peak {g(self.total)} (at the {self.peak_phase})"
        )

    def verdict_line(self, card: str | None = None) -> str:
        if self.gpu_memory_gib is None:
            return "no verdict: the GPU's memory is unknown (set train.accelerator_type or train.gpu_memory_gib)"
        where = f"{card}, {self.gpu_memory_gib:.1f} GiB" if card else f"{self.gpu_memory_gib:.1f} GiB"
        kept = f"{self.margin_gib:.1f} GiB kept free for the CUDA context, NCCL and fragmentation"
        if self.fits:
            return f"fits ({where}; {kept}; headroom {self.headroom_gib:.1f} GiB)"
        return f"does NOT fit ({where}; {kept}; {-self.headroom_gib:.1f} GiB short)"


def _weights(shape: ModelShape, s: TrainingSetup) -> tuple[int, int]:
    """Per-GPU weight bytes of (teacher, student). Under FSDP: each model's shard of everything
    but the LM head (never sharded: fsdp.py reads it outside any forward), the whole head, and
    what FSDP2 gathers, in bf16 under mixed precision (fsdp.py's MixedPrecisionPolicy): the root
    group (embeddings, final norm) and two decoder layers, the running one and the prefetched next;
    the student's with their LoRA adapters."""
    wb = s.weight_bytes
    if not s.sharded:
        return (shape.total_params() * wb if s.needs_teacher else 0), shape.total_params() * wb
    shard = math.ceil((shape.total_params() - shape.head_params()) / s.workers) * wb
    head = shape.head_params() * wb
    gather_b = min(wb, 2)
    gathered = (2 * shape.layer_params() + shape.root_params()) * gather_b
    lora = shape.lora_params(s.lora_rank, s.lora_targets) if s.lora_enabled else 0
    student = shard + head + gathered + 2 * (lora // max(shape.layers, 1)) * gather_b
    if not s.needs_teacher:
        return 0, student
    # offload_teacher: the teacher's shards stay in host memory; gathered layers still come over
    teacher = (0 if s.offload_teacher else shard) + head + gathered
    return teacher, student


def _trainable(shape: ModelShape, s: TrainingSetup) -> tuple[int, int, int, int]:
    """(parameters, bytes of their weights, bytes of their gradients, bytes of one AdamW moment),
    per GPU. LoRA weights are fp32 (peft's autocast_adapter_dtype upcasts 16-bit adapters); with
    LoRA off the target weights train in the model's dtype (already counted in the student's
    weights, so their own bytes are 0 here)."""
    n = s.workers if s.sharded else 1
    if s.lora_enabled:
        p = shape.lora_params(s.lora_rank, s.lora_targets)
        share = math.ceil(p / n)
        return p, share * 4, share * 4, share * 4
    p = shape.target_params(s.lora_targets)
    share = math.ceil(p / n)
    return p, 0, share * s.weight_bytes, share * s.weight_bytes


def _captured(shape: ModelShape, s: TrainingSetup) -> int:
    """Bytes of the post-RoPE q/k/v the relations read, student and teacher, over the relation
    layers (models/capture.py: q has the query heads, k and v the KV heads, in the compute dtype)."""
    need = set(s.relations) & set(_SELF_RELATIONS)
    if "qk" in s.relations:
        need |= {"q", "k"}
    heads = sum(shape.heads if r == "q" else shape.kv_heads for r in need)
    tokens = s.micro_batch * s.seq_len
    return 2 * _relation_layers(shape, s) * heads * shape.head_dim * tokens * s.activation_bytes


def _relation_layers(shape: ModelShape, s: TrainingSetup) -> int:
    if not s.relations:
        return 0
    return shape.layers if s.relation_layers is None else min(s.relation_layers, shape.layers)


def _op_calls_heads(shape: ModelShape, s: TrainingSetup) -> int:
    """Heads the relation op's calls of one layer cover (self-relations plus the attention map's
    query heads), the unit of its per-head buffers."""
    return sum(shape.heads if r in ("q", "qk") else shape.kv_heads for r in s.relations)


def _op_copies(shape: ModelShape, s: TrainingSetup) -> int:
    """The relation op's working copies of its inputs, alive from its forward to its backward.

    Measured, not derived: on the 7B step the op's default path peaks 6.1 GiB above the step with
    a null relation in its place (49.1 vs 43.0 GiB), the size of the captured student and teacher
    q/k/v; its layout step (ops/relation_kl_triton.py, _same_layout) copies a layer's tensors when
    the student's and the teacher's strides differ. The attention map's call copies its q and k
    again."""
    copies = _captured(shape, s)
    if "qk" in s.relations and any(r in s.relations for r in _SELF_RELATIONS):
        tokens = s.micro_batch * s.seq_len
        qk = (shape.heads + shape.kv_heads) * shape.head_dim * tokens * s.activation_bytes
        copies += 2 * _relation_layers(shape, s) * qk
    return copies


def _rowfwd_buffers(shape: ModelShape, s: TrainingSetup) -> int:
    """rowfwd keeps R = O_s - O_t, fp32 [B, H, T, D], per relation call from its forward to its
    backward (ops/relation_kl_triton.py: 4·B·H·T·D bytes)."""
    if s.relation_backward != "rowfwd" or not s.relations:
        return 0
    tokens = s.micro_batch * s.seq_len
    return _relation_layers(shape, s) * _op_calls_heads(shape, s) * shape.head_dim * tokens * 4


def _relation_grads(shape: ModelShape, s: TrainingSetup) -> int:
    """The gradients the relation op hands back for every relation layer's student q/k/v: when
    the relations run after the forward, autograd runs all their backward nodes first (highest
    sequence numbers), so all of them wait for their layers at once (measured on a CPU trace)."""
    return _captured(shape, s) // 2 if s.relations else 0


def _layer_saved(shape: ModelShape, s: TrainingSetup) -> int:
    """Bytes one decoder layer saves for the backward with frozen base weights (a frozen linear
    keeps no input): two RMSNorms' fp32 inputs, SDPA's q/k/v/out, the gated MLP's gate, up and
    SiLU(gate), and per LoRA target its input cast to the compute dtype plus A's output."""
    a, tokens = s.activation_bytes, s.micro_batch * s.seq_len
    dims = shape.linear_dims()
    per_token = 2 * 4 * shape.hidden
    per_token += a * (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim
    per_token += 3 * a * shape.intermediate
    if s.lora_enabled:
        per_token += sum(a * (dims[t][0] + s.lora_rank) for t in s.lora_targets)
    else:
        per_token += sum(a * dims[t][0] for t in s.lora_targets)
    return per_token * tokens


def _loss_head(shape: ModelShape, s: TrainingSetup) -> tuple[int, int]:
    """(kept, transient) bytes of the logit KL and next-token terms (ops/logit_kl.py): both final
    hidden states are kept for their backward; one chunk of fp32 logits [chunk, V] at a time,
    the student's and the teacher's with their softmax work (4 chunks) for the KL, 2 for CE."""
    tokens = s.micro_batch * s.seq_len
    chunk = min(s.logit_chunk, tokens) * shape.vocab * 4
    kept, transient = 0, 0
    if s.logit_kl:
        kept += 2 * tokens * shape.hidden * s.activation_bytes
        transient = max(transient, 4 * chunk)
    if s.next_token:
        kept += tokens * shape.hidden * s.activation_bytes
        transient = max(transient, 2 * chunk)
    return kept, transient


def _stored_inputs(shape: ModelShape, s: TrainingSetup, saved: int) -> int:
    """What the forward keeps for the backward: every layer's input under gradient checkpointing,
    else every layer's saved activations; the next-token term's own forward adds its share."""
    a, L = s.activation_bytes, shape.layers
    tokens = s.micro_batch * s.seq_len
    stored = L * tokens * shape.hidden * a if s.gradient_checkpointing else L * saved
    if s.next_token_seq_len and s.next_token:  # the next-token term's own forward, same step
        if s.gradient_checkpointing:
            stored += L * s.micro_batch * s.next_token_seq_len * shape.hidden * a
        else:
            stored += L * _layer_saved(shape, replace(s, seq_len=s.next_token_seq_len))
    return stored


def _step_phases(shape: ModelShape, s: TrainingSetup, n_train: int, train_g: int, moment: int) -> dict:
    """Bytes held beyond the static weights and state in each phase of the step, by part."""
    a, tokens = s.activation_bytes, s.micro_batch * s.seq_len
    saved = _layer_saved(shape, s)
    stored = _stored_inputs(shape, s, saved)
    stored_name = "stored layer inputs" if s.gradient_checkpointing else "saved activations"
    op = s.relation_impl == "op" and bool(s.relations)
    copies = _op_copies(shape, s) if op else 0
    rowfwd = _rowfwd_buffers(shape, s) if op else 0
    # autocast caches the bf16 casts of fp32 leaf weights until it exits (the whole objective
    # call); FSDP's mixed precision gathers LoRA in bf16 already, so nothing is cast there
    cast_cache = n_train * 2 if (s.lora_enabled and a == 2 and not s.sharded) else 0
    head_kept, head_transient = _loss_head(shape, s)
    # the last layer's MLP at the end of the forward: gate, up, SiLU(gate) and their product
    mlp_working = 4 * tokens * shape.intermediate * a + tokens * shape.hidden * a
    fwd = {
        stored_name: stored,
        "captured q/k/v": _captured(shape, s),
        "relation op copies": copies,
        "rowfwd buffers": rowfwd,
        "autocast weight cache": cast_cache,
        "logit/next-token hidden states": head_kept,
        "working set": max(mlp_working, head_transient),
    }
    bwd = {
        stored_name: stored,
        "trainable gradients": train_g,
        "relation op copies": copies,
        "rowfwd buffers": rowfwd,
        "relation gradients": _relation_grads(shape, s) if op else 0,
        # one layer recomputed and its backward's transients, about as large again
        "working set": 2 * saved if s.gradient_checkpointing else saved,
    }
    opt = {
        "trainable gradients": train_g,
        "relation op copies": copies,  # the op's context lives as long as the loss's graph
        "AdamW temporary": moment,  # foreach AdamW's sqrt of the second moment
    }
    return {"end of the forward": fwd, "backward": bwd, "optimizer step": opt}


def estimate_memory(model_config: Any, setup: TrainingSetup, gpu_memory_gib: float | None = None) -> MemoryEstimate:
    """Per-GPU memory of one training step (module docstring: what is counted and how)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    s = setup
    teacher_w, student_w = _weights(shape, s)
    n_train, train_w, train_g, moment = _trainable(shape, s)
    # DDP's gradient buckets: a flat copy of every trainable gradient (gradient_as_bucket_view off)
    buckets = train_g if s.parallelism == "ddp" and s.workers > 1 else 0
    static = teacher_w + student_w + train_w + 2 * moment + buckets
    phases = _step_phases(shape, s, n_train, train_g, moment)
    totals = {name: sum(p.values()) for name, p in phases.items()}
    peak = max(totals, key=totals.get)
    trainable_state = train_w + train_g + 2 * moment + buckets
    # what the peak phase holds beyond the weights and the whole trainable state (the forward's
    # peak comes before any gradient exists, so there this is its activations less the gradients)
    activations = static + totals[peak] - teacher_w - student_w - trainable_state
    return MemoryEstimate(
        teacher_weights=teacher_w,
        student_weights=student_w,
        trainable_state=trainable_state,
        activations=activations,
        trainable_params=n_train,
        peak_phase=peak,
        gpu_memory_gib=gpu_memory_gib,
        parts={k: v for k, v in phases[peak].items() if v},
        phases={k: static + v for k, v in totals.items()},
    )


# --------------------------------------------------------------------------- from a job's config


def setup_from_config(cfg, model_config: Any, **changes: Any) -> TrainingSetup:
    """The ``TrainingSetup`` of a job's config (``linearard_ray.config.Config``) on a GPU, with
    ``changes`` to its fields on top (what-if questions: more workers, another block length)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    o, t = cfg.objective, cfg.train
    relations = ()
    if o.relation.weight > 0:
        relations = tuple(r for r in (*_SELF_RELATIONS, "qk") if o.relation.weights.get(r, 0.0) > 0)
    lm_len = cfg.data.lm_ctx_len if cfg.data.lm_ctx_len not in (None, cfg.data.ctx_len) else None
    fields = dict(
        seq_len=cfg.data.ctx_len,
        micro_batch=t.micro_batch_size,
        lora_rank=cfg.lora.r,
        lora_targets=tuple(cfg.lora.target_modules),
        lora_enabled=cfg.lora.enabled,
        workers=t.num_workers,
        parallelism=t.parallelism,
        offload_teacher=t.fsdp.offload_teacher,
        gradient_checkpointing=t.gradient_checkpointing,
        relations=relations,
        relation_layers=len(o.relation.layers.resolve(shape.layers)) if relations else None,
        relation_backward="rowfwd" if o.relation.backward == "rowfwd" else "default",
        logit_kl=o.logits.weight > 0,
        next_token=o.next_token.weight > 0,
        next_token_seq_len=lm_len if o.next_token.weight > 0 else None,
        logit_chunk=o.logits.chunk_size,
        # on a GPU model.dtype auto and train.precision auto are bf16 (models.loading.resolve_dtype)
        weight_bytes=4 if cfg.model.dtype in ("float32", "fp32") else 2,
        activation_bytes=4 if t.precision == "fp32" else 2,
    )
    fields.update(changes)
    return TrainingSetup(**fields)


def config_gpu_memory(cfg) -> tuple[float | None, str | None]:
    """(GiB, the card's name) from ``train.gpu_memory_gib``, else ``train.accelerator_type``."""
    t = cfg.train
    given = getattr(t, "gpu_memory_gib", None)
    if given is not None:
        return float(given), t.accelerator_type or "train.gpu_memory_gib"
    return gpu_memory_gib(t.accelerator_type), t.accelerator_type


def estimate_for_config(cfg, model_config: Any, gpu_memory: float | None = None, **changes: Any) -> MemoryEstimate:
    """Per-GPU estimate of a job's config; ``gpu_memory`` (GiB) defaults to the config's card."""
    if gpu_memory is None:
        gpu_memory = config_gpu_memory(cfg)[0]
    return estimate_memory(model_config, setup_from_config(cfg, model_config, **changes), gpu_memory)


def what_would_fit(cfg, model_config: Any, gpu_memory: float, max_workers: int = 64) -> list[str]:
    """Changes to a config that does not fit ``gpu_memory`` GiB under which the estimate fits:
    fsdp over the fewest workers (with the teacher offloaded if that takes fewer), a shorter
    block or a smaller LoRA rank (halved until it fits). Empty when nothing tried fits."""
    fits = lambda **ch: estimate_for_config(cfg, model_config, gpu_memory, **ch).fits  # noqa: E731
    out = []
    start = max(cfg.train.num_workers if cfg.train.parallelism == "fsdp" else 1, 1)
    counts = range(start, max_workers + 1)
    whole = next((n for n in counts if fits(parallelism="fsdp", workers=n, offload_teacher=False)), None)
    if whole is not None and (whole > cfg.train.num_workers or cfg.train.parallelism != "fsdp"):
        out.append(f"train.parallelism=fsdp with train.num_workers={whole}")
    fewer = range(start, whole or max_workers + 1)  # offloading is worth naming only if it saves GPUs
    offloaded = next((n for n in fewer if fits(parallelism="fsdp", workers=n, offload_teacher=True)), None)
    if offloaded is not None:
        out.append(f"train.parallelism=fsdp with train.num_workers={offloaded}, train.fsdp.offload_teacher=true")
    for name, key, value, floor in (
        ("data.ctx_len", "seq_len", cfg.data.ctx_len, 256),
        ("lora.r", "lora_rank", cfg.lora.r, 8),
    ):
        v = value // 2
        while v >= floor and not fits(**{key: v}):
            v //= 2
        if v >= floor:
            out.append(f"{name}={v}")
    return out


def plan_lines(cfg, model_config: Any) -> list[str]:
    """The dry run's memory lines: the per-GPU breakdown, the verdict and, when it does not fit,
    what would."""
    gib, card = config_gpu_memory(cfg)
    est = estimate_for_config(cfg, model_config, gib)
    how = f"{cfg.train.parallelism}, {cfg.train.num_workers} worker(s)"
    if cfg.train.parallelism == "fsdp" and cfg.train.fsdp.offload_teacher:
        how += ", teacher offloaded"
    lines = [f"memory per GPU ({how}; estimate, docs/memory.md): {est.breakdown_line()}"]
    lines.append(f"memory verdict: {est.verdict_line(card)}")
    if est.fits is False:
        fixes = what_would_fit(cfg, model_config, gib)
        lines.append(
            "memory: would fit with "
            + ("; or ".join(fixes) if fixes else "none of fsdp, offload, a shorter block or a smaller rank alone")
        )
    return lines
