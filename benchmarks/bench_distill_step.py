"""Time one LinearARD distillation step of a LLaMA-2-7B-shaped model on one GPU, without Ray.

    python benchmarks/bench_distill_step.py                      # 32 layers, H=32, D=128, T=4096
    python benchmarks/bench_distill_step.py --layers 8           # shrink to fit / to iterate fast
    python benchmarks/bench_distill_step.py --tiny               # CPU smoke run of the same code

What one step is, exactly as the training loop runs it: teacher forward without gradients with
Q/K/V capture, student (PI×8, LoRA r=1024/α=2048 on q/k/v) forward with capture, the relation KL
of all three relations on every layer (``linearard_ray.loss.Objective`` → ``linearard_ray.ops``),
backward, gradient clipping, AdamW. Weights are random (the shapes are what cost time).

Reported: tokens/s per GPU, the share of the step spent in the relation loss (forward and
backward of the relation ops, timed with CUDA events placed around them: the backward events
fire from identity autograd nodes wrapped around the ops' inputs and outputs), and peak memory.
Only torch, transformers, peft and this package are needed.
"""

from __future__ import annotations

import argparse
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

from linearard_ray import ops  # noqa: E402
from linearard_ray.config import ObjectiveConfig, RopeConfig  # noqa: E402
from linearard_ray.loss import Objective  # noqa: E402
from linearard_ray.models import enable_checkpointing  # noqa: E402
from linearard_ray.rope import apply_rope_scaling  # noqa: E402


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


# --------------------------------------------------------------------------- models


def build_models(a, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=a.native,
        rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="sdpa",
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
    student = get_peft_model(student, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj"], bias="none",
                                                 task_type="CAUSAL_LM"))
    student.train()
    return teacher, student, rope


# --------------------------------------------------------------------------- main


def objective_config(a) -> ObjectiveConfig:
    # the config keeps Q/Q, K/K, V/V at 1 when weights leaves them out
    weights = {"qk": a.relation_qk} if a.relation_qk else {}
    return ObjectiveConfig(name="linearard", relation={"layers": a.relation_layers, "weights": weights})


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--relation-backward", default="auto", choices=["auto", "sweep", "atomic", "rowfwd"],
                   help="Triton backward of the relation op: auto (the op's default, the sweep), sweep (two "
                        "recomputes, reproducible), atomic (one recompute, opt-in) or rowfwd (row part in the "
                        "forward, column-only backward; an fp32 [B, H, T, D] buffer per relation call)")
    p.add_argument("--relation-impl", default="op", choices=["op", "gluon-experimental", "gluon-fwd-experimental",
                                                               "gluon-ws-fwd-experimental"],
                   help="op (linearard_ray.ops) or gluon-experimental: the causal self-relations go to the Gluon "
                        "kernels of benchmarks/experimental/gluon_relation_kl.py (GPU only, not part of the "
                        "product; the calls each path took are printed); gluon-fwd-experimental: the Gluon "
                        "forward with the op's backward; gluon-ws-fwd-experimental: the warp-specialised Gluon "
                        "forward (benchmarks/experimental/gluon_ws_forward.py) with the op's backward")
    p.add_argument("--relation-qk", type=float, default=0.0,
                   help="weight of the optional attention-map term (objective.relation.weights.qk); 0 = LinearARD's "
                        "three relations only, the issue's benchmark")
    p.add_argument("--relation-layers", default="all",
                   help="objective.relation.layers (all, last:N, every:K, ...); the issue's benchmark uses all")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotune)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU in fp32 (a smoke test of this script)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.tiny:
        a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 2, 64, 128, 4, 4, 256
        a.seq, a.native, a.lora_r, a.lora_alpha, a.steps, a.warmup = 128, 128, 8, 16, 2, 1
    return a


def run(a) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, student, rope = build_models(a, device, dtype)
    objective = Objective(objective_config(a), rope, a.layers, a.backend)
    if device.type == "cuda":
        import importlib  # the package attribute `relation_kl` is the function, not the module

        importlib.import_module("linearard_ray.ops.relation_kl").set_backward_mode(None if a.relation_backward == "auto" else a.relation_backward)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    clock = _Clock(device)
    restore = instrument_relation_ops(clock)
    gluon = None
    if a.relation_impl.startswith("gluon"):
        if device.type != "cuda":
            raise SystemExit(f"bench_distill_step.py: --relation-impl {a.relation_impl} needs a GPU")
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "gluon_relation_kl", Path(__file__).resolve().parent / "experimental" / "gluon_relation_kl.py")
        gluon = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gluon)
        undo_gluon = gluon.install(
            backward="gluon" if a.relation_impl == "gluon-experimental" else "op",
            forward="ws" if a.relation_impl == "gluon-ws-fwd-experimental" else "gluon")
        restore = (lambda undo_ops=restore: (undo_gluon(), undo_ops()))
    g = torch.Generator().manual_seed(1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    step_ms, loss_ms, fwd_ms, losses = [], [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(a.warmup + a.steps):
            ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            clock.reset()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = objective(teacher, student, batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= a.warmup:
                step_ms.append(dt)
                loss_ms.append(clock.total_ms())
                fwd_ms.append(clock.total_ms("fwd"))
                losses.append(out.metrics["loss"])
    finally:
        restore()
    step = statistics.median(step_ms)
    rel = statistics.median(loss_ms)
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
                  "head_dim": a.hidden // a.heads, "seq": a.seq, "batch": a.batch, "lora_r": a.lora_r},
        "backend": a.backend, "relation_backward": a.relation_backward, "relation_layers": a.relation_layers,
        "relation_impl": a.relation_impl, "relation_calls": dict(gluon.routed) if gluon else None,
        "relation_qk": a.relation_qk,
        "grad_checkpointing": a.grad_checkpointing,
        "dtype": str(dtype).replace("torch.", ""),
        "step_ms": step, "tokens_per_s": a.batch * a.seq / (step / 1e3),
        "relation_loss_ms": rel, "relation_loss_fwd_ms": statistics.median(fwd_ms),
        "relation_loss_share": rel / step,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss": losses[-1], "steps_timed": len(step_ms),
    }
    return res


def main(argv=None) -> int:
    a = parse(argv)
    res = run(a)
    s = res["shape"]
    print(f"device {res['device']} | L={s['layers']} H={s['heads']} D={s['head_dim']} T={s['seq']} B={s['batch']} "
          f"LoRA r={s['lora_r']} | backend {res['backend']} | {res['dtype']} | grad ckpt {res['grad_checkpointing']}")
    print(f"step {res['step_ms']:.1f} ms | {res['tokens_per_s']:.0f} tokens/s | relation loss "
          f"{res['relation_loss_ms']:.1f} ms (fwd {res['relation_loss_fwd_ms']:.1f}) = {100 * res['relation_loss_share']:.1f}% "
          f"of the step | peak memory "
          + (f"{res['peak_mem_gb']:.1f} GiB" if res["peak_mem_gb"] is not None else "n/a (CPU)")
          + f" | loss {res['loss']:.4f}")
    if res["relation_calls"] is not None:
        print(f"relation calls: {res['relation_calls']['gluon']} to the Gluon kernels, {res['relation_calls']['op']} to the op")
    print(json.dumps(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
