"""The sweep's search space: parse ``tune.space``, check it against the config schema, turn it
into Ray Tune domains, and apply one trial's values to the base config.

A space maps a dotted config path to one distribution::

    rope.factor:               {grid: [2.0, 4.0]}
    objective.relation.layers: {choice: [all, "last:8", "every:2"]}
    train.lr:                  {loguniform: [1.0e-4, 1.0e-3]}
    objective.logits.weight:   {uniform: [0.0, 2.0]}
    lora.r:                    {randint: [8, 64]}        # both ends included

Everything is checked before Ray starts: the path must be a config field, and every grid/choice
value and both ends of every range must give a valid config, so a typo fails with the space key
named instead of inside a trial an hour later.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from linearard_ray.config import Config, ConfigError, build_config

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")


@dataclass(frozen=True)
class ParamSpec:
    """One swept config path: ``values`` for grid/choice, ``low``/``high`` for ranges."""

    key: str
    kind: str
    values: tuple = ()
    low: float | int | None = None
    high: float | int | None = None

    @property
    def finite(self) -> bool:
        return self.kind in ("grid", "choice")

    def candidates(self) -> list[Any]:
        """Values that must all give a valid config: every listed value, or both range ends."""
        return list(self.values) if self.finite else [self.low, self.high]


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"tune.space[{key!r}]: {msg}")


def _check_path(base: dict, key: str) -> None:
    """The dotted path must name an existing field (or a key of a dict-valued field)."""
    if not key or any(not p for p in key.split(".")):
        raise _err(key, "not a dotted config path like 'rope.factor'")
    if key.split(".")[0] == "tune":
        raise _err(key, "the tune section itself cannot be swept")
    if key.split(".")[:2] == ["data", "teacher_samples"]:
        # run_sweep samples once, before the trials, from the base config
        raise _err(
            key,
            "the teacher samples are made once for the whole sweep and cannot be swept; "
            "run one sweep per sample setting",
        )
    cur: Any = base
    walked: list[str] = []
    for part in key.split("."):
        if not isinstance(cur, dict):
            raise _err(key, f"{'.'.join(walked)} is a value, not a section")
        if part not in cur:
            where = ".".join(walked) or "the config"
            raise _err(key, f"{part!r} is not a field of {where} (it has: {', '.join(cur)})")
        cur = cur[part]
        walked.append(part)


def _number(key: str, kind: str, v: Any) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(key, f"{kind} bounds must be finite numbers, got {v!r}")
    return v


def _parse_one(key: str, spec: Any) -> ParamSpec:
    if not isinstance(spec, Mapping):
        raise _err(key, f"expected a mapping with one of {', '.join(KINDS)}, e.g. {{grid: [2.0, 4.0]}}; got {spec!r}")
    kinds = [k for k in spec]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise _err(key, f"unknown distribution {unknown[0]!r}; use one of {', '.join(KINDS)}")
    if len(kinds) != 1:
        raise _err(key, f"give exactly one distribution, got {len(kinds)} ({', '.join(map(str, kinds)) or 'none'})")
    kind = kinds[0]
    arg = spec[kind]
    if kind in ("grid", "choice"):
        if not isinstance(arg, (list, tuple)) or len(arg) == 0:
            raise _err(key, f"{kind} needs a non-empty list of values, got {arg!r}")
        return ParamSpec(key, kind, values=tuple(arg))
    if not isinstance(arg, (list, tuple)) or len(arg) != 2:
        raise _err(key, f"{kind} needs [low, high], got {arg!r}")
    low, high = (_number(key, kind, v) for v in arg)
    if not low < high:
        raise _err(key, f"{kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise _err(key, f"loguniform needs low > 0, got {low}")
    if kind == "randint":
        if not all(isinstance(v, int) or float(v).is_integer() for v in (low, high)):
            raise _err(key, f"randint bounds must be integers, got [{low}, {high}]")
        low, high = int(low), int(high)
    return ParamSpec(key, kind, low=low, high=high)


def parse_space(space: Mapping[str, Any], base: Config | None = None) -> list[ParamSpec]:
    """Parse ``tune.space``; with ``base``, also check every path and value against the schema."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            "tune.space is empty: name at least one config path to sweep, e.g. {'rope.factor': {'grid': [2.0, 4.0]}}"
        )
    specs = [_parse_one(str(k), v) for k, v in space.items()]
    if base is not None:
        check_space(specs, base)
    return specs


def check_space(specs: list[ParamSpec], base: Config) -> None:
    """Every path exists and every candidate value validates (ConfigError naming the key)."""
    raw = base_dict(base)
    for s in specs:
        _check_path(raw, s.key)
        for v in s.candidates():
            try:
                apply_params(raw, {s.key: v})
            except ConfigError as e:
                raise _err(s.key, f"value {v!r} gives an invalid config:\n{e}") from None
        if s.kind in ("uniform", "loguniform"):
            # Ranges produce fractional values: an integer field accepts the bounds but not these.
            mid = s.low + (s.high - s.low) * 0.371
            try:
                apply_params(raw, {s.key: mid})
            except ConfigError:
                raise _err(
                    s.key,
                    f"{s.kind} draws fractional values like {mid:.4g}, which this field does not accept; "
                    "use randint or choice",
                ) from None


def base_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def plain(v: Any) -> Any:
    """Tune may hand numpy scalars to the trial; configs and YAML want Python values."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def apply_params(base: Config | dict, params: Mapping[str, Any]) -> Config:
    """The base config with one trial's values set at their dotted paths, validated.

    Sweeping ``objective.name`` selects each named recipe with its own term weights: the base's
    weights are dropped for a named recipe (the recipe fills them in) unless a weight is swept
    alongside it; 'custom' keeps the base's weights.
    """
    raw = base_dict(base) if isinstance(base, Config) else base
    return build_config(raw, {k: plain(v) for k, v in params.items()})


REPEAT_KEY = "_repeat"  # not a config path: which repeat of its grid point a trial is (0, 1, ...)


def split_repeat(params: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """(the trial's config values, its repeat index)."""
    rest = {k: v for k, v in params.items() if k != REPEAT_KEY}
    return rest, int(params.get(REPEAT_KEY) or 0)


def to_tune_space(specs: list[ParamSpec], search: str, repeats: int = 1) -> dict[str, Any]:
    """Ray Tune domains. With search=grid, grid lists are enumerated and each point is repeated
    ``repeats`` times through a ``REPEAT_KEY`` grid of its own (Tune's num_samples would give the
    repeats identical configs, so a trial could not tell which repeat it is; every other
    distribution is sampled once per trial); with random or optuna a grid list is a uniform choice
    and num_samples is the number of trials."""
    from ray import tune

    out: dict[str, Any] = {}
    if search == "grid" and repeats > 1:
        out[REPEAT_KEY] = tune.grid_search(list(range(repeats)))
    for s in specs:
        if s.kind == "grid":
            out[s.key] = tune.grid_search(list(s.values)) if search == "grid" else tune.choice(list(s.values))
        elif s.kind == "choice":
            out[s.key] = tune.choice(list(s.values))
        elif s.kind == "uniform":
            out[s.key] = tune.uniform(s.low, s.high)
        elif s.kind == "loguniform":
            out[s.key] = tune.loguniform(s.low, s.high)
        else:  # Tune's randint excludes its upper bound; ours includes it
            out[s.key] = tune.randint(s.low, s.high + 1)
    return out


def grid_size(specs: list[ParamSpec], search: str, num_samples: int) -> int | None:
    """Number of trials the sweep runs (None when a searcher decides)."""
    if search != "grid":
        return num_samples
    n = 1
    for s in specs:
        if s.kind == "grid":
            n *= len(s.values)
    return n * num_samples


def trial_count_text(specs: list[ParamSpec], search: str, num_samples: int) -> str:
    """How many trials the sweep runs and why, e.g. "8 trials: grid of 2 rope.factor × 2
    objective.relation.layers values, × 2 repeats (tune.num_samples)"."""
    n = grid_size(specs, search, num_samples)
    if search != "grid":
        return f"{n} trials: tune.num_samples samples ({search} search)"
    sizes = [f"{len(s.values)} {s.key}" for s in specs if s.kind == "grid"]
    text = f"{n} trials: grid of " + (" × ".join(sizes) + " values" if sizes else "one point")
    if num_samples > 1:
        text += f", × {num_samples} repeats (tune.num_samples)"
    return text


def finite_combinations(specs: list[ParamSpec], keys: list[str]) -> list[dict[str, Any]] | None:
    """Every combination of the values of ``keys`` (all grid/choice), or None if one is a range."""
    chosen = [s for s in specs if s.key in keys]
    if any(not s.finite for s in chosen):
        return None
    return [
        dict(zip([s.key for s in chosen], combo, strict=False))
        for combo in itertools.product(*[s.values for s in chosen])
    ]


def config_hash(cfg: Config | dict, n: int = 8) -> str:
    d = base_dict(cfg) if isinstance(cfg, Config) else cfg
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:n]


def trial_name(sweep_name: str, trial_cfg: Config) -> str:
    """Deterministic: the sweep's name plus a hash of the trial's whole config, so a trial that
    is retried, or the same sweep started again, resumes the same training run, and a change to
    the base config starts new ones."""
    return f"{sweep_name}-{config_hash(trial_cfg)}"
