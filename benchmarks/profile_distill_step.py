"""Profile a few distillation steps (the bench_distill_step model) with torch.profiler and print
where device and host time go. Used to find integration slowdowns the op benchmark cannot see.

    python benchmarks/profile_distill_step.py --layers 4
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_distill_step as b  # noqa: E402
from linearard_ray.config import ObjectiveConfig  # noqa: E402
from linearard_ray.loss import Objective  # noqa: E402


def main() -> None:
    a = b.parse(sys.argv[1:])
    dev = torch.device("cuda")
    teacher, student, rope = b.build_models(a, dev, torch.bfloat16)
    obj = Objective(ObjectiveConfig(name="linearard"), rope, a.layers, a.backend)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = obj(teacher, student, batch)
        out.loss.backward()
        opt.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
