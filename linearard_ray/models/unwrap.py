"""Reach the Hugging Face model inside the wrappers training puts around it (DDP, peft)."""

from __future__ import annotations

import torch


def _is_data_parallel(model) -> bool:
    return (
        hasattr(model, "module")
        and isinstance(model.module, torch.nn.Module)
        and type(model).__name__.endswith("DataParallel")
    )


def unwrap_model(model, *, keep_adapter: bool = False):
    """The model under DDP wrappers and, unless ``keep_adapter``, under peft's ``PeftModel`` too.

    ``keep_adapter=True`` gives the peft model itself: what holds the trainable parameters and
    what export merges.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if _is_data_parallel(model):
            model = model.module
        elif not keep_adapter and hasattr(model, "get_base_model"):
            model = model.get_base_model()
    return model


def decoder_and_head(model):
    """(decoder returning hidden states, lm_head) of a causal LM, wrapped or not."""
    base = unwrap_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder, base.lm_head
