"""Time one LinearARD distillation step of a LLaMA-2-7B-shaped model on one GPU, without Ray.

    python benchmarks/bench_distill_step.py                      # 32 layers, H=32, D=128, T=4096
    python benchmarks/bench_distill_step.py --layers 8           # shrink to fit / to iterate fast
    python benchmarks/bench_distill_step.py --tiny               # CPU smoke run of the same code
    python benchmarks/bench_distill_step.py --objective-config configs/smollm2-135m-x4-restore-long.yaml
    python benchmarks/bench_distill_step.py --parallelism ddp,fsdp --workers 2   # 2 GPUs, DDP then FSDP2

What one step is, exactly as the training loop runs it: teacher forward without gradients with
Q/K/V capture, student (PI×8, LoRA r=1024/α=2048 on q/k/v) forward with capture, the relation KL
of all three relations on every layer (``linearard_ray.objective.loss.Objective`` → ``linearard_ray.ops``),
backward, gradient clipping, AdamW. Weights are random (the shapes are what cost time).

``--objective-config`` times a recipe's objective instead (its relation weights and layers, the
attention map, logit KL and next-token terms: the step users run); ``--relation-weights q=0,k=0``
times V/V alone. ``--parallelism ddp,fsdp`` with ``--workers N`` runs the step in N spawned
processes (one per GPU, NCCL; gloo on CPU): DDP over the LoRA gradients, or FSDP2 sharding of both
models (``linearard_ray.training.fsdp.shard_models``, ``--offload-teacher``).

Reported: tokens/s per GPU (one worker's micro-batch over its step), the share of the step spent
in the relation loss (forward and backward of the relation ops, timed with CUDA events placed
around them: the backward events fire from identity autograd nodes wrapped around the ops' inputs
and outputs), and peak memory per rank beside what the memory model
(``linearard_ray.training.memory``) predicts for the same setup.
Only torch, transformers, peft and this package are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "linearard_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from linearard_ray import ops  # noqa: E402
from linearard_ray.config import ObjectiveConfig, RelationTerm, RopeConfig  # noqa: E402
from linearard_ray.models.loading import enable_checkpointing  # noqa: E402
from linearard_ray.models.rope import apply_rope_scaling  # noqa: E402
from linearard_ray.objective.loss import Objective  # noqa: E402
from linearard_ray.objective.side_stream import SideStream  # noqa: E402

# --------------------------------------------------------------------------- timing of the loss


class _Clock:
    """Marks on the device timeline: CUDA events on GPU, wall time on CPU (synchronous there)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []  # (kind, start_mark, end_mark)

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def total_ms(self, kind: str | None = None) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        out = 0.0
        for k, a, b in self.spans:
            if kind is None or k == kind:
                out += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out

    def reset(self) -> None:
        self.spans.clear()


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``fn`` (marks the moment a gradient passes through)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.fn()
        return g, None


def instrument_relation_ops(clock: _Clock):
    """Wrap ops.relation_kl_layer / ops.relation_kl so every call records forward and backward spans.

    Backward span: from the gradient reaching the op's outputs (start) to the last gradient
    leaving towards its student inputs (end); autograd runs the op's backward node in between.
    """
    orig_layer, orig_single = ops.relation_kl_layer, ops.relation_kl

    def timed(fn, student_args: int):
        def wrapper(*args, **kwargs):
            state = {"start": None, "pending": 0}
            args = list(args)

            def end():
                state["pending"] -= 1
                if state["pending"] == 0:
                    clock.spans.append(("bwd", state["start"], clock.mark()))

            for i in range(student_args):
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                    state["pending"] += 1
                    args[i] = _Mark.apply(args[i], end)
            t0 = clock.mark()
            out = fn(*args, **kwargs)
            clock.spans.append(("fwd", t0, clock.mark()))
            outs = out if isinstance(out, tuple) else (out,)
            n_grad = sum(1 for o in outs if o.requires_grad)
            seen = {"n": 0}

            def start():
                seen["n"] += 1
                if seen["n"] == 1:
                    state["start"] = clock.mark()

            outs = tuple(_Mark.apply(o, start) if o.requires_grad else o for o in outs)
            del n_grad
            return outs if isinstance(out, tuple) else outs[0]

        return wrapper

    ops.relation_kl_layer = timed(orig_layer, 3)
    ops.relation_kl = timed(orig_single, 2)
    return lambda: (setattr(ops, "relation_kl_layer", orig_layer), setattr(ops, "relation_kl", orig_single))


_NULL_GRADS: dict[tuple, torch.Tensor] = {}


def _null_grad(shape, dtype, device) -> torch.Tensor:
    # Fixed random values, not zeros: GEMMs on all-zero operands draw less power and clock higher
    # (measured: the step's GEMMs ran faster behind zero gradients; benchmarks/README.md), which flatters the
    # baseline. One cached tensor per shape: nothing is generated inside the timed steps.
    key = (tuple(shape), dtype, device)
    g = _NULL_GRADS.get(key)
    if g is None:
        gen = torch.Generator(device=device).manual_seed(7)
        g = _NULL_GRADS[key] = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(dtype)
    return g


class _NullRelation(torch.autograd.Function):
    """Zero loss with fixed random gradients in the relation op's place: the step with every other
    kernel the relation loss brings (capture, casts, the student backward it drives), which the real
    op's step is compared with to get the time the op adds."""

    @staticmethod
    def forward(ctx, n_out, *students):
        ctx.shapes = [(s.shape, s.dtype) for s in students]
        ctx.device = students[0].device
        return tuple(torch.zeros((), device=ctx.device) for _ in range(n_out))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(_null_grad(shape, dt, ctx.device) for shape, dt in ctx.shapes))


def _install_relation(apply):
    """Route ops.relation_kl_layer / ops.relation_kl to ``apply(n_out, *students)`` (the teachers
    and keyword arguments are ignored); returns the undo."""
    orig_layer, orig_single = ops.relation_kl_layer, ops.relation_kl

    def layer(sq, sk, sv, *teachers, **kw):
        return apply(3, sq, sk, sv)

    def single(sq, sk=None, *teachers, **kw):
        return apply(1, *(x for x in (sq, sk) if x is not None))[0]

    ops.relation_kl_layer, ops.relation_kl = layer, single
    return lambda: (setattr(ops, "relation_kl_layer", orig_layer), setattr(ops, "relation_kl", orig_single))


def install_null_relation():
    """Route the relation calls to _NullRelation; returns the undo."""
    return _install_relation(_NullRelation.apply)


class _AttentionProxy(torch.autograd.Function):
    """In the op's place, causal SDPA attention forward and backward of each relation's own
    student tensor (q = k = v = X, [B, H, T, D]): how much of the step the relation loss would take
    if it ran exactly as fast as that attention kernel does on the same shape (attention's
    forward+backward is 7 products of T²D/2 per head, the relation op's 7 with rowfwd, 6 at its
    floor). Zero loss; the gradient X gets is attention's own dX for fixed random output grads."""

    @staticmethod
    def forward(ctx, backend, n_out, *students):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not students[0].is_cuda:  # CPU (tests): the forced GPU backends do not exist there
            backend = SDPBackend.MATH
        ctx.backend, ctx.xs, ctx.outs = backend, [], []
        with torch.enable_grad(), sdpa_kernel(backend):
            for s in students:
                x = s.detach().requires_grad_(True)
                ctx.xs.append(x)
                ctx.outs.append(torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True))
        return tuple(torch.zeros((), device=students[0].device) for _ in range(n_out))

    @staticmethod
    def backward(ctx, *grads):
        from torch.nn.attention import sdpa_kernel

        gos = [_null_grad(o.shape, o.dtype, o.device) for o in ctx.outs]
        with sdpa_kernel(ctx.backend):
            dxs = torch.autograd.grad(ctx.outs, ctx.xs, gos)
        ctx.xs = ctx.outs = None
        return (None, None, *dxs)


def install_attention_proxy(backend_name: str):
    """Route ops.relation_kl_layer / ops.relation_kl to _AttentionProxy with SDPA's cudnn or flash
    backend forced; returns the undo."""
    from torch.nn.attention import SDPBackend

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    return _install_relation(lambda n_out, *xs: _AttentionProxy.apply(backend, n_out, *xs))


# --------------------------------------------------------------------------- models


def build_models(a, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.native,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(hf).to(dtype)
    teacher.eval().requires_grad_(False)
    rope = RopeConfig(type="linear", factor=a.factor, original_max_position_embeddings=a.native)
    student = LlamaForCausalLM(apply_rope_scaling(copy.deepcopy(hf), rope)).to(dtype)
    student.load_state_dict(teacher.state_dict())
    student.to(device).requires_grad_(False)
    if a.grad_checkpointing:
        enable_checkpointing(student)  # the same switch load_student uses
    student = get_peft_model(
        student,
        LoraConfig(
            r=a.lora_r,
            lora_alpha=a.lora_alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    student.train()
    return teacher, student, rope


# --------------------------------------------------------------------------- main


def _weights(text: str) -> dict[str, float]:
    """'q=0,k=0' -> {'q': 0.0, 'k': 0.0}, checked at parse by the config's own rules (RelationTerm:
    numbers >= 0), so a bad weight fails before the models are built, not after."""
    given: dict[str, str] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in ("q", "k", "v"):  # qk has its own flag, --relation-qk
            raise argparse.ArgumentTypeError(f"relation weight {part!r}: expected q=W, k=W or v=W")
        given[name] = value
    try:
        checked = RelationTerm(weights=given).weights
    except ValidationError as e:
        raise argparse.ArgumentTypeError(f"relation weights {text!r}: {e.errors()[0]['msg']}") from None
    return {name: checked[name] for name in given}


def objective_config(a, overlap: bool = True, backward: str = "auto") -> ObjectiveConfig:
    """The objective of the timed step: ``--objective-config``'s recipe section (the step users
    run), else LinearARD's relations shaped by the --relation-* flags. ``overlap`` and a
    ``backward`` other than auto (the variant's) replace the recipe's own settings."""
    if a.objective_config is not None:
        obj = a.recipe_objective
        rel = {"overlap": overlap}
        if backward in ("sweep", "rowfwd"):
            rel["backward"] = backward
        return obj.model_copy(update={"relation": obj.relation.model_copy(update=rel)})
    # the config keeps Q/Q, K/K, V/V at 1 when weights leaves them out
    weights = dict(a.relation_weights)
    if a.relation_qk:
        weights["qk"] = a.relation_qk
    relation = {"layers": a.relation_layers, "weights": weights, "overlap": overlap}
    if backward in ("sweep", "rowfwd"):
        relation["backward"] = backward
    return ObjectiveConfig(name="linearard", relation=relation)


def objective_summary(a, v) -> dict:
    """The terms and weights the variant's step computes, for the results."""
    o = objective_config(a, v[2] != "off", v[1])
    return {
        "source": str(a.objective_config) if a.objective_config else "flags",
        "relation": o.relation.weight,
        "relation_weights": dict(o.relation.weights),
        "relation_layers": o.relation.layers.model_dump(exclude_none=True),
        "relation_backward": o.relation.backward,
        "logits": o.logits.weight,
        "next_token": o.next_token.weight,
    }


BACKWARDS = ("auto", "sweep", "atomic", "rowfwd")
IMPLS = ("op", "null", "attn-cudnn", "attn-flash")


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=4096, help="tokens per block (T)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--native", type=int, default=4096, help="teacher's native window")
    p.add_argument("--factor", type=float, default=8.0, help="PI factor of the student")
    p.add_argument("--lora-r", type=int, default=1024)
    p.add_argument("--lora-alpha", type=float, default=2048.0)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument(
        "--relation-backward",
        default="auto",
        help="comma list (crossed with the op variants; the others take auto): Triton backward of the "
        "relation op: auto (the op's default, the sweep), sweep (two "
        "recomputes, reproducible), atomic (one recompute, opt-in) or rowfwd (row part in the "
        "forward, column-only backward; an fp32 [B, H, T, D] buffer per relation call)",
    )
    p.add_argument(
        "--relation-impl",
        default="op",
        help="comma list, each timed on the same models, step by step in turn: op (linearard_ray.ops); "
        "null (zero loss and gradients in the op's place: the step without the op, so the time the "
        "op adds is measured against it); attn-cudnn / attn-flash (causal SDPA attention forward+backward of "
        "each relation's student tensor in its place, cuDNN or flash backend forced: the step if the "
        "relation loss were exactly as fast as that attention kernel on the same shape; on CPU the "
        "math backend)",
    )
    p.add_argument(
        "--overlap",
        default="on",
        help="comma list of on/off/on-lo: objective.relation.overlap (each layer's relations start during "
        "the forward, on a second CUDA stream, at the most urgent priority; on-lo: that stream at "
        "the default priority, the main stream's); crossed with --relation-impl",
    )
    p.add_argument(
        "--relation-weights",
        type=_weights,
        default={},
        help="objective.relation.weights as q=W,k=W,v=W (0 switches a relation off; one left out keeps "
        "1); the 7B benchmark keeps all three",
    )
    p.add_argument(
        "--relation-qk",
        type=float,
        default=0.0,
        help="weight of the optional attention-map term (objective.relation.weights.qk); 0 = LinearARD's "
        "three relations only, the 7B benchmark",
    )
    p.add_argument(
        "--relation-layers",
        default="all",
        help="objective.relation.layers (all, last:N, every:K, ...); the 7B benchmark uses all",
    )
    p.add_argument(
        "--objective-config",
        type=Path,
        default=None,
        help="a recipe YAML whose objective section the step computes (its relation weights, layers and "
        "backward, the attention map, logit KL and next-token terms: the step users run, e.g. "
        "configs/smollm2-135m-x4-restore-long.yaml); replaces --relation-weights/-qk/-layers",
    )
    p.add_argument(
        "--parallelism",
        default="ddp",
        help="comma list of ddp/fsdp: ddp = whole models on every worker (DDP over the LoRA gradients when "
        "--workers > 1); fsdp = teacher and student sharded per decoder layer with FSDP2 "
        "(linearard_ray.training.fsdp.shard_models)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, one per GPU (torch.multiprocessing spawn; NCCL on GPUs, gloo on CPU); 1 = this "
        "process (fsdp still gets a one-process group)",
    )
    p.add_argument(
        "--offload-teacher", action="store_true", help="fsdp: the teacher's shards in host memory (train.fsdp)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotune)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU in fp32 (a smoke test of this script)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    a.impls = [x.strip() for x in a.relation_impl.split(",") if x.strip()]
    bad = [x for x in a.impls if x not in IMPLS]
    if bad or not a.impls:
        p.error(f"--relation-impl: unknown {bad or a.relation_impl!r}; choose from {', '.join(IMPLS)}")
    a.backwards = [x.strip() for x in a.relation_backward.split(",") if x.strip()]
    if not a.backwards or any(x not in BACKWARDS for x in a.backwards):
        p.error(f"--relation-backward: choose from {', '.join(BACKWARDS)}, got {a.relation_backward!r}")
    a.overlaps = [x.strip() for x in a.overlap.split(",") if x.strip()]
    if not a.overlaps or any(x not in ("on", "off", "on-lo") for x in a.overlaps):
        p.error(f"--overlap: give a list of on, off, on-lo, got {a.overlap!r}")
    a.parallelisms = [x.strip() for x in a.parallelism.split(",") if x.strip()]
    if not a.parallelisms or any(x not in ("ddp", "fsdp") for x in a.parallelisms):
        p.error(f"--parallelism: give a list of ddp, fsdp, got {a.parallelism!r}")
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    if a.workers > 1 and torch.cuda.is_available() and not a.tiny and a.workers > torch.cuda.device_count():
        p.error(f"--workers {a.workers}: only {torch.cuda.device_count()} GPUs here")
    a.recipe_objective = None
    if a.objective_config is not None:
        from linearard_ray.config import ConfigError, load_config

        try:
            a.recipe_objective = load_config(a.objective_config).objective
        except (ConfigError, OSError) as e:
            p.error(f"--objective-config {a.objective_config}: {e}")
        if a.relation_weights or a.relation_qk or a.relation_layers != "all":
            p.error(
                "--objective-config gives the relation weights and layers: leave out --relation-weights/-qk/-layers"
            )
    if a.tiny:
        a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 2, 64, 128, 4, 4, 256
        a.seq, a.native, a.lora_r, a.lora_alpha, a.steps, a.warmup = 128, 128, 8, 16, 2, 1
    return a


def _route(impl: str):
    """Send the relation calls of one variant where ``impl`` says; returns the undo."""
    if impl == "op":
        return lambda: None
    if impl == "null":
        return install_null_relation()
    return install_attention_proxy(impl.removeprefix("attn-"))


def variants(a) -> list[tuple[str, str, str]]:
    """(impl, backward mode, overlap) of every variant the arguments ask for; only the op's own
    backward has modes."""
    return [
        (impl, bw, ov) for impl in a.impls for bw in (a.backwards if impl == "op" else ["auto"]) for ov in a.overlaps
    ]


def make_objective(a, v, rope, device: torch.device, sharded: bool = False) -> Objective:
    obj = Objective(objective_config(a, v[2] != "off", v[1]), rope, a.layers, a.backend, sharded=sharded)
    if v[2] == "on-lo" and device.type == "cuda":
        obj._sides[device] = SideStream(device, priority=0)
    return obj


@contextlib.contextmanager
def routed(v, device: torch.device):
    """The relation calls go where variant v says, with its backward mode; both undone after."""
    import importlib  # the package attribute `relation_kl` is the function, not the module

    rk = importlib.import_module("linearard_ray.ops.relation_kl_triton") if device.type == "cuda" else None
    undo = _route(v[0])
    if rk is not None:
        rk.set_backward_mode(None if v[1] == "auto" else v[1])
    try:
        yield
    finally:
        undo()
        if rk is not None:
            rk.set_backward_mode(None)


def _device(a, rank: int) -> torch.device:
    if torch.cuda.is_available() and not a.tiny:
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int, device: torch.device):
    """torch.distributed over ``world`` local processes: NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        # Every rank done with its collectives before any tears the group down: one CPU CI run saw
        # rank 0 abort in teardown ("terminate called without an active exception", gloo) once.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def predicted_peak_gib(a, v, parallelism: str, world: int, device: torch.device) -> float | None:
    """linearard_ray.training.memory's per-GPU peak for variant v, to print beside the measured one
    (None for the attention proxies, which the memory model does not describe)."""
    from linearard_ray.training.memory import GIB, TrainingSetup, estimate_memory

    if v[0].startswith("attn"):
        return None
    o = objective_config(a, v[2] != "off", v[1])
    relations = ()
    if o.relation.weight > 0:
        relations = tuple(r for r in ("q", "k", "v", "qk") if o.relation.weights.get(r, 0.0) > 0)
    half = device.type == "cuda"
    setup = TrainingSetup(
        seq_len=a.seq,
        micro_batch=a.batch,
        lora_rank=a.lora_r,
        workers=world,
        parallelism=parallelism,
        offload_teacher=a.offload_teacher,
        gradient_checkpointing=a.grad_checkpointing,
        relations=relations,
        relation_layers=len(o.relation.layers.resolve(a.layers)) if relations else None,
        relation_backward="rowfwd" if o.relation.backward == "rowfwd" else "default",
        relation_impl="null" if v[0] == "null" else "op",
        logit_kl=o.logits.weight > 0,
        next_token=o.next_token.weight > 0,
        logit_chunk=o.logits.chunk_size,
        weight_bytes=2 if half else 4,
        activation_bytes=2 if half else 4,
    )
    shape = {
        "hidden_size": a.hidden,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "intermediate_size": a.intermediate,
        "vocab_size": a.vocab,
    }
    return estimate_memory(shape, setup).total / GIB


def _parallel_step(a, parallelism: str, world: int, teacher, student, device: torch.device):
    """(loss_fn(objective, batch) -> LossOutput-like (loss, metrics), clip(params)) for the setup:
    the objective called directly (one process, or FSDP2 after shard_models), or through DDP."""
    from linearard_ray.training.fsdp import clip_grad_norm

    if parallelism == "fsdp":
        from linearard_ray.config.job import FsdpConfig
        from linearard_ray.training.fsdp import shard_models

        shard_models(teacher, student, FsdpConfig(offload_teacher=a.offload_teacher), device, device.type == "cuda")
    if parallelism == "ddp" and world > 1:
        from linearard_ray.training.distributed import ObjectiveModule, wrap_ddp

        module = ObjectiveModule(None, student, teacher)
        ddp = wrap_ddp(module, device)

        def loss_fn(objective, batch):
            module._frozen["objective"] = objective  # one DDP wrapper, the variant's objective
            loss = ddp(batch)
            return loss, module.last_metrics

    else:

        def loss_fn(objective, batch):
            out = objective(teacher, student, batch)
            return out.loss, out.metrics

    return loss_fn, lambda params: clip_grad_norm(params, 5.0)


def run_variants(a, parallelism: str = "ddp", rank: int = 0, world: int = 1) -> list[dict]:
    """Time every (impl, backward, overlap) variant on the same models, one step of each in turn,
    in this process (rank ``rank`` of ``world``; a process group is up when world > 1 or under
    fsdp). Returns rank 0's figures, with every rank's peak memory in ``peak_mem_gb_ranks``."""
    device = _device(a, rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, student, rope = build_models(a, device, dtype)
    loss_fn, clip = _parallel_step(a, parallelism, world, teacher, student, device)
    todo = variants(a)
    objectives = {v: make_objective(a, v, rope, device, sharded=parallelism == "fsdp") for v in todo}
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    clock = _Clock(device)
    restore = instrument_relation_ops(clock)
    g = torch.Generator().manual_seed(1 + rank)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    rec = {v: {"step": [], "loss_ms": [], "fwd_ms": [], "loss": [], "peak": 0.0} for v in todo}

    def step(v, timed: bool) -> None:
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        clock.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with routed(v, device):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss, metrics = loss_fn(objectives[v], batch)
            loss.backward()
            clip(params)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
        if timed:
            r = rec[v]
            r["step"].append(dt)
            r["loss_ms"].append(clock.total_ms())
            r["fwd_ms"].append(clock.total_ms("fwd"))
            r["loss"].append(metrics["loss"])
            if device.type == "cuda":
                r["peak"] = max(r["peak"], torch.cuda.max_memory_allocated() / 2**30)

    try:
        for v in todo:
            for _ in range(a.warmup):
                step(v, False)
        for _ in range(a.steps):
            for v in todo:
                step(v, True)
    finally:
        restore()
    peaks = {v: [rec[v]["peak"]] for v in todo}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, {str(v): rec[v]["peak"] for v in todo})
        peaks = {v: [ranks[str(v)] for ranks in gathered] for v in todo}
    return [_result(a, v, rec[v], peaks[v], parallelism, world, device, dtype) for v in todo]


def _result(a, v, r: dict, peaks: list[float], parallelism: str, world: int, device, dtype) -> dict:
    st, rel = statistics.median(r["step"]), statistics.median(r["loss_ms"])
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "shape": {
            "layers": a.layers,
            "hidden": a.hidden,
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "head_dim": a.hidden // a.heads,
            "seq": a.seq,
            "batch": a.batch,
            "lora_r": a.lora_r,
        },
        "parallelism": parallelism,
        "workers": world,
        "offload_teacher": a.offload_teacher if parallelism == "fsdp" else False,
        "objective": objective_summary(a, v),
        "backend": a.backend,
        "relation_backward": v[1],
        "relation_layers": a.relation_layers,
        "relation_impl": v[0],
        "overlap": v[2] != "off",
        "side_priority": "default" if v[2] == "on-lo" else None,
        "relation_qk": a.relation_qk,
        "relation_weights": a.relation_weights,
        "grad_checkpointing": a.grad_checkpointing,
        "dtype": str(dtype).replace("torch.", ""),
        "step_ms": st,
        "step_ms_all": r["step"],
        # every worker runs its own micro-batch: tokens/s per GPU is one worker's
        "tokens_per_s": a.batch * a.seq / (st / 1e3),
        "relation_loss_ms": rel,
        "relation_loss_fwd_ms": statistics.median(r["fwd_ms"]),
        "relation_loss_share": rel / st,
        "peak_mem_gb": max(peaks) if cuda else None,
        "peak_mem_gb_ranks": peaks if cuda else None,
        "predicted_peak_gb": predicted_peak_gib(a, v, parallelism, world, device),
        "loss": r["loss"][-1],
        "steps_timed": len(r["step"]),
    }


def _worker(rank: int, a, parallelism: str, world: int, port: int, out: str) -> None:
    device = _device(a, rank)
    with process_group(rank, world, port, device):
        results = run_variants(a, parallelism, rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def run_spawned(a, parallelism: str, world: int) -> list[dict]:
    """``run_variants`` in ``world`` spawned processes (one per GPU); rank 0's figures."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.json")
        mp.spawn(_worker, args=(a, parallelism, world, _free_port(), out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def run(a) -> dict:
    """Every parallelism of ``--parallelism`` × every variant (see ``run_variants``).

    One result: its figures. Several: {"variants": [...]}; with a null variant among them each
    other variant also gets ``added_ms`` (its step minus the null step with the same parallelism
    and overlap setting) and ``added_share`` (that over its step): the time the relation op adds,
    which is the honest cost once the op overlaps the model and its own spans no longer add up to it.
    """
    results = []
    for parallelism in a.parallelisms:
        if a.workers > 1:
            results += run_spawned(a, parallelism, a.workers)
        elif parallelism == "fsdp":  # FSDP2 needs a process group, even of one
            with process_group(0, 1, _free_port(), _device(a, 0)):
                results += run_variants(a, parallelism)
        else:
            results += run_variants(a, parallelism)
    nulls = {
        (res["parallelism"], res["overlap"]): res
        for res in results
        if res["relation_impl"] == "null" and not res["side_priority"]
    }
    for res in results:
        same = [n for k, n in nulls.items() if k[0] == res["parallelism"]]
        base = nulls.get((res["parallelism"], res["overlap"])) or next(iter(same), None)
        if base is not None and res["relation_impl"] != "null":
            res["added_ms"] = res["step_ms"] - base["step_ms"]
            res["added_share"] = res["added_ms"] / res["step_ms"]
    return results[0] if len(results) == 1 else {"variants": results}


def _line(res: dict) -> str:
    impl = res["relation_impl"] + (f" ({res['relation_backward']})" if res["relation_backward"] != "auto" else "")
    ov = ("on-lo" if res["side_priority"] else "on") if res["overlap"] else "off"
    par = res["parallelism"] + (f"×{res['workers']}" if res["workers"] > 1 else "")
    line = (
        f"{par:>6} {impl:>26} overlap {ov:<5} | step {res['step_ms']:.1f} ms | "
        f"{res['tokens_per_s']:.0f} tokens/s | relation-op spans {res['relation_loss_ms']:.1f} ms "
        f"(fwd {res['relation_loss_fwd_ms']:.1f}) = {100 * res['relation_loss_share']:.1f}% of the step"
    )
    if "added_ms" in res:
        line += f" | adds {res['added_ms']:.1f} ms = {100 * res['added_share']:.1f}% of the step"
    if res["peak_mem_gb"] is not None:
        ranks = res["peak_mem_gb_ranks"]
        line += f" | peak memory {res['peak_mem_gb']:.1f} GiB"
        line += f" (ranks {', '.join(f'{x:.1f}' for x in ranks)})" if len(ranks) > 1 else ""
    else:
        line += " | peak memory n/a (CPU)"
    if res["predicted_peak_gb"] is not None:
        gib = res["predicted_peak_gb"]
        line += f", memory model {gib:.1f} GiB" if gib >= 1 else f", memory model {gib * 1024:.1f} MiB"
    return line + f" | loss {res['loss']:.4f}"


def main(argv=None) -> int:
    a = parse(argv)
    out = run(a)
    results = out["variants"] if "variants" in out else [out]
    s = results[0]["shape"]
    print(
        f"device {results[0]['device']} | L={s['layers']} H={s['heads']} D={s['head_dim']} T={s['seq']} B={s['batch']} "
        f"LoRA r={s['lora_r']} | backend {a.backend} | {results[0]['dtype']} | grad ckpt {a.grad_checkpointing}"
    )
    for res in results:
        print(_line(res))
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
