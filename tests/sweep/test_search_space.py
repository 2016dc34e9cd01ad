"""Sweep search spaces: every distribution kind, the errors a bad entry gives, and the settings
that can be swept."""

from __future__ import annotations

import math

import numpy as np
import pytest

from linearard_ray.config import ConfigError, build_config
from linearard_ray.sweep.search_space import apply_params, parse_space, to_tune_space
from tests.sweep.configs import base_config


def test_every_distribution_kind_parses_to_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    rng = np.random.default_rng()
    lo_f = float(rng.uniform(2.0, 3.0))
    hi_f = lo_f + float(rng.uniform(0.5, 4.0))
    lo_lr = float(10 ** rng.uniform(-6, -4))
    hi_lr = lo_lr * float(rng.uniform(20, 200))
    lo_r = int(rng.integers(1, 8))
    hi_r = lo_r + int(rng.integers(2, 6))
    grid = sorted({int(x) for x in rng.integers(1, 64, size=3)})
    space = {
        "lora.r": {"grid": grid},
        "objective.relation.layers": {"choice": ["all", "last:1", [0, 1]]},
        "rope.factor": {"uniform": [lo_f, hi_f]},
        "train.lr": {"loguniform": [lo_lr, hi_lr]},
        "train.warmup_steps": {"randint": [lo_r, hi_r]},
    }
    specs = {s.key: s for s in parse_space(space, base_config())}
    assert specs["lora.r"].kind == "grid" and list(specs["lora.r"].values) == grid
    assert specs["rope.factor"].low == lo_f and specs["rope.factor"].high == hi_f
    assert specs["train.warmup_steps"].low == lo_r and specs["train.warmup_steps"].high == hi_r

    dom = to_tune_space(list(specs.values()), "grid")
    assert dom["lora.r"] == {"grid_search": grid}
    assert isinstance(dom["objective.relation.layers"], Categorical)
    assert dom["objective.relation.layers"].categories == ["all", "last:1", [0, 1]]
    # with random (and optuna) search a grid list becomes a uniform choice
    assert isinstance(to_tune_space(list(specs.values()), "random")["lora.r"], Categorical)

    n = 4000
    u = np.asarray(dom["rope.factor"].sample(size=n))
    assert isinstance(dom["rope.factor"], Float) and u.min() >= lo_f and u.max() <= hi_f
    assert abs(u.mean() - (lo_f + hi_f) / 2) < 0.05 * (hi_f - lo_f)
    lg = np.log(np.asarray(dom["train.lr"].sample(size=n)))
    assert lg.min() >= math.log(lo_lr) - 1e-9 and lg.max() <= math.log(hi_lr) + 1e-9
    # log-uniform: the log of the samples is uniform, so its mean is the middle of the log range
    assert abs(lg.mean() - (math.log(lo_lr) + math.log(hi_lr)) / 2) < 0.05 * (math.log(hi_lr) - math.log(lo_lr))
    ints = dom["train.warmup_steps"].sample(size=n)
    assert isinstance(dom["train.warmup_steps"], Integer)
    assert set(int(i) for i in ints) == set(range(lo_r, hi_r + 1))  # both ends included


@pytest.mark.parametrize(
    "space, key, fragment",
    [
        ({"rope.factor": [2.0, 4.0]}, "rope.factor", "expected a mapping"),
        ({"rope.factor": {"grid": [2.0], "choice": [4.0]}}, "rope.factor", "exactly one distribution"),
        ({"rope.factor": {"normal": [2.0, 1.0]}}, "rope.factor", "unknown distribution 'normal'"),
        ({"rope.factor": {"grid": []}}, "rope.factor", "non-empty list"),
        ({"rope.factor": {"uniform": [4.0]}}, "rope.factor", "needs [low, high]"),
        ({"rope.factor": {"uniform": [4.0, 2.0]}}, "rope.factor", "low < high"),
        ({"rope.factor": {"uniform": [2.0, "x"]}}, "rope.factor", "finite numbers"),
        ({"train.lr": {"loguniform": [0.0, 1.0e-3]}}, "train.lr", "low > 0"),
        ({"lora.r": {"randint": [4.5, 16]}}, "lora.r", "integers"),
        ({"rope.factr": {"grid": [2.0]}}, "rope.factr", "'factr' is not a field of rope"),
        ({"train.lr.x": {"grid": [1.0]}}, "train.lr.x", "train.lr is a value"),
        ({"tune.num_samples": {"grid": [1, 2]}}, "tune.num_samples", "cannot be swept"),
        ({"data.teacher_samples.top_p": {"grid": [0.9, 1.0]}}, "data.teacher_samples.top_p", "cannot be swept"),
        ({"rope.factor": {"grid": [2.0, 0.5]}}, "rope.factor", "value 0.5 gives an invalid config"),
        ({"rope.type": {"choice": ["linear", "spiral"]}}, "rope.type", "value 'spiral'"),
        ({"lora.r": {"uniform": [4, 64]}}, "lora.r", "use randint or choice"),
        ({"train.lr": {"uniform": [-1.0, 1.0]}}, "train.lr", "value -1.0 gives an invalid config"),
    ],
)
def test_bad_space_entries_fail_naming_the_key(space, key, fragment):
    with pytest.raises(ConfigError) as e:
        parse_space(space, base_config())
    msg = str(e.value)
    assert f"tune.space[{key!r}]" in msg and fragment in msg, msg


def test_empty_space_is_an_error():
    with pytest.raises(ConfigError, match="tune.space is empty"):
        parse_space({}, base_config())


def test_objective_name_and_term_weights_are_sweepable():
    base = base_config()
    cpt = apply_params(base, {"objective.name": "cpt"})
    assert (cpt.objective.relation.weight, cpt.objective.logits.weight, cpt.objective.next_token.weight) == (0, 0, 1)
    w = float(np.random.default_rng().uniform(0.1, 3.0))
    mix = apply_params(base, {"objective.name": "linearard+logits", "objective.logits.weight": w})
    assert mix.objective.logits.weight == w and mix.objective.relation.weight == 1.0
    back = apply_params(cpt, {"objective.name": "linearard"})  # a named recipe drops the base's weights
    assert (back.objective.relation.weight, back.objective.next_token.weight) == (1.0, 0.0)
    custom_base = build_config(
        base.model_dump(mode="json"),
        {"objective.name": "custom", "objective.logits.weight": 0.5, "objective.next_token.weight": 0.25},
    )
    kept = apply_params(custom_base, {"objective.name": "custom", "rope.factor": 2.0})
    assert (kept.objective.logits.weight, kept.objective.next_token.weight) == (0.5, 0.25)
    per = apply_params(base, {"objective.relation.weights.v": 0.0, "objective.relation.layers": "last:1"})
    assert per.objective.relation.weights == {"q": 1.0, "k": 1.0, "v": 0.0}
    assert per.objective.relation.layers.resolve(2) == [1]
    with pytest.raises(ConfigError, match="every term has weight 0"):
        apply_params(base, {"objective.name": "custom", "objective.relation.weight": 0.0})
