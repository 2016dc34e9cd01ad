"""Validated configuration for every stage.

One YAML file describes a whole job; each stage reads its own section. Every section forbids
unknown keys so that a typo fails at load time with the field's dotted path, before any Ray
worker starts. The sections live in ``model`` (model, rope, objective, lora), ``job`` (data,
train, tracking) and ``evaluation`` (eval, tune); ``loading`` holds the whole ``Config`` and
how it is read. Import everything from here.
"""

from linearard_ray.config.base import ConfigError, Section
from linearard_ray.config.evaluation import EvalConfig, EvalModelSpec, TuneConfig
from linearard_ray.config.job import (
    DEFAULT_MAX_STEPS,
    HELDOUT_METRICS,
    UNSEEN_MEAN,
    UNSEEN_WORST,
    DataConfig,
    ExportConfig,
    SampleSpec,
    TeacherSamplesConfig,
    TrackingConfig,
    TrainConfig,
    domain_metric,
)
from linearard_ray.config.loading import (
    OBJECTIVE_TERMS,
    RECIPE_NAMES,
    Config,
    build_config,
    dump_config,
    flatten,
    load_config,
    parse_overrides,
    select_named_objective,
    set_dotted,
)
from linearard_ray.config.model import (
    LayerSelection,
    LogitTerm,
    LoraConfig,
    ModelConfig,
    NextTokenTerm,
    ObjectiveConfig,
    RelationTerm,
    RopeConfig,
)

__all__ = [
    "DEFAULT_MAX_STEPS",
    "HELDOUT_METRICS",
    "UNSEEN_MEAN",
    "UNSEEN_WORST",
    "OBJECTIVE_TERMS",
    "RECIPE_NAMES",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvalModelSpec",
    "ExportConfig",
    "LayerSelection",
    "LogitTerm",
    "LoraConfig",
    "ModelConfig",
    "NextTokenTerm",
    "ObjectiveConfig",
    "RelationTerm",
    "RopeConfig",
    "SampleSpec",
    "Section",
    "TeacherSamplesConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "build_config",
    "domain_metric",
    "dump_config",
    "flatten",
    "load_config",
    "parse_overrides",
    "select_named_objective",
    "set_dotted",
]
