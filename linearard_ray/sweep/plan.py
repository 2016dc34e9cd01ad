"""The sweep plan: the plain data every trial needs, the config each trial trains with, and the
data preparation done once in the driver before any trial starts."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from linearard_ray.config import Config, build_config
from linearard_ray.data.sources import is_named_source
from linearard_ray.logs import get_logger
from linearard_ray.paths import output_base
from linearard_ray.storage import is_uri
from linearard_ray.sweep.search_space import (
    ParamSpec,
    apply_params,
    base_dict,
    config_hash,
    finite_combinations,
    split_repeat,
)

log = get_logger(__name__)

DATA_PREFIXES = ("data.", "model.teacher")  # swept keys that change the preprocessed data
DEFAULT_SWEEP_DATA_DIR = "outputs/data/sweep"


def absolute_path(path: str, cwd: str) -> str:
    """A local path made absolute against ``cwd``; a URI as it is."""
    if is_uri(path):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (Path(cwd) / p).resolve())


def data_keys(specs: list[ParamSpec]) -> list[str]:
    return [s.key for s in specs if s.key.startswith(DATA_PREFIXES)]


def data_hash(cfg: Config) -> str:
    """Names the preprocessed data of one data config (data settings and the teacher's tokenizer)."""
    d = base_dict(cfg)
    return config_hash({"data": d["data"], "teacher": d["model"]["teacher"]}, 12)


def make_plan(cfg: Config, specs: list[ParamSpec]) -> dict:
    """Plain data every trial needs (it travels to the trials through the object store)."""
    import os

    from linearard_ray.training.plan import resolve_storage_path

    cwd = os.getcwd()
    # relative inputs are read from the working directory, relative outputs go to the output base
    # (the same place outside a `ray job submit --working-dir` job)
    base = str(output_base())
    sweep_dir = f"{resolve_storage_path(cfg.tune.storage_path).rstrip('/')}/{cfg.tune.sweep_name}"
    return {
        "sweep_name": cfg.tune.sweep_name,
        "base": base_dict(cfg),
        "cwd": cwd,
        "output_base": base,
        "sweep_dir": sweep_dir,
        "run_storage": f"{sweep_dir}/runs",
        "students_dir": f"{absolute_path(cfg.train.output_dir, base)}/{cfg.tune.sweep_name}",
        "data_swept": bool(data_keys(specs)),
        "data_dirs": {},
        "teacher_samples": _teacher_samples_source(cfg),
    }


def _teacher_samples_source(cfg: Config) -> str | None:
    """The teacher samples the driver drew once for every trial (already in the base config's
    data.sources), or None."""
    if cfg.data.teacher_samples is None:
        return None
    from linearard_ray.data.teacher_samples import samples_path

    return str(samples_path(cfg))


def keep_teacher_samples(d: dict, plan: dict) -> dict:
    """A trial that sweeps data.sources still trains on the sweep's teacher samples: they were
    appended to the base config's list, which a swept list replaces."""
    src = plan.get("teacher_samples")
    if src and src not in d["data"]["sources"]:
        d["data"]["sources"] = [*d["data"]["sources"], src]
    return d


# --------------------------------------------------------------------------- per-trial configs


def _absolutize(d: dict, cwd: str, out_base: str) -> dict:
    """Trials run with the trial directory as their working directory: every relative path of
    the driver's config is made absolute, inputs against the driver's working directory and the
    data's output directory against its output base."""
    d = copy.deepcopy(d)
    m, data = d["model"], d["data"]
    for k in ("teacher", "student"):
        v = m.get(k)
        if v and not is_uri(v) and (Path(cwd) / v).exists():
            m[k] = absolute_path(v, cwd)
    if m.get("cache_dir"):
        m["cache_dir"] = absolute_path(m["cache_dir"], cwd)

    def src(s: str) -> str:
        return s if is_uri(s) or is_named_source(s) else absolute_path(s, cwd)

    data["sources"] = [src(s) for s in data["sources"]]
    t = d["train"]
    t["eval_sources"] = {k: [src(s) for s in v] for k, v in (t.get("eval_sources") or {}).items()}
    if data.get("lm_sources"):
        data["lm_sources"] = [src(s) for s in data["lm_sources"]]
    if data.get("preprocessed"):
        data["preprocessed"] = absolute_path(data["preprocessed"], cwd)
    if data.get("output_dir"):
        data["output_dir"] = absolute_path(data["output_dir"], out_base)
    return d


def trial_checkpoint_every(train: dict) -> int:
    """Trials checkpoint only at held-out evaluations, so that every report Tune sees carries a
    fresh objective: train.checkpoint_every rounded up to a multiple of train.eval_every."""
    e, c = train["eval_every"], train["checkpoint_every"]
    return c if c % e == 0 else e * math.ceil(c / e)


def repeat_name(name: str, k: int) -> str:
    return f"{name}-r{k + 1}" if k else name


def repeat_dict(base: Config | dict, params: dict[str, Any], k: int) -> dict:
    """The base plus a trial's values, as a dict, for the k-th repeat of that configuration.

    Repeat k trains with train.seed + k: a repeat with the same seed would train the same run again
    (bit for bit on CPU), while what a repeat is for is the spread between trainings, which one
    training cannot show. train.seed sets the LoRA init, dropout and the order the training stream
    reads blocks in; data.seed (the preprocessing shuffle) stays, so every repeat reads the data the
    driver prepared once."""
    d = base_dict(apply_params(base, params))
    d["train"]["seed"] += k
    return d


def _swept_data_dir(output_dir: str | None, out_base: str, dh: str) -> str:
    """Where one data config of a sweep that varies the data is preprocessed: its own directory."""
    root = output_dir or absolute_path(DEFAULT_SWEEP_DATA_DIR, out_base)
    return f"{root}-{dh}"


def run_config(plan: dict, params: dict[str, Any], name: str) -> Config:
    """The config one trial trains with: its repeat's config (`repeat_dict`) with absolute paths,
    its own run name and storage, the sweep's preprocessed data, and no MLflow run of its own."""
    params, k = split_repeat(params)
    d = _absolutize(keep_teacher_samples(repeat_dict(plan["base"], params, k), plan), plan["cwd"], _output_base(plan))
    cfg = build_config(d)
    dh = data_hash(cfg)
    t, data = d["train"], d["data"]
    t.update(
        run_name=name,
        storage_path=plan["run_storage"],
        output_dir=plan["students_dir"],
        evaluate_at_end=False,
        checkpoint_every=trial_checkpoint_every(t),
    )
    d["tracking"]["enabled"] = False
    if not data.get("preprocessed"):
        prepared = plan["data_dirs"].get(dh)
        if prepared:
            data["output_dir"] = prepared
        elif plan["data_swept"]:
            data["output_dir"] = _swept_data_dir(data.get("output_dir"), _output_base(plan), dh)
    return build_config(d)


# --------------------------------------------------------------------------- data, once per sweep


def prepare_data(cfg: Config, specs: list[ParamSpec], plan: dict) -> dict[str, str]:
    """Preprocess each distinct data config of the sweep once, in the driver, so that concurrent
    trials never tokenize the same corpus into the same directory at once. Returns the prepared
    directory of each data config, by `data_hash`."""
    from linearard_ray.data import preprocess as data_mod

    keys = data_keys(specs)
    combos = finite_combinations(specs, keys) if keys else [{}]
    if combos is None:
        log.info(f"[tune] {', '.join(keys)}: sampled from a range, so each trial preprocesses its own data")
        return {}
    objective_swept = any(s.key.startswith("objective.") for s in specs)
    out: dict[str, str] = {}
    for combo in combos:
        d = keep_teacher_samples(base_dict(apply_params(plan["base"], combo)), plan)
        c = build_config(_absolutize(d, plan["cwd"], _output_base(plan)))
        if c.data.preprocessed:
            continue
        dh = data_hash(c)
        if plan["data_swept"]:
            c = _with_data_dir(c, _swept_data_dir(c.data.output_dir, _output_base(plan), dh))
        main = Path(data_mod.ensure_preprocessed(c)).resolve()
        out[dh] = str(main)
        c = _with_data_dir(c, str(main))
        if c.data.lm_data_differs() and (objective_swept or c.objective.next_token.weight > 0):
            data_mod.ensure_preprocessed(c, stream="lm")
    return out


def _output_base(plan: dict) -> str:
    return plan.get("output_base") or plan["cwd"]  # a plan made before outputs had a base of their own


def _with_data_dir(cfg: Config, output_dir: str) -> Config:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"output_dir": output_dir})})
