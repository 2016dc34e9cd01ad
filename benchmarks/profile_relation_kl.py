#!/usr/bin/env python
"""Hardware counters of the relation-KL kernels under Nsight Compute (GPU host).

The question it answers: per relation call the forward and the backward each cost about the *sum*
of their tensor-core, exponential (MUFU) and issue times rather than the largest of them
(benchmarks/README.md, "Profiling the kernels"). ncu's pipe utilisations, issue activity and warp stall
reasons say which of the three waits on which.

    ncu --clock-control none -k regex:'_fwd_kernel|_bwd_kernel' --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats \\
        --section WarpStateStats --section Occupancy \\
        python benchmarks/profile_relation_kl.py --T 4096

It runs one causal self-relation (B=1, H=32, D=128, bf16, the op's default tiles) forward and
backward twice: the first pair compiles and is skipped, the second is the one measured.
"""

from __future__ import annotations

import argparse

import torch

from linearard_ray.ops import relation_kl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.H, args.T, args.D)
    s = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    t = (s.float() + 0.5 * torch.randn(shape, device="cuda", generator=gen)).to(torch.bfloat16)
    for _ in range(2):
        leaf = s.detach().requires_grad_()
        relation_kl(leaf, teacher_q=t).backward()
    torch.cuda.synchronize()
    print(f"ran 2 x (forward, backward) at B=1 H={args.H} T={args.T} D={args.D} on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
