"""Tiny random models and tokenizers, built offline, for tests and smoke runs.

A model name ``tiny:<family>`` (llama, mistral, qwen2, qwen3) resolves to a 2-layer GQA model with
random weights and a small byte-level BPE tokenizer trained on the embedded corpus. They are
built once per cache directory and reused, so Ray workers in other processes load the same
files.
"""

from __future__ import annotations

import os
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TINY_PREFIX = "tiny:"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LINEARARD_CACHE", Path.home() / ".cache" / "linearard_ray"))


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on a slice of the embedded corpus and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from linearard_ray.data.corpus import iter_sotu

    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts = [d["text"] for _, d in zip(range(20), iter_sotu("train"), strict=False)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return out


def tiny_config(family: str, **overrides):
    """A 2-layer, 4-query/2-kv-head config of the given family (head_dim 16)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        kw["head_dim"] = 16
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return cls(**kw)


def build_tiny_model(
    family: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    proj_std: float | None = 0.15,
    dtype: str = "float32",
    **overrides,
) -> Path:
    """Save a random tiny model of `family` plus the tiny tokenizer into out_dir (idempotent).

    proj_std: the projections' init std (None keeps the config's; wide shapes such as a
    LLaMA-7B-shaped benchmark model need None, or activations overflow in 16-bit)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    # Random init is tiny (std 0.02); widen it so attention maps are far from uniform and
    # relation losses are well away from zero.
    if proj_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and ("proj" in name):
                    p.normal_(0.0, proj_std)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    build_tiny_tokenizer(out)
    return out


def resolve_tiny(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``tiny:llama`` -> a directory holding that model (built on first use)."""
    family = name[len(TINY_PREFIX) :]
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return build_tiny_model(family, base / "tiny" / family)
