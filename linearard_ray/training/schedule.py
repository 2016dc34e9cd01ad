"""Learning-rate schedule: linear warmup, then cosine decay to a floor of ``min_lr_ratio`` × lr."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    Warmup starts at 1/warmup (not 0) so the first step already moves the weights; the cosine
    reaches exactly ``min_lr_ratio`` at the last step (``total_steps - 1``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = total_steps - warmup_steps - 1
    if span <= 0:
        return min_lr_ratio  # at most one step after warmup: it is the last one
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (last_epoch) is saved in checkpoints; the lambda is rebuilt from config."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_lr_ratio))
