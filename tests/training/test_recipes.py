"""The shipped configs: the default equals the embedded one, the recipes hold the settings they
claim, and their step plans come out as documented."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from linearard_ray.config import Config, ConfigError, load_config
from linearard_ray.training.plan import StreamSpec, plan_steps

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_default_yaml_is_the_embedded_default():
    assert load_config(CONFIGS / "default.yaml").model_dump() == Config().model_dump()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.budget_tokens or cfg.train.max_steps


def test_expected_recipes_exist():
    want = {
        "default.yaml",
        "llama2-7b-32k.yaml",
        "llama2-13b-32k.yaml",
        "llama3-70b-x4.yaml",
        "llama3-8b-x4.yaml",
        "mistral-7b-x4.yaml",
        "smollm2-135m-x4.yaml",
        "smollm2-135m-x4-logits.yaml",
        "smollm2-135m-x4-cpt.yaml",
        "smollm2-135m-yarn4.yaml",
        "smollm2-135m-yarn4-restore.yaml",
    }
    assert want <= set(RECIPES)


def test_llama2_recipe_is_the_papers_setting():
    c = load_config(CONFIGS / "llama2-7b-32k.yaml")
    assert (c.rope.type, c.rope.factor, c.rope.original_max_position_embeddings) == ("linear", 8.0, 4096)
    assert (c.lora.r, c.lora.alpha, sorted(c.lora.target_modules)) == (1024, 2048.0, ["k_proj", "q_proj", "v_proj"])
    t = c.train
    assert (t.lr, t.warmup_steps, t.min_lr_ratio, t.max_grad_norm, t.budget_tokens) == (2e-5, 4, 0.9, 5.0, 4_250_000)
    assert c.data.ctx_len == 4096 and c.objective.name == "linearard"
    streams = {"train": StreamSpec("train", "/x", 10_000, 4096)}
    total, per_step = plan_steps(c, streams, "train", t.num_workers)
    assert per_step == t.num_workers * 4096 and total == math.ceil(4_250_000 / per_step)


def test_objective_recipes():
    base = load_config(CONFIGS / "smollm2-135m-x4.yaml")
    logits = load_config(CONFIGS / "smollm2-135m-x4-logits.yaml")
    cpt = load_config(CONFIGS / "smollm2-135m-x4-cpt.yaml")
    assert logits.objective.logits.weight == 1.0 and logits.objective.relation.weight == 1.0
    assert base.objective.logits.weight == 0.0
    assert not cpt.objective.needs_teacher and cpt.objective.relation.weight == 0
    assert cpt.uses_lm_stream() and cpt.data.lm_ctx_len == 8192
    # same budget, so the three compare at equal tokens
    assert base.train.budget_tokens == logits.train.budget_tokens == cpt.train.budget_tokens


def test_yarn_recipe_differs_from_the_pi_recipe_only_in_rope_and_name():
    """The study's best restorer: the PI×4 recipe with a YaRN×4 student, so the two compare."""
    pi = load_config(CONFIGS / "smollm2-135m-x4.yaml").model_dump()
    yarn = load_config(CONFIGS / "smollm2-135m-yarn4.yaml").model_dump()
    assert (yarn["rope"]["type"], yarn["rope"]["factor"]) == ("yarn", 4.0)
    assert yarn["rope"]["yarn_logit_correction"] == "divide"
    for section in ("model", "objective", "lora", "data", "eval"):
        assert yarn[section] == pi[section], section
    diff = {k for k in pi["train"] if pi["train"][k] != yarn["train"][k]}
    assert diff == {"run_name"}


@pytest.mark.parametrize("config", [None, "smollm2-135m-x4-logits.yaml", "smollm2-135m-x4-cpt.yaml"])
def test_naming_a_recipe_on_the_command_line_brings_its_weights(config):
    """--set objective.name=X on a config that spells out every weight (the written-out default,
    a recipe of another objective) gives X's weights, not the file's; weights set alongside win."""
    path = None if config is None else CONFIGS / config
    presets = {"linearard": (1.0, 0.0, 0.0), "linearard+logits": (1.0, 1.0, 0.0), "cpt": (0.0, 0.0, 1.0)}
    for name, want in presets.items():
        o = load_config(path, [f"objective.name={name}"]).objective
        assert (o.relation.weight, o.logits.weight, o.next_token.weight) == want, (config, name)
    o = load_config(path, ["objective.name=linearard+logits", "objective.logits.weight=0.25"]).objective
    assert (o.relation.weight, o.logits.weight) == (1.0, 0.25)
    if config is None:  # 'custom' keeps the weights the written-out default spells out
        o = load_config(path, ["objective.name=custom", "objective.logits.weight=0.5"]).objective
        assert (o.relation.weight, o.logits.weight, o.next_token.weight) == (1.0, 0.5, 0.0)


def test_overriding_one_train_field_keeps_the_default_budget():
    assert load_config(None, ["train.lr=1e-4"]).train.max_steps == Config().train.max_steps
    only_tokens = load_config(None, ["train.budget_tokens=100000"]).train
    assert only_tokens.max_steps is None and only_tokens.budget_tokens == 100000


@pytest.mark.parametrize(
    "overrides,want",
    [
        (["objective.relation.weights.v=0.5"], {"q": 1.0, "k": 1.0, "v": 0.5}),
        (["objective.relation.weights={k: 0}"], {"q": 1.0, "k": 0.0, "v": 1.0}),
        (["objective.relation.weights={q: 0.1, k: 0.1, v: 1}"], {"q": 0.1, "k": 0.1, "v": 1.0}),
        ([], {"q": 1.0, "k": 1.0, "v": 1.0}),
        # the attention map is not one of LinearARD's three: absent unless given, the others stay on
        (["objective.relation.weights.qk=0.5"], {"q": 1.0, "k": 1.0, "v": 1.0, "qk": 0.5}),
    ],
)
def test_setting_one_relation_weight_leaves_the_others_on(overrides, want):
    """A relation the user does not name keeps weight 1 (it was once silently set to 0)."""
    assert load_config(None, overrides).objective.relation.weights == want
    on_file = load_config(CONFIGS / "smollm2-135m-x4.yaml", overrides).objective.relation.weights
    assert on_file == want


def test_negative_relation_weight_is_rejected():
    with pytest.raises(ConfigError, match="relation weight v"):
        load_config(None, ["objective.relation.weights.v=-1"])


# The models the big recipes name, as config dicts (no network); their parameter counts are
# checked against the real models in tests/training/test_memory.py.
_GPU_LINE = re.compile(r"^# GPUs: (\d+) × (\S+) \((\d+) GB\)( at least)? \(memory estimate: ([\d.]+) GiB per GPU")


def _model_dicts():
    from tests.training.test_memory import LLAMA2_7B, LLAMA2_13B, LLAMA3_70B

    return {
        "meta-llama/Llama-2-7b-hf": LLAMA2_7B,
        "meta-llama/Llama-2-13b-hf": LLAMA2_13B,
        "meta-llama/Meta-Llama-3-70B": LLAMA3_70B,
    }


def test_big_recipes_state_their_gpus():
    stated = {name for name in RECIPES if "\n# GPUs: " in (CONFIGS / name).read_text()}
    assert {"llama2-7b-32k.yaml", "llama2-13b-32k.yaml", "llama3-70b-x4.yaml"} <= stated


@pytest.mark.parametrize("name", ["llama2-7b-32k.yaml", "llama2-13b-32k.yaml", "llama3-70b-x4.yaml"])
def test_recipe_header_gpus_agree_with_the_memory_estimate(name):
    """'# GPUs: N × CARD (M GB) [at least] (memory estimate: X GiB per GPU': N is the recipe's
    worker count, the estimate on that card fits with N workers and is X; 'at least': N - 1 does not."""
    from linearard_ray.training.memory import estimate_for_config, gpu_memory_gib

    text = (CONFIGS / name).read_text()
    found = [m for m in map(_GPU_LINE.match, text.splitlines()) if m]
    assert len(found) == 1, f"{name}: one '# GPUs: N × CARD (M GB) ... (memory estimate: X GiB per GPU' line"
    n, card, _, at_least, stated = found[0].groups()
    cfg = load_config(CONFIGS / name)
    model = _model_dicts()[cfg.model.teacher]
    assert int(n) == cfg.train.num_workers
    if cfg.train.accelerator_type is not None:
        assert cfg.train.accelerator_type == card
    gib = gpu_memory_gib(card)
    est = estimate_for_config(cfg, model, gib)
    assert est.fits and f"{est.total / 2**30:.1f}" == stated
    if at_least:
        assert not estimate_for_config(cfg, model, gib, workers=int(n) - 1).fits
