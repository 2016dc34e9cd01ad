"""research/recipe_from_sweep.py: the genre sweep's winner, as tune.py writes it (best_config.yaml,
on the shipped teacher corpus as a lent host runs it), becomes the recommended recipe with exactly
the swept values and the sweep's overrides changed: the sweep's plumbing and the unpacked corpus
stay out, and the result is a config distill.py accepts."""

from __future__ import annotations

import yaml

from linearard_ray.config import build_config, load_config
from linearard_ray.sweep.search_space import base_dict, parse_space
from linearard_ray.sweep.summary import best_config_yaml
from tests.scripts import ROOT, load_script

SWEEP = ROOT / "configs" / "sweep-smollm2-135m-genres.yaml"
BASE = ROOT / "configs" / "smollm2-135m-x4-restore-general.yaml"


def _best_config(tmp_path, params: dict, overrides: dict | None = None) -> str:
    """best_config.yaml as tune.py writes it for a sweep run by research/gpu_round.sh sweep."""
    shipped = load_script("research/sweep_on_shipped_samples.py")
    samples = str(tmp_path / "w" / "teacher_samples.jsonl")
    derived = shipped.with_shipped_samples(yaml.safe_load(SWEEP.read_text()), samples)
    cfg = build_config(derived, overrides or {})
    specs = parse_space(cfg.tune.space, cfg)
    row = {"trial": "trial_00007", "unseen_worst_recovery_pct": 101.5, **params}
    plan = {"base": base_dict(cfg), "sweep_name": cfg.tune.sweep_name}
    return best_config_yaml(plan, row, specs, "unseen_worst_recovery_pct")


def test_the_winner_changes_only_what_it_trained_differently(tmp_path):
    mod = load_script("research/recipe_from_sweep.py")
    samples = str(tmp_path / "w" / "teacher_samples.jsonl")
    params = {
        "data.sources": ["genre:scripture", "genre:fortunes", "genre:lexicon", samples],
        "data.pack": "best_fit",
        "objective.relation.weights.q": 0.1,  # the base recipe's own value: no change
        "objective.relation.weights.k": 0.0,
        "objective.relation.weights.qk": 3.0,
        "objective.logits.weight": 0.5,
        "objective.next_token.weight": 2.2,  # the base's own value
    }
    best = tmp_path / "best_config.yaml"
    best.write_text(_best_config(tmp_path, params, {"rope.type": "yarn"}))
    out = tmp_path / "smollm2-135m-yarn4-restore-searched.yaml"
    assert mod.main(["--best", str(best), "--base", str(BASE), "--out", str(out)]) == 0
    recipe, base = load_config(out), load_config(BASE)
    assert recipe.data.sources == ["genre:scripture", "genre:fortunes", "genre:lexicon"]  # corpus dropped
    assert recipe.rope.type == "yarn"  # the sweep's override is part of what the winner trained
    assert recipe.data.pack == "best_fit"
    weights = recipe.objective.relation.weights
    assert (weights["q"], weights["k"], weights["qk"]) == (0.1, 0.0, 3.0) and recipe.objective.logits.weight == 0.5
    assert recipe.train.run_name == out.stem
    # the sweep's plumbing is not carried: the recipe's budget, screen, teacher sampling and report stay
    assert recipe.train.budget_tokens == base.train.budget_tokens == 4_250_000
    assert recipe.train.eval_every == base.train.eval_every and recipe.eval == base.eval
    assert recipe.data.teacher_samples == base.data.teacher_samples
    changed = {line.split(":")[0].strip("# ") for line in out.read_text().splitlines() if " -> " in line}
    assert changed == {
        "data.sources",
        "data.pack",
        "rope.type",
        "objective.relation.weights.k",
        "objective.relation.weights.qk",
        "objective.logits.weight",
    }
    assert out.read_text().startswith("# Best trial of sweep smollm2-135m-pi4-genres: trial_00007")


def test_a_winner_equal_to_the_base_writes_nothing(tmp_path, capsys):
    mod = load_script("research/recipe_from_sweep.py")
    samples = str(tmp_path / "w" / "teacher_samples.jsonl")
    params = {
        "data.sources": ["builtin:sotu/train", "genre:scripture", "genre:fortunes", "genre:lexicon", samples],
        "data.pack": True,
        "objective.relation.weights.q": 0.1,
        "objective.relation.weights.k": 0.1,
        "objective.relation.weights.qk": 1.0,
        "objective.logits.weight": 1.0,
        "objective.next_token.weight": 2.2,
    }
    best = tmp_path / "best_config.yaml"
    best.write_text(_best_config(tmp_path, params))
    out = tmp_path / "same.yaml"
    assert mod.main(["--best", str(best), "--base", str(BASE), "--out", str(out)]) == 0
    assert not out.exists() and "nothing to write" in capsys.readouterr().out


def test_only_the_unpacked_teacher_corpus_leaves_the_mix(tmp_path, capsys):
    """A local corpus the winner trained on stays in the recipe, named in a warning; the unpacked
    teacher corpus goes (the recipe samples its own)."""
    import copy

    mod = load_script("research/recipe_from_sweep.py")
    base = load_config(BASE).model_dump(mode="json")
    best = copy.deepcopy(base)
    best["data"]["sources"] = ["genre:scripture", "/data/unixdocs.jsonl.xz", "/tmp/w/teacher_samples.jsonl"]
    changes = mod.winner_changes(best, base)
    assert changes == {"data.sources": ["genre:scripture", "/data/unixdocs.jsonl.xz"]}
    assert mod.local_sources(changes) == ["/data/unixdocs.jsonl.xz"]
    best_file = tmp_path / "best_config.yaml"
    best_file.write_text(yaml.safe_dump(best))
    assert mod.main(["--best", str(best_file), "--base", str(BASE), "--out", str(tmp_path / "r.yaml")]) == 0
    assert "the mix reads /data/unixdocs.jsonl.xz by path" in capsys.readouterr().err
