"""The whole job's configuration and how it is read: YAML, dotted overrides, one clear error."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
)

from linearard_ray.config.base import ConfigError, Section
from linearard_ray.config.evaluation import EvalConfig, TuneConfig
from linearard_ray.config.job import DEFAULT_MAX_STEPS, DataConfig, ExportConfig, TrackingConfig, TrainConfig
from linearard_ray.config.model import LoraConfig, ModelConfig, ObjectiveConfig, RopeConfig

# --------------------------------------------------------------------------- top level


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    rope: RopeConfig = Field(default_factory=RopeConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=DEFAULT_MAX_STEPS))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def uses_lm_stream(self) -> bool:
        """Whether the next-token term reads a stream of blocks of its own (the one place this is
        decided: preprocessing, training and sweeps all ask here)."""
        return self.objective.next_token.weight > 0 and self.data.lm_data_differs()


# --------------------------------------------------------------------------- loading


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'<line>:<column>: <problem>' (1-based) of a YAML syntax error, as editors count them."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return problem
    return f"{mark.line + 1}:{mark.column + 1}: {problem}"


def _parse_value(raw: str, key: str = "") -> Any:
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"invalid configuration: --set {key}={raw}: not a YAML value ({_yaml_problem(e)}); "
            "quote a string that holds YAML punctuation"
        ) from None


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """Set d[a][b][c] = value for dotted 'a.b.c', creating sections as needed."""
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip(), k.strip())
    return out


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        msg = msg.removeprefix("Value error, ")  # our validators' own messages stand alone
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


RECIPE_NAMES = ("linearard", "linearard+logits", "cpt")
OBJECTIVE_TERMS = ("relation", "logits", "next_token")


def select_named_objective(raw: dict, values: dict[str, Any]) -> None:
    """Before the dotted `values` are applied to `raw`: when they name an objective recipe, drop
    the term weights `raw` already has, except those set alongside, so the recipe fills them in.

    A written-out config (configs/default.yaml, a dumped best_config.yaml) spells out every weight,
    so `--set objective.name=linearard+logits` on it would otherwise keep logits.weight 0 and train
    plain LinearARD under the other name. 'custom' keeps the weights."""
    if values.get("objective.name") not in RECIPE_NAMES:
        return
    obj = raw.get("objective")
    if not isinstance(obj, dict):
        return
    for term in OBJECTIVE_TERMS:
        sec = obj.get(term)
        if isinstance(sec, dict) and f"objective.{term}.weight" not in values:
            sec.pop("weight", None)


def build_config(data: dict | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Validate a raw dict (plus dotted overrides) into a Config, or raise ConfigError naming the field."""
    raw = copy.deepcopy(data or {})
    select_named_objective(raw, overrides or {})
    for k, v in (overrides or {}).items():
        set_dotted(raw, k, v)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def _read_yaml(p: Path) -> dict:
    """The sections of a YAML config file; a syntax error is reported with its line and column."""
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid configuration: {p}:{_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"invalid configuration: {p}: not UTF-8 text (byte {e.start})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return loaded or {}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read YAML (or nothing: the embedded default), apply `--set` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        data = _read_yaml(p)
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return build_config(data, ov)


def dump_config(cfg: Config) -> str:
    """YAML that `load_config` accepts as it is."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> scalar, for MLflow params."""
    d = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
