"""Training: the Ray Train V2 distillation job (driver, worker loop, checkpoints, learning-rate schedule, held-out checks)."""
