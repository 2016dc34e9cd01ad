"""The eval and tune sections: how students are judged and how sweeps search."""

from __future__ import annotations

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


class EvalConfig(Section):
    models: list[EvalModelSpec] = Field(
        default_factory=list, description="Default: teacher, unrestored student, restored student."
    )
    student_path: str | None = Field(None, description="The restored student to evaluate (exported directory).")
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
