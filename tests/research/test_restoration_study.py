"""The restoration study driver (research/restoration_study.py): the shipped SmolLM2 recipes are the
variants it measured, its variants validate, and its seeds, GPU shares, evaluation lists and tables
from raw evaluation jobs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from linearard_ray.config import load_config
from tests.scripts import load_script

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_vlogits_recipe_is_the_measured_study_variant():
    """configs/smollm2-135m-x4-vlogits.yaml must stay what restoration_study's vlogits-hilr ran
    (research/LOG.md round 3): the PI×4 recipe plus that variant's overrides at 4.25M tokens."""
    overrides, _ = _study().VARIANTS["vlogits-hilr"]
    ran = load_config(CONFIGS / "smollm2-135m-x4.yaml", [*overrides, "train.budget_tokens=4250000"]).model_dump()
    recipe = load_config(CONFIGS / "smollm2-135m-x4-vlogits.yaml").model_dump()
    ran["train"]["run_name"] = recipe["train"]["run_name"]
    assert recipe == ran
    assert recipe["objective"]["relation"]["weights"] == {"q": 0.1, "k": 0.1, "v": 1.0}


def test_restore_recipe_is_the_measured_study_variant(tmp_path):
    """configs/smollm2-135m-x4-restore.yaml must stay what restoration_study's tsample-vmix-ce2 ran
    (research/LOG.md round 5), its teacher samples made by the job (data.teacher_samples) with the
    settings of the study's sample phase instead of a file in the study's work dir."""
    study = _study()
    sets = [s.replace(f", {study.TEACHER_SAMPLES}", "") for s in study.VARIANTS["tsample-vmix-ce2"][0]]
    ran = load_config(CONFIGS / "smollm2-135m-x4.yaml", [*sets, "train.budget_tokens=4250000"]).model_dump()
    recipe = load_config(CONFIGS / "smollm2-135m-x4-restore.yaml").model_dump()
    ts = recipe["data"].pop("teacher_samples")
    ran["data"].pop("teacher_samples")
    ran["train"]["run_name"] = recipe["train"]["run_name"]
    assert recipe == ran
    assert recipe["objective"]["next_token"]["weight"] == 0.2 and recipe["data"]["sources"] == ["builtin:sotu/train"]
    # the study's sample phase: --samples 2080 --tokens 2048 --top-p 0.95, seed 0, batch 1040 (round 5)
    assert ts == {
        "num_samples": 2080,
        "max_new_tokens": 2048,
        "min_tokens": 64,
        "batch_size": 1040,
        "temperature": 1.0,
        "top_p": 0.95,
        "seed": 0,
        "path": None,
    }


def _assert_sampling_recipe_is_variant(config: str, variant: str) -> dict:
    """Assert configs/<config> is what restoration_study's <variant> ran at 4.25M tokens, its teacher
    samples made by the job with -restore's settings instead of read from the study's work dir;
    returns the recipe (less its teacher_samples block) for the caller's own checks."""
    study = _study()
    sets = [s.replace(f", {study.TEACHER_SAMPLES}", "") for s in study.VARIANTS[variant][0]]
    ran = load_config(CONFIGS / "smollm2-135m-x4.yaml", [*sets, "train.budget_tokens=4250000"]).model_dump()
    recipe = load_config(CONFIGS / config).model_dump()
    restore = load_config(CONFIGS / "smollm2-135m-x4-restore.yaml").model_dump()
    assert recipe["data"].pop("teacher_samples") == restore["data"]["teacher_samples"]
    ran["data"].pop("teacher_samples")
    ran["train"]["run_name"] = recipe["train"]["run_name"]
    assert recipe == ran
    return recipe


def test_yarn_restore_recipe_is_the_measured_study_variant():
    """configs/smollm2-135m-yarn4-restore.yaml must stay what round 10's tsample-vmix-ce22-yarn ran:
    -restore's teacher samples, on the YaRN×4 student, with the next-token term at 2.2."""
    recipe = _assert_sampling_recipe_is_variant("smollm2-135m-yarn4-restore.yaml", "tsample-vmix-ce22-yarn")
    assert (recipe["rope"]["type"], recipe["rope"]["factor"], recipe["objective"]["next_token"]["weight"]) == (
        "yarn",
        4.0,
        2.2,
    )


def test_restore_docs_recipe_is_the_measured_study_variant(tmp_path):
    """configs/smollm2-135m-x4-restore-docs.yaml is round 7's unix-vmix-ce2-8k: -restore plus the
    unixdocs corpus at the path its header builds it to, on packed 8K blocks; only the sources'
    order differs (the job appends the teacher samples after the files given)."""
    study = _study()
    ran = load_config(
        CONFIGS / "smollm2-135m-x4.yaml", [*study.variant_sets("unix-vmix-ce2-8k", tmp_path, 4_250_000, [], None)]
    ).model_dump()
    recipe = load_config(CONFIGS / "smollm2-135m-x4-restore-docs.yaml").model_dump()
    restore = load_config(CONFIGS / "smollm2-135m-x4-restore.yaml").model_dump()
    assert ran["data"]["sources"] == [
        "builtin:sotu/train",
        f"{tmp_path}/teacher_samples.jsonl",
        f"{tmp_path}/unixdocs.jsonl.xz",
    ]
    assert recipe["data"]["sources"] == ["builtin:sotu/train", "outputs/data/unixdocs.jsonl.xz"]
    assert recipe["data"]["teacher_samples"] == restore["data"]["teacher_samples"]
    for d in (ran, recipe, restore):
        d["data"].pop("sources")
        d["data"].pop("teacher_samples")
        d["train"] = {
            k: v
            for k, v in d["train"].items()
            if k not in ("run_name", "storage_path", "output_dir", "gpus_per_worker")
        }
        d.pop("tracking")
    assert recipe == ran
    # what the 8K version changes in -restore, and nothing else
    assert (recipe["data"]["ctx_len"], recipe["data"]["pack"], recipe["train"]["micro_batch_size"]) == (8192, True, 1)
    assert (restore["data"]["ctx_len"], restore["data"]["pack"], restore["train"]["micro_batch_size"]) == (
        2048,
        False,
        2,
    )
    for d in (recipe, restore):
        d["data"].pop("ctx_len"), d["data"].pop("pack"), d["train"].pop("micro_batch_size")
    assert recipe == restore


def _study():
    return load_script("research/restoration_study.py")


def test_every_study_variant_is_a_valid_configuration(tmp_path):
    """A typo in a variant's overrides must fail here, not on the GPU host after the runs before it."""
    study = _study()
    names = set()
    for name, (_, description) in study.VARIANTS.items():
        sets = study.variant_sets(name, tmp_path, 4_250_000, [], 0.25)
        cfg = study.validate(study.RECIPE, sets)
        assert description and cfg.train.run_name == f"study-{name}"
        assert cfg.train.budget_tokens == 4_250_000 and cfg.train.gpus_per_worker == 0.25
        sources = list(cfg.data.sources) + list(cfg.data.lm_sources or [])
        assert not any("{work}" in s for s in sources)
        if name.startswith("tsample-"):
            assert str(tmp_path / "teacher_samples.jsonl") in cfg.data.sources
        names.add(cfg.train.run_name)
    assert len(names) == len(study.VARIANTS)


def test_study_seeds_train_each_variant_once_per_seed(tmp_path):
    """--seeds 0-2,5 trains each named variant four times: seed 0 as defined, seed k as its -s<k>
    twin with train.seed and data.seed k (LoRA init, block order), which the recipe table groups."""
    study = _study()
    assert study.parse_seeds("0-2,5,1") == [0, 1, 2, 5]
    for bad in ("3-1", "a", "", "-1"):
        with pytest.raises(SystemExit):
            study.parse_seeds(bad)
    names = study.expand_seeds(["cpt", "tsample-vmix-ce22-s1"], study.parse_seeds("0-2,5"))
    assert names == [
        "cpt",
        "cpt-s1",
        "cpt-s2",
        "cpt-s5",
        "tsample-vmix-ce22",
        "tsample-vmix-ce22-s1",
        "tsample-vmix-ce22-s2",
        "tsample-vmix-ce22-s5",
    ]
    base = study.variant_sets("cpt", tmp_path, None, [], None)
    five = study.variant_sets("cpt-s5", tmp_path, None, [], None)
    assert not any(x.startswith(("train.seed=", "data.seed=")) for x in base)
    assert [x for x in five if x not in base and "run_name" not in x] == ["train.seed=5", "data.seed=5"]
    assert study.SEED_SUFFIX.sub("", "cpt-s5") == "cpt"
    # a '-s<k>' name of a known variant is defined on demand, so one list can mix seed counts
    assert "tsample-vmix-ce22-yarn-s7" not in study.VARIANTS
    assert study.seeded_twin("tsample-vmix-ce22-yarn-s7") == "tsample-vmix-ce22-yarn-s7"
    seven = study.variant_sets("tsample-vmix-ce22-yarn-s7", tmp_path, None, [], None)
    assert "rope.type=yarn" in seven and "train.seed=7" in seven and "data.seed=7" in seven
    assert study.seeded_twin("no-such-variant-s1") not in study.VARIANTS


@pytest.mark.parametrize("gpus,jobs", [(1, 5), (2, 10), (2, 5), (4, 6), (3, 7), (2, 1), (8, 3)])
def test_study_gpu_share_spreads_parallel_runs_over_every_gpu(gpus, jobs):
    """Ray places fractional shares first-fit, GPU by GPU: every run must fit, and no GPU may get
    more than its even part of the runs."""
    share = _study().gpu_share(gpus, jobs)
    assert 0 < share <= 1.0
    free, placed = [1.0] * gpus, []
    for _ in range(jobs):
        i = next(i for i, f in enumerate(free) if f >= share - 1e-9)
        free[i] -= share
        placed.append(i)
    assert max(placed.count(i) for i in range(gpus)) == -(-jobs // gpus)


def test_study_eval_only_keeps_the_named_models(tmp_path, capsys):
    """The long-context round evaluates the trained students (and the teacher, evaluate.py's reference for
    recovery and relation KL); a misspelt name must not shrink it silently."""
    import json
    import shlex

    study = _study()
    student = tmp_path / "students" / "tsample-vonly"
    student.mkdir(parents=True)
    (tmp_path / "runs.jsonl").write_text(
        json.dumps({"variant": "tsample-vonly", "returncode": 0, "student": str(student)}) + "\n"
    )
    assert study.run_eval(tmp_path, None, [], study.RECIPE, dry_run=True, only=["tsample-vonly", "YaRN×4"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("== eval:"))
    words = shlex.split(line.removeprefix("== eval:"))  # the printed command pastes into a shell
    models = json.loads(next(w for w in words if w.startswith("eval.models=")).removeprefix("eval.models="))
    assert [m["name"] for m in models] == ["teacher", "YaRN×4", "tsample-vonly"]
    assert models[2]["path"] == str(student)
    with pytest.raises(SystemExit, match="tsample-vmix"):
        study.run_eval(tmp_path, None, [], study.RECIPE, dry_run=True, only=["tsample-vmix"])


def test_study_tables_from_raw_evaluation_jobs(tmp_path):
    """An evaluation cut short leaves only jobs.jsonl: its figures must table exactly, later rounds winning."""
    import json

    study = _study()
    rng = np.random.default_rng()
    t_nll, m_nll = rng.uniform(2.0, 3.0, 2)
    tokens = int(rng.integers(1000, 5000))
    hits = rng.random(9) < 0.5
    hits24 = rng.random(24) < 0.5  # a later round with more trials per depth: its own table

    def nll(model, domain, length, per_token, window=8192):
        return {
            "key": "k",
            "result": {
                "kind": "nll",
                "model": model,
                "domain": domain,
                "length": length,
                "nll_sum": per_token * tokens,
                "tokens": tokens,
                "max_position_embeddings": window,
            },
        }

    first = [
        nll("teacher", "main", 512, t_nll),
        nll("s", "main", 512, m_nll + 1.0),
        {
            "key": "k",
            "result": {
                "kind": "passkey",
                "model": "s",
                "length": 8192,
                "results": [{"correct": bool(h)} for h in hits],
            },
        },
        {
            "key": "k",
            "result": {
                "kind": "passkey",
                "model": "s",
                "length": 8192,
                "results": [{"correct": bool(h)} for h in hits24],
            },
        },
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x) for x in first) + "\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps(nll("s", "main", 512, m_nll))
        + "\n"
        + json.dumps(nll("s", "main", 16384, m_nll))
        + "\n"
        # the native teacher past its 8K window: no reference there
        + json.dumps(nll("teacher", "main", 16384, t_nll + 3.0))
        + '\n{"key": "torn", "resu'
    )
    recs = study.read_job_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert len(recs) == 6
    text = study.render_job_tables(recs, {"main": "SOTU"})
    row = next(x for x in text.splitlines() if x.startswith("| s |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{math.exp(m_nll):.2f} ({100 * math.exp(t_nll - m_nll):.1f}%)"
    assert cells[2] == f"{math.exp(m_nll):.2f}"  # 16K is past the teacher's window: no recovery
    lines = text.splitlines()
    for n, h in ((9, hits), (24, hits24)):  # each passkey table's row for s
        start = lines.index(f"Passkey (accuracy over {n} prompts per length: depths × trials):")
        pk = next(x for x in lines[start:] if x.startswith("| s |"))
        assert pk.split("|")[2].strip() == study._acc(h.mean())


def test_study_passkey_table_pairs_each_model_with_yarn(tmp_path):
    """The passkey table's totals and its prompt-by-prompt comparison with YaRN×4 come from the raw
    answers: same (length, depth, key) prompts, wins where only the model is right."""
    import json

    from linearard_ray.evaluation.paired_stats import sign_test_p

    study = _study()
    rng = np.random.default_rng()
    keys = {L: [(d, f"{rng.integers(10**5):05d}") for d in (0.1, 0.5, 0.9) for _ in range(8)] for L in (8192, 16384)}
    hits = {m: {L: rng.random(24) < p for L in keys} for m, p in (("YaRN×4", 0.4), ("s", 0.6))}
    chose = {m: {L: rng.random(24) < p for L in keys} for m, p in (("YaRN×4", 0.5), ("s", 0.7))}
    logp = {m: {L: rng.uniform(-8, -1, 24) for L in keys} for m in hits}
    words = {m: {L: rng.random(24) < 0.5 for L in keys} for m in hits}

    def answer(k: str, right: bool, in_words: bool, i: int) -> str | None:
        # a wrong number is sometimes the key with a doubled digit written once (what PI×4 students do)
        return k if right else None if in_words else (k[:2] + k[3:] if i % 4 == 0 else "99999")

    for L in keys:  # every fourth key has a doubled digit; the first of each length is missed that way
        keys[L] = [(d, k[:2] + k[1] + k[3:] if i % 4 == 0 else k) for i, (d, k) in enumerate(keys[L])]
        hits["s"][L][0], words["s"][L][0] = False, False
    lines = [
        json.dumps(
            {
                "key": f"{m}{L}",
                "result": {
                    "kind": "passkey",
                    "model": m,
                    "length": L,
                    "results": [
                        {
                            "depth": d,
                            "key": k,
                            "correct": bool(h),
                            "choice_correct": bool(c),
                            "key_logprob": float(lp),
                            "answer": answer(k, bool(h), bool(w), i),
                        }
                        for i, ((d, k), h, c, lp, w) in enumerate(
                            zip(keys[L], hits[m][L], chose[m][L], logp[m][L], words[m][L], strict=False)
                        )
                    ],
                },
            }
        )
        for m in hits
        for L in keys
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    text = study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {"main": "SOTU"})
    titles = {
        "correct": "Passkey (accuracy over 24 prompts per length: depths × trials):",
        "choice_correct": "Passkey, forced choice (the true key scored above every distractor, teacher-forced; "
        "24 prompts per length):",
    }
    for field, got in (("correct", hits), ("choice_correct", chose)):
        s = np.concatenate([got["s"][L] for L in keys])
        y = np.concatenate([got["YaRN×4"][L] for L in keys])
        wins, losses = int((s & ~y).sum()), int((y & ~s).sum())
        table = text.splitlines()[text.splitlines().index(titles[field]) :]
        row = next(x for x in table if x.startswith("| s |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{got['s'][8192].mean():.2f}".replace("0.00", "0")
        assert cells[3] == f"{int(s.sum())} / 48"
        assert cells[4] == f"{wins} / {losses} ({sign_test_p(wins, losses):.2g})"
        yarn = next(x for x in table if x.startswith("| YaRN×4 |"))
        assert yarn.rstrip().endswith(f"| {int(y.sum())} / 48 | – |")
    # the key's log-probability, paired prompt by prompt with YaRN×4
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("Passkey, the true key's log-probability"))
    mine = np.concatenate([logp["s"][L] for L in keys])
    base = np.concatenate([logp["YaRN×4"][L] for L in keys])
    higher, lower = int((mine > base).sum()), int((mine < base).sum())
    row = next(x for x in lines[start:] if x.startswith("| s |"))
    assert row == (
        f"| s | {logp['s'][8192].mean():.2f} | {logp['s'][16384].mean():.2f} | {mine.mean():.2f} | "
        f"{higher} / {lower} ({mine.mean() - base.mean():+.2f}) | {sign_test_p(higher, lower):.2g} |"
    )
    # greedy answers sorted, doubled digits written once counted among the wrong numbers
    start = next(i for i, x in enumerate(lines) if x.startswith("Passkey, greedy answers"))
    trials = [
        (k, bool(h), bool(w), i)
        for L in keys
        for i, ((d, k), h, w) in enumerate(zip(keys[L], hits["s"][L], words["s"][L], strict=False))
    ]
    right = sum(h for _, h, _, _ in trials)
    no_number = sum(not h and w for _, h, w, _ in trials)
    dropped = sum(not h and not w and i % 4 == 0 for k, h, w, i in trials)
    assert 0 < dropped
    row = next(x for x in lines[start:] if x.startswith("| s |"))
    assert row == f"| s | {right} | {48 - right - no_number} | {dropped} | {no_number} |"


def test_study_window_table_against_cpt(tmp_path):
    """Jobs that keep per-window NLL get a last table: each model against cpt on the same windows."""
    import json

    from linearard_ray.evaluation.paired_stats import paired_windows

    study = _study()
    rng = np.random.default_rng()
    win = {m: list(rng.uniform(2.9, 3.1, 6)) for m in ("cpt", "s", "old")}
    recs = [
        {
            "key": m,
            "result": {
                "kind": "nll",
                "model": m,
                "domain": "main",
                "length": 32768,
                "nll_sum": float(np.mean(w)) * 6000,
                "tokens": 6000,
                **({"window_nll": w} if m != "old" else {}),
            },
        }
        for m, w in win.items()
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {"main": "SOTU"})
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("Against cpt, window by window"))
    v = paired_windows(win["s"], win["cpt"])
    assert f"| s | {v['mean_diff']:+.4f} ({v['better']}/6, p {v['p_value']:.2g}) |" in lines[start:]
    assert not any(x.startswith("| old |") or x.startswith("| cpt |") for x in lines[start:])
    # no per-window NLL anywhere (jobs from before they were kept): no such table
    for r in recs:
        r["result"].pop("window_nll", None)
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert "window by window" not in study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {})


def test_study_recipe_table_summarises_trainings_of_one_recipe(tmp_path):
    """Variants that differ only by -s<seed> are one recipe: mean and range over its trainings of the
    long-context perplexity and of both passkey accuracies; a recipe trained once gets no row."""
    import json
    import math

    study = _study()
    rng = np.random.default_rng()
    nll = {m: float(rng.uniform(2.9, 3.1)) for m in ("r", "r-s1", "r-s2", "solo")}
    hits = {m: rng.random(6) < 0.5 for m in nll}
    chose = {m: rng.random(6) < 0.7 for m in nll}
    logp = {m: rng.uniform(-9, -1, 6) for m in nll}
    lines = []
    for m in nll:
        lines.append(
            {"kind": "nll", "model": m, "domain": "main", "length": 32768, "nll_sum": nll[m] * 100, "tokens": 100}
        )
        lines.append(
            {
                "kind": "passkey",
                "model": m,
                "length": 16384,
                "results": [
                    {
                        "depth": 0.5,
                        "key": f"1000{i}",
                        "correct": bool(h),
                        "choice_correct": bool(c),
                        "key_logprob": float(lp),
                    }
                    for i, (h, c, lp) in enumerate(zip(hits[m], chose[m], logp[m], strict=False))
                ],
            }
        )
    (tmp_path / "jobs.jsonl").write_text(
        "".join(json.dumps({"key": str(i), "result": r}) + "\n" for i, r in enumerate(lines))
    )
    text = study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {"main": "SOTU"})
    table = text.splitlines()[
        text.splitlines().index("Recipes trained more than once (mean over trainings, range in brackets):") :
    ]
    assert not any(x.startswith("| solo |") for x in table)
    cells = [c.strip() for c in next(x for x in table if x.startswith("| r |")).strip("|").split("|")]
    ppl = [math.exp(nll[m]) for m in ("r", "r-s1", "r-s2")]
    acc = [hits[m].mean() for m in ("r", "r-s1", "r-s2")]
    fc = [chose[m].mean() for m in ("r", "r-s1", "r-s2")]
    assert cells[1] == "3"
    assert cells[2] == f"{np.mean(ppl):.2f} ({min(ppl):.2f} to {max(ppl):.2f})"
    assert cells[3] == f"{np.mean(acc):.2f} ({min(acc):.2f} to {max(acc):.2f})"
    assert cells[4] == f"{np.mean(fc):.2f} ({min(fc):.2f} to {max(fc):.2f})"
    lp = [logp[m].mean() for m in ("r", "r-s1", "r-s2")]
    assert cells[5] == f"{np.mean(lp):.2f} ({min(lp):.2f} to {max(lp):.2f})"
    # passkey only (no long-context perplexity): the header, rule and rows keep one column count
    (tmp_path / "jobs.jsonl").write_text(
        "".join(json.dumps({"key": str(i), "result": r}) + "\n" for i, r in enumerate(lines) if r["kind"] == "passkey")
    )
    text = study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {"main": "SOTU"})
    table = text.splitlines()[
        text.splitlines().index("Recipes trained more than once (mean over trainings, range in brackets):") + 2 :
    ][:3]
    assert len({x.count("|") for x in table}) == 1 and table[0].startswith("| recipe | trainings | passkey")


def test_study_recipe_versus_table_averages_each_side_over_its_trainings(tmp_path):
    """A recipe's trainings against the baseline's on each passkey prompt and against the versus
    recipe's (cpt, cpt-s1) on each window: every side averaged over its own trainings first, the
    prompts and windows the draws of the sign-flip test."""
    import itertools
    import json

    study = _study()
    rng = np.random.default_rng()
    recipe, cpt = ["r", "r-s1", "r-s2"], ["cpt", "cpt-s1"]
    wins = {m: rng.uniform(2.9, 3.1, 6) for m in [*recipe, *cpt, "YaRN×4"]}
    hits = {m: rng.random(8) < 0.5 for m in [*recipe, "YaRN×4"]}
    logp = {m: rng.uniform(-9, -1, 8) for m in hits}
    lines = [
        {
            "kind": "nll",
            "model": m,
            "domain": "main",
            "length": 32768,
            "nll_sum": float(w.mean()) * 600,
            "tokens": 600,
            "window_nll": [float(x) for x in w],
        }
        for m, w in wins.items()
    ]
    lines += [
        {
            "kind": "passkey",
            "model": m,
            "length": 16384,
            "results": [
                {
                    "depth": 0.1 * i,
                    "key": f"90{i}",
                    "correct": bool(h),
                    "choice_correct": True,
                    "key_logprob": float(lp),
                }
                for i, (h, lp) in enumerate(zip(hits[m], logp[m], strict=False))
            ],
        }
        for m in hits
    ]
    (tmp_path / "jobs.jsonl").write_text(
        "".join(json.dumps({"key": str(i), "result": r}) + "\n" for i, r in enumerate(lines))
    )
    text = study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {"main": "SOTU"}, versus="cpt")
    table = text.splitlines()[next(i for i, x in enumerate(text.splitlines()) if x.startswith("Recipes against")) :]
    assert table[2].split(" | ")[2:] == [
        "passkey greedy vs YaRN×4 (1)",
        "passkey forced choice vs YaRN×4 (1)",
        "passkey log P(key) vs YaRN×4 (1)",
        "SOTU @32K vs cpt (2): NLL diff |",
    ]
    rows = table[4 : table.index("", 4)]
    assert [x.split(" | ")[0] for x in rows] == ["| r"]  # cpt is the reference, not a recipe row
    cells = [c.strip() for c in rows[0].strip("|").split("|")]

    def flip_p(d):
        obs = abs(d.mean())
        return np.mean([abs(np.dot(s, d)) / d.size >= obs - 1e-12 for s in itertools.product((1, -1), repeat=d.size)])

    for cell, fig in ((cells[2], hits), (cells[4], logp)):
        mine = np.mean([fig[m].astype(float) for m in recipe], axis=0)
        d = mine - fig["YaRN×4"].astype(float)
        assert cell == (
            f"{mine.mean():.2f} vs {fig['YaRN×4'].astype(float).mean():.2f} "
            f"({(d > 0).sum()}/{(d < 0).sum()}, p {flip_p(d):.2g})"
        )
    assert cells[3] == "1.00 vs 1.00 (0/0, p 1)"
    d = np.mean([wins[m] for m in recipe], axis=0) - np.mean([wins[m] for m in cpt], axis=0)
    assert cells[5] == f"{d.mean():+.4f} ({(d < 0).sum()}/6, p {flip_p(d):.2g})"


def test_study_records_apart_keep_a_retrained_model_as_another_training(tmp_path):
    """With apart=True, a later round that trains a model again (seeded with the earlier round's
    jobs, as gpu_round.sh does) adds a training "<model> (r<round>)" that groups with its recipe; the
    records it inherits are not counted twice, and the untrained references keep their one name."""
    import json

    study = _study()
    rng = np.random.default_rng()

    def nll(model, value):
        return {"kind": "nll", "model": model, "domain": "main", "length": 32768, "nll_sum": value * 100, "tokens": 100}

    old = [nll("r", rng.uniform(2.9, 3.1)), nll("r-s1", rng.uniform(2.9, 3.1)), nll("YaRN×4", rng.uniform(3.1, 3.3))]
    again = nll("r", rng.uniform(2.9, 3.1))

    def write(path, rs):
        path.write_text("".join(json.dumps({"key": str(i), "result": r}) + "\n" for i, r in enumerate(rs)))

    write(tmp_path / "smollm2_study4_jobs.jsonl", old)
    write(tmp_path / "smollm2_study5_jobs.jsonl", [*old, again])  # seeded, then r retrained
    paths = [tmp_path / "smollm2_study4_jobs.jsonl", tmp_path / "smollm2_study5_jobs.jsonl"]
    kept = {r["model"]: r["nll_sum"] for r in study.read_job_records(paths, apart=True)}
    assert kept == {
        "r": old[0]["nll_sum"],
        "r-s1": old[1]["nll_sum"],
        "YaRN×4": old[2]["nll_sum"],
        "r (r5)": again["nll_sum"],
    }
    assert {r["model"] for r in study.read_job_records(paths)} == {"r", "r-s1", "YaRN×4"}  # later file wins
    assert study._recipe_groups(list(kept)) == {"r": ["r", "r-s1", "r (r5)"], "YaRN×4": ["YaRN×4"]}
    write(tmp_path / "later.jsonl", [nll("r-s1", rng.uniform(2.9, 3.1))])  # no round in the name: its place
    assert "r-s1 (r2)" in {r["model"] for r in study.read_job_records([paths[0], tmp_path / "later.jsonl"], apart=True)}


def test_study_results_folders_keep_their_rounds_for_the_apart_names():
    """The committed jobs moved from research/results/smollm2_study<round>_jobs.jsonl to one folder per
    study: each must still name a retrained model with its round, as the research log quotes it."""
    study = _study()
    jobs = sorted(study.RESULTS.glob("*/jobs.jsonl"))
    assert {p.parent.name for p in jobs} == set(study.RESULTS_ROUND)
    assert [study._results_round(p) for p in jobs] == [study.RESULTS_ROUND[p.parent.name] for p in jobs]
    kept = {
        r["model"]
        for r in study.read_job_records(
            [study.RESULTS / "yarn4-restore" / "jobs.jsonl", study.RESULTS / "pi4-restore-long" / "jobs.jsonl"],
            apart=True,
        )
    }
    assert "cpt (r13)" in kept and "tsample-vmix-ce22-qk (r13)" not in kept  # qk first trained in round 11


def test_pi_long_restore_recipe_is_the_measured_study_variant():
    """configs/smollm2-135m-x4-restore-long.yaml must stay what rounds 11-13's tsample-vmix-ce22-qk ran:
    -restore's teacher samples, PI×4, the next-token term at 2.2 and the attention-map term at 1."""
    recipe = _assert_sampling_recipe_is_variant("smollm2-135m-x4-restore-long.yaml", "tsample-vmix-ce22-qk")
    assert (
        recipe["rope"]["type"],
        recipe["rope"]["factor"],
        recipe["objective"]["next_token"]["weight"],
        recipe["objective"]["relation"]["weights"]["qk"],
    ) == ("linear", 4.0, 2.2, 1.0)


def test_study_unseen_tables_recovery_worst_genre_and_pooled_windows(tmp_path):
    """Recovery on the held-out genres per recipe (mean over trainings, the worst genre, the lowest
    single figure) and each recipe against the baselines on those windows, pooled over genres in
    'all'. The figures are recomputed here from the random window NLLs the records carry."""
    import json

    study = _study()
    rng = np.random.default_rng()
    genres, models = ["history", "legal"], ["teacher", "r", "r-s1", "r-s2", "cpt", "cpt-s1", "YaRN×4"]
    wins = {(m, d): rng.uniform(2.0, 3.0, 4) for m in models for d in genres}
    lines = [
        {
            "kind": "nll",
            "model": m,
            "domain": d,
            "length": 512,
            "nll_sum": float(w.sum()) * 511,
            "tokens": 4 * 511,
            "window_nll": [float(x) for x in w],
        }
        for (m, d), w in wins.items()
    ]
    (tmp_path / "jobs.jsonl").write_text(
        "".join(json.dumps({"key": str(i), "result": r}) + "\n" for i, r in enumerate(lines))
    )
    text = study.render_job_tables(study.read_job_records([tmp_path / "jobs.jsonl"]), {"main": "SOTU"}, versus="cpt")
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("Recovery on the unseen genres"))
    rows = {x.split(" | ")[0][2:]: x.split(" | ")[1:] for x in lines[start + 4 : lines.index("", start + 2)]}

    def rec(m, d):
        return 100 * np.exp(wins[("teacher", d)].mean()) / np.exp(wins[(m, d)].mean())

    recipe = ["r", "r-s1", "r-s2"]
    got = rows["r"]
    assert got[0] == "3"
    for i, d in enumerate(genres):
        assert got[1 + i].startswith(f"{np.mean([rec(m, d) for m in recipe]):.1f} (")
    worst = min(genres, key=lambda d: np.mean([rec(m, d) for m in recipe]))
    from linearard_ray.evaluation.paired_stats import bootstrap_recovery

    ci = bootstrap_recovery(
        {d: (wins[("teacher", d)], np.mean([wins[(m, d)] for m in recipe], axis=0)) for d in genres}
    )
    low, high = ci["domains"][worst]["ci"]
    assert got[4] == f"{worst} {np.mean([rec(m, worst) for m in recipe]):.1f} [{low:.1f}–{high:.1f}]"
    assert got[3].endswith(f"[{ci['mean']['ci'][0]:.1f}–{ci['mean']['ci'][1]:.1f}]")
    assert got[5].rstrip(" |") == f"{min(rec(m, d) for m in recipe for d in genres):.1f}"
    table = text.splitlines()[
        next(i for i, x in enumerate(text.splitlines()) if x.startswith("Unseen genres against cpt")) :
    ]
    r_row = next(x for x in table if x.startswith("| r |")).split(" | ")
    pooled = [
        np.mean([wins[(m, d)] for m in recipe], axis=0) - np.mean([wins[(m, d)] for m in ("cpt", "cpt-s1")], axis=0)
        for d in genres
    ]
    assert r_row[2 + len(genres)].startswith(
        f"{np.concatenate(pooled).mean():+.4f} ({int((np.concatenate(pooled) < 0).sum())}/8,"
    )
    assert not any(x.startswith("| cpt |") for x in table[: table.index("", 4)])  # the reference is no row
    assert "Recipes trained more than once" not in text  # short text only: no long-context or passkey table
    # the plot's figures: each recipe as one model, its trainings' windows averaged
    by_recipe = study.unseen_recovery_by_recipe(study.read_job_records([tmp_path / "jobs.jsonl"]))
    assert sorted(by_recipe) == ["YaRN×4", "cpt", "r"] and list(by_recipe["r"]) == ["512"]
    for d in genres:
        pooled_r = np.mean([wins[(m, d)] for m in recipe], axis=0)
        want = 100 * np.exp(wins[("teacher", d)].mean() - pooled_r.mean())
        assert by_recipe["r"]["512"]["domains"][d]["recovery_pct"] == pytest.approx(want)
    assert by_recipe["r"]["512"]["mean"]["ci"] == pytest.approx(ci["mean"]["ci"])


def test_general_restore_recipe_is_the_measured_study_variant():
    """configs/smollm2-135m-x4-restore-general.yaml must train what the unseen-genre round's
    genre-long ran: -restore-long on the packed general mix with -restore's teacher samples (the job
    appends them after the genres). Only what it measures differs: the held-out genres in training
    and the study preset in evaluation."""
    study = _study()
    sets = [s.replace(f", {study.TEACHER_SAMPLES}", "") for s in study.VARIANTS["genre-long"][0]]
    ran = load_config(CONFIGS / "smollm2-135m-x4.yaml", [*sets, "train.budget_tokens=4250000"]).model_dump()
    recipe = load_config(CONFIGS / "smollm2-135m-x4-restore-general.yaml").model_dump()
    restore = load_config(CONFIGS / "smollm2-135m-x4-restore.yaml").model_dump()
    assert recipe["data"].pop("teacher_samples") == restore["data"]["teacher_samples"]
    ran["data"].pop("teacher_samples")
    assert recipe["train"].pop("eval_sources") == {g: [f"genre:{g}"] for g in ("legal", "standards", "history")}
    ran["train"].pop("eval_sources")
    assert recipe.pop("eval")["preset"] == "study"
    ran.pop("eval")
    ran["train"]["run_name"] = recipe["train"]["run_name"]
    assert recipe == ran


def test_study_table_draws_the_committed_unseen_genre_round(tmp_path):
    """`table --jobs ... --plot-unseen PNG` on the unseen-genre round's committed jobs draws every
    recipe and baseline; a jobs file without held-out genres is refused by name."""
    import subprocess
    import sys

    from tests.scripts import ROOT

    round_jobs = ROOT / "research" / "results" / "unseen-genre-round" / "jobs.jsonl"
    cmd = [sys.executable, "research/restoration_study.py", "table", "--versus", "cpt-genre", "--jobs"]
    ok = subprocess.run(
        [*cmd, str(round_jobs), "--plot-unseen", str(tmp_path / "u.png")], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = _study().unseen_recovery_by_recipe(_study().read_job_records([round_jobs]))
    assert sorted(drawn) == ["PI×4", "YaRN×4", "cpt-genre", "genre-long"]
    old = ROOT / "research" / "results" / "pi4-restore-long" / "jobs.jsonl"
    refused = subprocess.run(
        [*cmd, str(old), "--plot-unseen", str(tmp_path / "v.png")], cwd=ROOT, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "no held-out genre's window NLLs" in refused.stderr


def test_train_refuses_a_variant_whose_corpus_is_not_in_work(tmp_path):
    """A teacher-text variant with no <work>/teacher_samples.jsonl: the dry run names the missing
    file beside the plan, the real run exits before any job starts (no log, no runs.jsonl), and
    once the file is there the dry run no longer names it."""
    import subprocess
    import sys

    from tests.scripts import ROOT

    cmd = [sys.executable, "research/restoration_study.py", "train", "--variants", "genre-long,cpt", "--work"]
    missing = str(tmp_path / "teacher_samples.jsonl")
    dry = subprocess.run([*cmd, str(tmp_path), "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and f"genre-long: needs {missing} (draw it with the `sample` phase" in dry.stdout
    assert "cpt: needs" not in dry.stdout and "unixdocs" not in dry.stdout  # only what is missing is named
    real = subprocess.run([*cmd, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert real.returncode == 1 and f"variant genre-long reads what is not there: {missing}" in real.stderr
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / "runs.jsonl").exists()
    (tmp_path / "teacher_samples.jsonl").write_text('{"text": "sampled"}\n')
    again = subprocess.run([*cmd, str(tmp_path), "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "needs" not in again.stdout


@pytest.mark.parametrize("base", ["smollm2-135m-x4.yaml", "default.yaml", "smollm2-135m-x4-cpt.yaml"])
def test_a_recipe_variant_trains_what_its_config_trains(base, tmp_path):
    """--recipe-variant NAME=CONFIG on any --recipe: the general-mix recipe as a variant trains every
    training field the recipe sets, at its budget, its teacher text in the job's own place (after
    its sources); on the study's base that is what genre-long trained. A candidate's changed
    fields, dict entries it drops included, reach the run; a name already taken or a missing file
    is refused."""
    study = _study()
    general = CONFIGS / "smollm2-135m-x4-restore-general.yaml"
    samples = f"{tmp_path}/teacher_samples.jsonl"
    try:
        name = study.define_recipe_variant("general", str(general), f"configs/{base}")
        trains = load_config(CONFIGS / base, study.variant_sets(name, tmp_path, None, [], None)).model_dump(mode="json")
        recipe = load_config(general).model_dump(mode="json")
        assert trains["data"]["sources"] == [*recipe["data"]["sources"], samples]
        assert study.training_changes(trains, recipe) == {"data.sources": trains["data"]["sources"]}
        assert trains["train"]["budget_tokens"] == 4_250_000
        if base == "smollm2-135m-x4.yaml":
            ran = load_config(CONFIGS / base, study.variant_sets("genre-long", tmp_path, 4_250_000, [], None))
            ran = ran.model_dump(mode="json")
            assert sorted(trains["data"].pop("sources")) == sorted(ran["data"].pop("sources"))
            trains["train"].pop("run_name"), ran["train"].pop("run_name")
            assert trains == ran
        candidate = yaml.safe_load(general.read_text())
        candidate["rope"]["type"] = "yarn"
        candidate["objective"]["relation"]["weights"] = {"q": 0.0, "k": 0.0, "v": 1.0}  # qk dropped
        (tmp_path / "candidate.yaml").write_text(yaml.safe_dump(candidate))
        study.define_recipe_variant("candidate", str(tmp_path / "candidate.yaml"), f"configs/{base}")
        got = load_config(CONFIGS / base, study.variant_sets("candidate", tmp_path, None, [], None))
        assert got.rope.type == "yarn" and got.objective.relation.weights == {"q": 0.0, "k": 0.0, "v": 1.0}
        with pytest.raises(SystemExit, match="already a variant"):
            study.define_recipe_variant("genre-long", str(general))
        with pytest.raises(SystemExit, match="no recipe at"):
            study.define_recipe_variant("other", str(tmp_path / "none.yaml"))
    finally:
        study.VARIANTS.pop("general", None)
        study.VARIANTS.pop("candidate", None)


def test_unseen_recovery_keeps_to_the_teachers_window():
    """The YaRN×4 round also scored the held-out genres at 16K and 32K, beyond the teacher's 8K
    window where its perplexity explodes: recovery there is no restoration, so the unseen-genre
    table keeps to 512 and 2K, with every training of each recipe."""
    study = _study()
    results = CONFIGS.parent / "research" / "results"
    records = study.read_job_records(
        [results / "unseen-genre-round" / "jobs.jsonl", results / "yarn4-genre-round" / "jobs.jsonl"]
    )
    text = study.render_job_tables(records, {"main": "SOTU", "other": "pydocs"}, versus="cpt-genre")
    section = text.split("Recovery on the unseen genres", 1)[1].split("\n\n", 2)[1]
    header, rows = section.splitlines()[0], section.splitlines()[2:]
    assert "@2K" in header and "@16K" not in header and "@32K" not in header
    yarn = next(r for r in rows if r.startswith("| genre-long-yarn |"))
    assert yarn.split(" | ")[1] == "3"  # all three trainings, though only s0 ran long context


def test_yarn_general_recipe_is_the_measured_study_variant():
    """configs/smollm2-135m-yarn4-restore-general.yaml must train what the YaRN×4 round's
    genre-long-yarn ran, and differ from the PI×4 general-mix recipe in the RoPE type alone."""
    study = _study()
    sets = [s.replace(f", {study.TEACHER_SAMPLES}", "") for s in study.VARIANTS["genre-long-yarn"][0]]
    ran = load_config(CONFIGS / "smollm2-135m-x4.yaml", [*sets, "train.budget_tokens=4250000"]).model_dump()
    recipe = load_config(CONFIGS / "smollm2-135m-yarn4-restore-general.yaml").model_dump()
    pi4 = load_config(CONFIGS / "smollm2-135m-x4-restore-general.yaml").model_dump()
    assert (recipe["rope"]["type"], pi4["rope"]["type"]) == ("yarn", "linear")
    recipe["rope"]["type"] = "linear"
    recipe["train"]["run_name"] = pi4["train"]["run_name"]
    assert recipe == pi4
    recipe = load_config(CONFIGS / "smollm2-135m-yarn4-restore-general.yaml").model_dump()
    recipe["data"].pop("teacher_samples"), ran["data"].pop("teacher_samples")
    recipe["train"].pop("eval_sources"), ran["train"].pop("eval_sources")
    recipe.pop("eval"), ran.pop("eval")
    ran["train"]["run_name"] = recipe["train"]["run_name"]
    assert recipe == ran
