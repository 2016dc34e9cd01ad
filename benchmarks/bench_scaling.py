#!/usr/bin/env python
"""Multi-GPU scaling of the distillation job: tokens/s per GPU with 1 and N Ray Train workers.

A SmolLM2-135M-shaped model with random weights (30 layers, 9/3 heads, D=64; the tiny tokenizer,
so no weights need to travel) is distilled through `pipelines/distill.py` with 1 worker, then with
every GPU of the machine, same per-worker batch; steady-state throughput is the median step rate
after the first 10 steps.

    python benchmarks/bench_scaling.py --steps 40 --out $OUT
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


def build_model(out: Path) -> Path:
    from linearard_ray.testing import build_tiny_model

    return build_tiny_model("llama", out, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)


def run(model: Path, workers: int, steps: int, ctx: int, mb: int, work: Path) -> dict:
    sets = [f"model.teacher={model}", f"data.ctx_len={ctx}", f"train.num_workers={workers}", "train.use_gpu=true",
            f"train.micro_batch_size={mb}", f"train.max_steps={steps}", "train.checkpoint_every=100000",
            "tracking.enabled=false", f"train.run_name=scale-{workers}gpu-{int(time.time())}",
            f"train.storage_path={work}/ray", f"train.output_dir={work}/students"]
    cmd = [sys.executable, "pipelines/distill.py"] + sum((["--set", s] for s in sets), [])
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    text = p.stdout + p.stderr
    (work / f"scale_{workers}.log").write_text(text)
    rates = [(int(s), float(r)) for s, r in re.findall(r"step (\d+)/\d+ .*?\| ([0-9.]+) tok/s", text)]
    steady = [r for s, r in rates if s > 10]
    med = statistics.median(steady) if steady else float("nan")
    return {"workers": workers, "rc": p.returncode, "wall_s": round(time.time() - t0, 1), "steps_seen": len(rates),
            "tokens_per_s": med, "tokens_per_s_per_gpu": med / workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--workers", default=None, help="comma list; default 1 and all GPUs")
    ap.add_argument("--work", default="/tmp/scaling")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    n = torch.cuda.device_count()
    counts = [int(x) for x in a.workers.split(",")] if a.workers else sorted({1, n})
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model")
    res = []
    for w in counts:
        r = run(model, w, a.steps, a.ctx, a.micro_batch, work)
        res.append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            Path(a.out, "scaling.json").write_text(json.dumps(res, indent=1))
    base = res[0]["tokens_per_s_per_gpu"]
    print(f"\n{torch.cuda.get_device_name()} ×{n}; T={a.ctx}, micro-batch {a.micro_batch} per worker")
    print("| GPUs | tokens/s | tokens/s per GPU | per-GPU efficiency vs 1 GPU |\n|---|---|---|---|")
    for r in res:
        print(f"| {r['workers']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
              f"{100 * r['tokens_per_s_per_gpu'] / base:.1f}% |")
    return 0 if all(r["rc"] == 0 for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
