"""The small base config the sweep tests start from."""

from __future__ import annotations

from linearard_ray.config import Config, build_config


def base_config(**over) -> Config:
    """A tiny-Llama config that measures the held-out objective during training, as a sweep needs."""
    cfg = {
        "model": {"teacher": "tiny:llama"},
        "data": {"ctx_len": 64},
        "train": {"max_steps": 4, "eval_every": 2, "checkpoint_every": 2},
    }
    return build_config(cfg, over)
