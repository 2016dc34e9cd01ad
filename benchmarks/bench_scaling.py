#!/usr/bin/env python
"""Multi-GPU scaling of the distillation job: tokens/s per GPU with 1 and N Ray Train workers.

Random-weight models with the tiny tokenizer (no weights need to travel) are distilled through
`pipelines/distill.py` with 1 worker, then with every GPU of the machine, same per-worker batch;
steady-state throughput is the median step rate after the first 10 steps. Shapes:
- `llama2-7b-slice`: 8 layers of LLaMA-2-7B (hidden 4096, 32/32 heads, D=128, MLP 11008), PI×8,
  LoRA r=1024/α=2048 on q/k/v, T=4096, micro-batch 1: the 7B step of bench_distill_step.py. The DDP all-reduce
  and the per-layer compute both scale with the layer count, so the slice has the full model's
  communication-to-compute ratio (its fixed per-step costs weigh a little more).
- `smollm2`: SmolLM2-135M shape (30 layers, 9/3 heads, D=64), PI×4, LoRA r=128, T=2048, micro-batch 4.

    python benchmarks/bench_scaling.py --shape llama2-7b-slice,smollm2 --steps 40 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


SHAPES = {
    "llama2-7b-slice": dict(
        model=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=8,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            proj_std=None,
            dtype="bfloat16",
        ),
        sets=[
            "rope.type=linear",
            "rope.factor=8",
            "lora.r=1024",
            "lora.alpha=2048",
            "data.ctx_len=4096",
            "train.micro_batch_size=1",
            "train.lr=2e-5",
            "train.gradient_checkpointing=true",
        ],
    ),
    "smollm2": dict(
        model=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
        ),
        sets=["rope.type=linear", "rope.factor=4", "data.ctx_len=2048", "train.micro_batch_size=4"],
    ),
}


def build_model(shape: str, out: Path) -> Path:
    from linearard_ray.models.tiny import build_tiny_model

    return build_tiny_model("llama", out / shape, **SHAPES[shape]["model"])


def run(shape: str, model: Path, workers: int, steps: int, work: Path) -> dict:
    sets = [
        f"model.teacher={model}",
        *SHAPES[shape]["sets"],
        f"train.num_workers={workers}",
        "train.use_gpu=true",
        f"train.max_steps={steps}",
        "train.checkpoint_every=100000",
        "train.eval_every=null",
        "tracking.enabled=false",
        f"train.run_name=scale-{shape}-{workers}gpu-{int(time.time())}",
        f"train.storage_path={work}/ray",
        f"train.output_dir={work}/students",
    ]
    cmd = [sys.executable, "pipelines/distill.py"] + sum((["--set", s] for s in sets), [])
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    text = p.stdout + p.stderr
    (work / f"scale_{shape}_{workers}.log").write_text(text)
    if p.returncode != 0:
        print(text[-3000:], flush=True)
    rates = [(int(s), float(r)) for s, r in re.findall(r"step (\d+)/\d+ .*?\| ([0-9.]+) tok/s", text)]
    steady = [r for s, r in rates if s > 10]
    med = statistics.median(steady) if steady else float("nan")
    return {
        "shape": shape,
        "workers": workers,
        "rc": p.returncode,
        "wall_s": round(time.time() - t0, 1),
        "steps_seen": len(rates),
        "tokens_per_s": med,
        "tokens_per_s_per_gpu": med / workers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b-slice", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", default=None, help="comma list; default 1 and all GPUs")
    ap.add_argument("--work", default="/tmp/scaling")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shapes = a.shape.split(",")
    bad = [x for x in shapes if x not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    import torch

    n = torch.cuda.device_count()
    counts = [int(x) for x in a.workers.split(",")] if a.workers else sorted({1, n})
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = []
    for shape in shapes:
        model = build_model(shape, work / "models")
        for w in counts:
            r = run(shape, model, w, a.steps, work)
            res.append(r)
            print(json.dumps(r), flush=True)
            if a.out:
                Path(a.out, "scaling.json").write_text(json.dumps(res, indent=1))
    print(f"\n{torch.cuda.get_device_name()} x{n}")
    print("| shape | GPUs | tokens/s | tokens/s per GPU | per-GPU efficiency vs 1 GPU |\n|---|---|---|---|---|")
    for r in res:
        base = next(x for x in res if x["shape"] == r["shape"])["tokens_per_s_per_gpu"]
        print(
            f"| {r['shape']} | {r['workers']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
            f"{100 * r['tokens_per_s_per_gpu'] / base:.1f}% |"
        )
    return 0 if all(r["rc"] == 0 for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
