"""Profile a distillation step (the bench_distill_step model) with torch.profiler: where the GPU
time goes, by kernel family, and how much of the step the GPU is busy at all.

    python benchmarks/profile_distill_step.py                  # 32 layers, T=4096 (bench defaults)
    python benchmarks/profile_distill_step.py --layers 4 --top 25
    python benchmarks/profile_distill_step.py --relation-impl op,null --overlap off --top 30   # what the op adds

The relation-loss share printed here is kernel time (the op's Triton kernels plus the small
kernels of its launch path), which CUDA events around the calls cannot isolate when the host
falls behind the GPU. Used to find integration slowdowns the op benchmark cannot see.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_distill_step as b  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

# Kernel name fragments -> family. Our relation kernels are the Triton `_fwd_kernel`/`_bwd_kernel`.
FAMILIES = (
    ("relation KL (Triton)", ("_fwd_kernel", "_bwd_kernel")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "cudnn")),
    ("matmul (GEMM)", ("gemm", "cutlass", "nvjet", "xmma", "ampere_", "sm90_", "splitk")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other (elementwise, reductions, copies, optimizer)"


def _kernels(prof) -> dict[str, float]:
    """GPU ms by kernel name (kernels only: operator rows repeat their kernels' device time)."""
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.name.startswith("ProfilerStep"):
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is bench_distill_step.py's (python benchmarks/bench_distill_step.py --help).",
    )
    p.add_argument("--top", type=int, default=0, help="also print the top-N kernels and host ops")
    own, rest = p.parse_known_args(sys.argv[1:])
    a = b.parse(rest)
    dev = torch.device("cuda")
    teacher, student, rope = b.build_models(a, dev, torch.bfloat16)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(
        f"L={a.layers} H={a.heads} D={a.hidden // a.heads} T={a.seq} B={a.batch} LoRA r={a.lora_r} "
        f"grad ckpt {a.grad_checkpointing} | {torch.cuda.get_device_name()} | ops backend {a.backend}"
    )
    per_variant: dict[str, dict[str, float]] = {}
    for v in b.variants(a):
        obj = b.make_objective(a, v, rope, dev)

        def step(obj=obj):  # bound: each variant's loop pass runs its own objective
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = obj(teacher, student, batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()

        with b.routed(v, dev):
            for _ in range(a.warmup):
                step()
            torch.cuda.synchronize()
            walls = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - t0) * 1e3)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
        wall = sorted(walls)[len(walls) // 2]
        kern = _kernels(prof)
        label = f"{v[0]} (backward {v[1]}), overlap {v[2]}"
        per_variant[label] = kern
        fams: dict[str, float] = {}
        for name, t in kern.items():
            fams[family(name)] = fams.get(family(name), 0.0) + t
        busy = sum(fams.values())
        print(
            f"\n== {label}: step wall (median of {len(walls)}, unprofiled) {wall:.1f} ms | "
            f"GPU kernel time in the profiled step {busy:.1f} ms (kernels of two streams can overlap)"
        )
        print("| kernel family | GPU ms | share of kernel time | share of step wall |")
        print("|---|---|---|---|")
        for f, t in sorted(fams.items(), key=lambda kv: -kv[1]):
            print(f"| {f} | {t:.1f} | {100 * t / busy:.1f}% | {100 * t / wall:.1f}% |")
        if own.top:
            ka = prof.key_averages()
            print(ka.table(sort_by="self_device_time_total", row_limit=own.top, max_name_column_width=70))
            print(ka.table(sort_by="cpu_time_total", row_limit=own.top, max_name_column_width=70))
    if len(per_variant) > 1 and own.top:
        # Which kernels one variant has more of than the first: where an op's extra time goes.
        names = list(per_variant)
        ref = per_variant[names[0]]
        for other in names[1:]:
            cur = per_variant[other]
            diff = sorted(((ref.get(k, 0.0) - cur.get(k, 0.0), k) for k in set(ref) | set(cur)), reverse=True)
            print(f"\n== GPU ms of {names[0]} minus {other}, largest first")
            for d, k in diff[: own.top]:
                print(f"{d:9.2f}  {k[:110]}")


if __name__ == "__main__":
    main()
