"""The eval and tune sections: how students are judged and how sweeps search."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from linearard_ray.config.base import Section
from linearard_ray.config.model import RopeConfig

# --------------------------------------------------------------------------- evaluation


class EvalModelSpec(Section):
    name: str
    path: str = Field(..., description="Hub id, directory, exported student, .gguf or 'smollm2-135m'.")
    rope: RopeConfig | None = Field(None, description="RoPE settings to apply; default: as in the checkpoint.")


# What each eval.preset sets. A field given in the config file or with --set keeps its value: the
# preset only fills in the fields left out (pydantic's fields set by the input, see _apply_preset).
# "standard" is the schema's own defaults.
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # A CPU smoke test of the whole report on SmolLM2-135M (docs/evaluation.md gives measured times):
    # one domain, one short and one long length, few windows and prompts.
    "quick": {
        "other_texts": [],
        "short_lengths": [512],
        "long_lengths": [1024],
        "max_windows": 2,
        "passkey_lengths": [512],
        "passkey_depths": [0.5],
        "passkey_trials": 2,
        "passkey_choices": 5,
    },
    "standard": {},
    # Less noise and the extended window: for a GPU.
    "full": {
        "long_lengths": [4096, 8192, 16384, 32768],
        "max_windows": 16,
        "passkey_lengths": [1024, 4096, 8192, 16384, 32768],
        "passkey_depths": [0.1, 0.3, 0.5, 0.7, 0.9],
        "passkey_trials": 5,
    },
}


class EvalConfig(Section):
    preset: Literal["quick", "standard", "full"] = Field(
        "standard",
        description="Defaults for the size of the evaluation: 'quick' (a CPU smoke test of SmolLM2-135M: "
        "one domain, lengths 512 and 1024, 2 windows, 2 passkey prompts at 512), "
        "'standard' (the defaults below) or 'full' (16 windows, lengths up to 32768, 25 passkey prompts "
        "per length; for a GPU). Fields set in the config or with --set override the preset.",
    )
    models: list[EvalModelSpec] = Field(
        default_factory=list, description="Default: teacher, unrestored student, restored student."
    )
    student_path: str | None = Field(
        None,
        description="The restored student to evaluate: the export's <train.output_dir>/<run>/merged directory.",
    )
    texts: list[str] = Field(default_factory=lambda: ["builtin:sotu/eval"])
    other_texts: list[str] = Field(
        default_factory=lambda: ["builtin:pydocs"],
        description="A second domain not used in training (default: Python 3.11 docs); [] = none.",
    )
    short_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    long_lengths: list[int] = Field(default_factory=lambda: [4096, 8192])
    max_windows: int = Field(8, ge=1, description="Windows per length (more = less noise, more time).")
    passkey_lengths: list[int] = Field(default_factory=lambda: [1024, 4096])
    passkey_depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_trials: int = Field(3, ge=1)
    passkey_choices: int = Field(
        10,
        ge=0,
        description="Forced-choice retrieval beside the greedy answer: the true key "
        "and N-1 seeded distractors are scored by the model's log-probability "
        "after the question, so reading the key is measured apart from how the "
        "model words its answer (chance 1/N); 0 = off.",
    )
    passkey_distractors: Literal["random", "one_digit"] = Field(
        "random",
        description="Where the forced choice's distractors come from: 'random' five-digit keys (any "
        "retrieval tells them apart) or keys 'one_digit' away from the true one (only a model "
        "that holds every digit picks it; at most 45 choices).",
    )
    relation_kl: bool = True
    batch_size: int = Field(1, ge=1)
    seed: int = 0
    output_dir: str = "outputs/eval"
    resume: bool = Field(
        True,
        description="Reuse finished jobs from <output_dir>/jobs.jsonl (same models, inputs "
        "and settings); false = run everything again.",
    )
    device: str = "auto"
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for lm-evaluation-harness, passed through: those of "
        "lm_eval.simple_evaluate (e.g. metadata: {max_seq_lengths: [8192]} for RULER, limit, num_fewshot) "
        "and of its HFLM model (e.g. max_length: 8192). Checked against lm-eval's signatures before any "
        "model runs.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill in the preset's values for the fields the input leaves out. Done on the raw input,
        before the defaults: after validation every field has a value and only model_fields_set
        tells a default from a value the user gave, and assigning there would run validation again."""
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "standard")
        if preset not in EVAL_PRESETS:
            return data  # the Literal names the allowed presets
        return {**copy.deepcopy(EVAL_PRESETS[preset]), **data}

    def preset_overrides(self) -> dict[str, Any]:
        """The preset's fields that the config set to another value: {field: (preset's, config's)}."""
        mine = EVAL_PRESETS[self.preset]
        return {k: (v, getattr(self, k)) for k, v in mine.items() if getattr(self, k) != v}

    @field_validator("passkey_choices")
    @classmethod
    def _choices(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 leaves nothing to choose between; use 0 to turn the forced choice off, or 2 or more")
        return v

    @model_validator(mode="after")
    def _one_digit_choices(self) -> EvalConfig:
        if self.passkey_distractors == "one_digit" and self.passkey_choices > 45:
            raise ValueError(
                f"passkey_choices: {self.passkey_choices} with passkey_distractors 'one_digit', but a key "
                "has only 44 keys one digit away (at most 45 choices)"
            )
        return self


# --------------------------------------------------------------------------- tune


class TuneConfig(Section):
    sweep_name: str = "linearard-sweep"
    space: dict[str, Any] = Field(
        default_factory=lambda: {
            "rope.factor": {"grid": [2.0, 4.0]},
            "objective.relation.layers": {"grid": ["all", "last:2"]},
        },
        description="Dotted config path -> {grid: [...]} | {choice: [...]} | {uniform: [a,b]} | "
        "{loguniform: [a,b]} | {randint: [a,b]}.",
    )
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(
        1,
        ge=1,
        description="Repeats of the grid (repeat k trains with train.seed + k: "
        "another LoRA init and block order; the summary gives each configuration's mean and range "
        "and the best configuration is the best mean), or samples for "
        "random/optuna.",
    )
    metric: str = "nll_gap"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: int | None = None
    trial_max_failures: int = Field(1, ge=0)
    keep_students: Literal["best", "all"] = Field(
        "best", description="Exported students kept after the sweep: the best trial's, or every trial's."
    )
    storage_path: str = "outputs/tune"
