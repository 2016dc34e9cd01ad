"""The models an evaluation compares (teacher, RoPE-scaled baseline, restored student, or an
explicit list), the device they run on, and how each is loaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linearard_ray.config import Config, ConfigError, RopeConfig
from linearard_ray.logs import get_logger


class EvalError(RuntimeError):
    """Evaluation cannot run as configured; the message says why."""


@dataclass
class ModelSpec:
    name: str
    path: str
    rope: RopeConfig | None  # None = the RoPE of the checkpoint
    role: str  # teacher | scaled | restored | model

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "role": self.role,
            "rope": self.rope.model_dump(mode="json", exclude_none=True) if self.rope else "from checkpoint",
        }


def log_progress(msg: str) -> None:
    get_logger(__name__).info(f"[evaluate] {msg}")


def model_specs(cfg: Config) -> list[ModelSpec]:
    """The models to evaluate: `eval.models`, or teacher / scaled / restored by default.

    With an explicit list, the model named 'teacher' (else the first) is the reference for
    relation KL and restoration; the unrestored baseline of "gap closed" is the model named
    'scaled', else the first other entry that sets `rope` (a RoPE-scaled copy), else none.
    """
    ev = cfg.eval
    if ev.models:
        names = [m.name for m in ev.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"eval.models: duplicate model names {dup}")
        ref = "teacher" if "teacher" in names else names[0]
        scaled = (
            "scaled"
            if "scaled" in names
            else next((m.name for m in ev.models if m.rope is not None and m.name != ref), None)
        )
        return [
            ModelSpec(
                m.name, m.path, m.rope, "teacher" if m.name == ref else ("scaled" if m.name == scaled else "model")
            )
            for m in ev.models
        ]
    specs = [
        ModelSpec("teacher", cfg.model.teacher, None, "teacher"),
        ModelSpec("scaled", cfg.model.teacher, cfg.rope, "scaled"),
    ]
    if ev.student_path:
        specs.append(ModelSpec("restored", ev.student_path, None, "restored"))
    return specs


def _field_of(spec: ModelSpec, cfg: Config) -> str:
    """The config field a model's path came from, for error messages."""
    if cfg.eval.models:
        return f"eval.models[{spec.name}].path"
    return "eval.student_path" if spec.role == "restored" else "model.teacher"


def _local_path_problem(path: str) -> str | None:
    """Why a path meant as a local model directory cannot be loaded (None: fine, or not local).

    A path counts as local when it exists or its first component does (``outputs/students/x``
    would otherwise pass for a hub id and fail only when it is loaded, after other models ran)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if path.endswith(".gguf"):
        return None if p.is_file() else f"GGUF file not found: {p}"
    if p.is_dir():
        if (p / "config.json").exists():
            return None
        if (p / "merged" / "config.json").exists():
            return f"{p} is a training run's export directory; the model is in its merged/ subdirectory: {p / 'merged'}"
        return f"{p} is a directory without config.json, so not a model directory"
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or Path(p.parts[0]).exists()
    return f"{p} does not exist" if looks_local else None


def check_model_paths(specs: list[ModelSpec], cfg: Config) -> None:
    """Fail before any job runs when a local model path cannot be loaded, naming its field."""
    problems = [f"{_field_of(s, cfg)}={s.path!r}: {why}" for s in specs if (why := _local_path_problem(s.path))]
    if problems:
        raise EvalError("cannot evaluate these models:\n  " + "\n  ".join(problems))


def eval_device(cfg: Config) -> torch.device:
    """``eval.device`` as a torch device ('auto': CUDA when there is one)."""
    d = cfg.eval.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise ConfigError(f"eval.device: {d!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"eval.device is {d!r} but CUDA is not available here")
    return dev


def load_eval_model(spec: ModelSpec, cfg: Config, device: torch.device):
    from linearard_ray.models.loading import load_model

    return load_model(spec.path, cfg.model, rope_cfg=spec.rope, device=device)


def reference_tokenizer(cfg: Config, specs: list[ModelSpec]):
    """The reference model's tokenizer; every model is fed the same token ids."""
    from linearard_ray.models.loading import load_tokenizer

    teacher = next(s for s in specs if s.role == "teacher")
    return load_tokenizer(cfg.model.model_copy(update={"teacher": teacher.path}))


def max_window(model) -> int:
    """The model's max_position_embeddings (0 when it has none)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)
