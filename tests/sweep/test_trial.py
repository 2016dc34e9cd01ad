"""Trial names: deterministic, distinct, with repeats and duplicates told apart."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from linearard_ray.sweep.search_space import apply_params, trial_name
from tests.sweep.configs import base_config


def test_trial_names_are_deterministic_and_distinct():
    from linearard_ray.sweep.trial import TrialNamer

    base = base_config()
    a = trial_name("sw", apply_params(base, {"rope.factor": 2.0}))
    assert a == trial_name("sw", apply_params(base, {"rope.factor": 2.0})) and a.startswith("sw-")
    assert a != trial_name("sw", apply_params(base, {"rope.factor": 3.0}))
    assert a != trial_name("sw", apply_params(base_config(**{"train.max_steps": 5}), {"rope.factor": 2.0}))
    namer = TrialNamer({"sweep_name": "sw", "base": base.model_dump(mode="json")})
    names = [namer(SimpleNamespace(config={"rope.factor": np.float64(f)})) for f in (2.0, 3.0, 2.0)]
    assert names == [a, trial_name("sw", apply_params(base, {"rope.factor": 3.0})), a + "-dup2"]
    # the repeats of a grid point are named by their REPEAT_KEY, so each one knows its seeds
    assert [namer(SimpleNamespace(config={"rope.factor": 2.0, "_repeat": k})) for k in (1, 2)] == [a + "-r2", a + "-r3"]
    # a sample the schema rejects still gets a name (the trial then fails and is reported)
    assert namer(SimpleNamespace(config={"rope.factor": 0.5})).startswith("sw-")
