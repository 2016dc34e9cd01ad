"""The smallest evaluation the tests run: a tiny teacher, its PI×2 student, one domain, one
short and one long length, two windows and one passkey prompt per depth."""

from __future__ import annotations


def tiny_eval_config(output_dir, teacher: str = "tiny:llama", **eval_over) -> dict:
    """The config as a plain dict (callers add ``tracking``); ``eval_over`` replaces eval fields."""
    return {
        "model": {"teacher": teacher, "dtype": "float32"},
        "rope": {"type": "linear", "factor": 2.0},
        "eval": {
            "texts": ["builtin:sotu/extra"],
            "other_texts": [],
            "short_lengths": [32],
            "long_lengths": [64],
            "max_windows": 2,
            "passkey_lengths": [200],
            "passkey_depths": [0.5],
            "passkey_trials": 1,
            "device": "cpu",
            "output_dir": str(output_dir),
            **eval_over,
        },
    }
