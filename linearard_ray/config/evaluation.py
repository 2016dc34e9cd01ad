"""The eval and tune sections: how students are judged and how sweeps search."""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from linearard_ray.config.base import Section
from linearard_ray.config.model import RopeConfig
from linearard_ray.data.corpus import check_builtin, is_builtin
from linearard_ray.data.genres import GenreError, is_genre, parse_genre

# --------------------------------------------------------------------------- evaluation


class EvalModelSpec(Section):
    name: str
    path: str = Field(..., description="Hub id, directory, exported student, .gguf or 'smollm2-135m'.")
    rope: RopeConfig | None = Field(None, description="RoPE settings to apply; default: as in the checkpoint.")


# What each eval.preset sets. A field given in the config file or with --set keeps its value: the
# preset only fills in the fields left out (pydantic's fields set by the input, see _apply_preset).
# "standard" is the schema's own defaults.
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # A CPU smoke test of the report on SmolLM2-135M (docs/evaluation.md gives measured times): one
    # domain, one short and one long length, few windows and prompts, and no relation KL, which on a
    # CPU costs as much as all the other jobs together.
    "quick": {
        "relation_kl": False,
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
    # The restoration study's short-text judgement: windows enough for per-domain intervals (48 at
    # 512, 24 at 2048 on every domain) and three held-out genres that no recipe trains on, whose
    # mean and worst recovery the report gives with bootstrap intervals. The genres are built at
    # set-up (scripts/build_genre_corpora.py).
    "study": {
        "short_lengths": [512, 2048],
        "windows_by_length": {512: 48, 2048: 24},
        "domains": {
            "legal": ["genre:legal"],
            "standards": ["genre:standards"],
            "history": ["genre:history"],
        },
    },
    # Less noise and the extended window: for a GPU.
    "full": {
        "long_lengths": [4096, 8192, 16384, 32768],
        "max_windows": 16,
        "passkey_lengths": [1024, 4096, 8192, 16384, 32768],
        "passkey_depths": [0.1, 0.3, 0.5, 0.7, 0.9],
        "passkey_trials": 5,
    },
}


RESERVED_DOMAINS = ("main", "other", "passkey", "unseen")


def _check_eval_domains(domains: dict[str, list[str]]) -> dict[str, list[str]]:
    """Names usable in metric names and sources whose scheme and corpus exist; whether a genre is
    built and local files exist is checked when the evaluation starts (texts.check_source)."""
    for name, sources in domains.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or name in RESERVED_DOMAINS:
            raise ValueError(
                f"domains: {name!r} is not a domain name: letters, digits, '_' and '-', starting with a "
                f"letter, and none of {', '.join(RESERVED_DOMAINS)}"
            )
        if not sources:
            raise ValueError(f"domains.{name}: no sources; give at least one, e.g. [genre:legal]")
        for src in sources:
            try:
                if is_genre(src):
                    parse_genre(src)
                elif is_builtin(src):
                    check_builtin(src)
            except (GenreError, ValueError) as e:
                raise ValueError(f"domains.{name}: {e}") from None
    return domains


class EvalConfig(Section):
    preset: Literal["quick", "standard", "full", "study"] = Field(
        "standard",
        description="Defaults for the size of the evaluation: 'quick' (a CPU smoke test of SmolLM2-135M: "
        "one domain, lengths 512 and 1024, 2 windows, 2 passkey prompts at 512), "
        "'standard' (the defaults below), 'full' (16 windows, lengths up to 32768, 25 passkey prompts "
        "per length; for a GPU) or 'study' (48 windows at 512 and 24 at 2048 on every domain, and the "
        "held-out genres legal, standards and history as eval.domains). Fields set in the config or with "
        "--set override the preset.",
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
    domains: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Held-out evaluation domains, name -> sources (genre:<name>, builtin:<corpus>, local "
        "files), each evaluated like the texts at every length; the report gives the recovery on them "
        "(mean and worst, with bootstrap intervals) as 'recovery on unseen genres'. A domain of the same "
        "genre as data.sources is labelled in-domain and left out of that figure.",
    )
    short_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    long_lengths: list[int] = Field(default_factory=lambda: [4096, 8192])
    max_windows: int = Field(8, ge=1, description="Windows per length (more = less noise, more time).")
    windows_by_length: dict[int, int] = Field(
        default_factory=dict,
        description="Windows at particular lengths instead of max_windows, e.g. {512: 48, 2048: 24}.",
    )
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

    @field_validator("domains", mode="before")
    @classmethod
    def _one_source_as_list(cls, v: Any) -> Any:
        # `--set eval.domains.legal=genre:legal` gives a bare string
        return {k: [s] if isinstance(s, str) else s for k, s in v.items()} if isinstance(v, dict) else v

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _check_eval_domains(v)

    @field_validator("windows_by_length")
    @classmethod
    def _windows_by_length(cls, v: dict[int, int]) -> dict[int, int]:
        bad = {L: n for L, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"windows_by_length: every length needs at least one window, got {bad}")
        return v

    def windows_at(self, length: int) -> int:
        """How many windows an evaluation cuts at ``length``."""
        return self.windows_by_length.get(length, self.max_windows)

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
