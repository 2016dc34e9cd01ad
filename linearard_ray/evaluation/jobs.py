"""An evaluation's jobs: the plan (per model: ('nll', domain, L), ('relkl', domain, L),
('passkey', L)), running them in this process or as Ray tasks, and their resume keys.

Each job's result goes to ``on_result`` the moment it exists (the resume log, ``job_log``), and a
rerun reuses the results whose key is unchanged (see ``job_keys``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from linearard_ray.config import Config
from linearard_ray.evaluation.job_log import JobLog, inputs_digest, job_key, model_fingerprint
from linearard_ray.evaluation.metrics import nll_windows, relation_kl_windows
from linearard_ray.evaluation.passkey import run_passkey, score_key_choices
from linearard_ray.evaluation.specs import EvalError, ModelSpec, eval_device, load_eval_model, log_progress, max_window

ResultHook = Callable[[ModelSpec, tuple, dict], None]
RELATION_KL_COST = 5  # a relation-KL job's time over an NLL job's on the same windows (measured, CPU)


# --------------------------------------------------------------------------- one model's jobs


class _ModelCache:
    """Loaded models kept between jobs in this process: the teacher stays, and at most one other."""

    def __init__(self, teacher_spec: ModelSpec, cfg: Config, device: torch.device, cache: dict):
        self.teacher_spec, self.cfg, self.device, self.models = teacher_spec, cfg, device, cache

    def get(self, s: ModelSpec):
        if s.name not in self.models:
            if s.name != self.teacher_spec.name:  # at most the teacher and one other model stay loaded
                for k in [k for k in self.models if k != self.teacher_spec.name]:
                    del self.models[k]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.time()
            self.models[s.name] = load_eval_model(s, self.cfg, self.device)
            log_progress(f"loaded {s.name} ({s.path}) on {self.device} in {time.time() - t0:.1f}s")
        return self.models[s.name]


def _nll_job(spec: ModelSpec, model, job: tuple, payload: dict, cfg: Config, device, models) -> tuple[dict, str]:
    _, dom, L = job
    r = nll_windows(model, payload["windows"][dom][L], cfg.eval.batch_size, device)
    res = {"kind": "nll", "model": spec.name, "domain": dom, "length": L, **r}
    return res, f"ppl {math.exp(r['nll_sum'] / r['tokens']):.3f}"


def _relkl_job(spec: ModelSpec, model, job: tuple, payload: dict, cfg: Config, device, models) -> tuple[dict, str]:
    from linearard_ray.models.loading import ModelError, check_same_architecture

    _, dom, L = job
    teacher = models.get(models.teacher_spec)
    try:
        check_same_architecture(teacher.config, model.config)
    except ModelError as e:
        res = {
            "kind": "skip",
            "section": "relation_kl",
            "model": spec.name,
            "domain": dom,
            "length": L,
            "reason": f"not comparable with the teacher layer by layer: {e}",
        }
        return res, "relation KL skipped (architecture differs from the teacher's)"
    r = relation_kl_windows(
        teacher, model, payload["windows"][dom][L], cfg.eval.batch_size, device, cfg.rope.yarn_logit_correction
    )
    res = {"kind": "relkl", "model": spec.name, "domain": dom, "length": L, **r}
    mean = {k: sum(v[k] for v in r["sums"].values()) / (len(r["sums"]) * r["rows"][k]) for k in r["rows"]}
    return res, "relation KL " + " ".join(f"{k} {v:.4g}" for k, v in mean.items())


def _passkey_job(spec: ModelSpec, model, job: tuple, payload: dict, cfg: Config, device, models) -> tuple[dict, str]:
    ev = cfg.eval
    _, L = job
    rows = run_passkey(model, payload["tokenizer"], payload["passkey"][L], ev.batch_size, device)
    msg = f"passkey accuracy {np.mean([r['correct'] for r in rows]):.2f}"
    if ev.passkey_choices:
        scores = score_key_choices(
            model,
            payload["tokenizer"],
            payload["passkey"][L],
            ev.passkey_choices,
            ev.batch_size,
            device,
            ev.passkey_distractors,
        )
        rows = [{**r, **c} for r, c in zip(rows, scores, strict=False)]
        msg += f", forced choice of {ev.passkey_choices} {np.mean([r['choice_correct'] for r in rows]):.2f}"
    return {"kind": "passkey", "model": spec.name, "length": L, "results": rows}, msg


_JOB_RUNNERS = {"nll": _nll_job, "relkl": _relkl_job, "passkey": _passkey_job}


def run_model_jobs(
    spec: ModelSpec,
    teacher_spec: ModelSpec,
    jobs: list[tuple],
    payload: dict,
    cfg: Config,
    cache: dict | None = None,
    on_result: ResultHook | None = None,
) -> list[dict]:
    """Run `jobs` for one model: ('nll', domain, L), ('relkl', domain, L), ('passkey', L).

    `cache` keeps loaded models between calls in this process (teacher pinned); `on_result` sees
    each job's result as soon as it exists (the resume log)."""
    device = eval_device(cfg)
    models = _ModelCache(teacher_spec, cfg, device, {} if cache is None else cache)
    out = []
    model = models.get(spec)
    for job in jobs:
        t0 = time.time()
        if job[0] not in _JOB_RUNNERS:  # pragma: no cover - internal
            raise ValueError(job)
        res, msg = _JOB_RUNNERS[job[0]](spec, model, job, payload, cfg, device, models)
        dom = "passkey" if job[0] == "passkey" else job[1]
        res["seconds"] = time.time() - t0
        res["max_position_embeddings"] = max_window(model)
        log_progress(f"{spec.name} {dom} L={job[-1]}: {msg} ({res['seconds']:.1f}s)")
        out.append(res)
        if on_result is not None:
            on_result(spec, job, res)
    return out


# --------------------------------------------------------------------------- all models


def plan_jobs(specs: list[ModelSpec], windows: dict, passkey: dict, cfg: Config) -> dict[str, list[tuple]]:
    """Jobs per model name, in the order they should run."""
    short = set(cfg.eval.short_lengths)
    plan: dict[str, list[tuple]] = {}
    for s in specs:
        jobs: list[tuple] = []
        for dom, by_len in windows.items():
            for L in sorted(by_len):
                jobs.append(("nll", dom, L))
                if cfg.eval.relation_kl and s.role != "teacher" and L in short:
                    jobs.append(("relkl", dom, L))
        jobs += [("passkey", L) for L in sorted(passkey)]
        plan[s.name] = jobs
    return plan


def use_ray(ray_address: str | None, distribute: bool | None) -> bool:
    """Whether the jobs go to Ray tasks (see ``evaluate``'s ``distribute``)."""
    if distribute is False:
        return False
    import ray

    if ray_address and not ray.is_initialized():
        ray.init(address=ray_address)
    if not ray.is_initialized():
        if distribute:
            raise EvalError("distributed evaluation asked for, but Ray is not initialised and no address was given")
        return False
    if distribute:
        return True
    gpus = ray.cluster_resources().get("GPU", 0)
    # Several GPUs: spread the jobs. One GPU that is not on this machine (a CPU head node under
    # `ray job submit`): a task is the only way to reach it.
    return gpus > 1 or (gpus >= 1 and not torch.cuda.is_available())


def _run_in_process(specs, teacher_spec, plan, payload, cfg, on_result: ResultHook | None) -> list[dict]:
    cache: dict = {}
    results = []
    # Teacher first so it stays loaded for every relation-KL job that follows.
    for s in sorted(specs, key=lambda s: s.role != "teacher"):
        if plan[s.name]:
            results += run_model_jobs(s, teacher_spec, plan[s.name], payload, cfg, cache, on_result)
    return results


def _run_as_ray_tasks(
    specs, teacher_spec, plan, payload, cfg, task_resources: dict | None, on_result: ResultHook | None
) -> list[dict]:
    import ray

    res = task_resources or {"num_gpus": 1}
    remote = ray.remote(**res)(run_model_jobs)
    ref = ray.put(payload)
    futures, owner = [], {}
    for s in specs:
        # One task per (model, length): both domains' NLL and relation KL share one model load.
        groups: dict[tuple, list[tuple]] = {}
        for job in plan[s.name]:
            groups.setdefault((job[0] == "passkey", job[-1]), []).append(job)
        for jobs in groups.values():
            futures.append(remote.remote(s, teacher_spec, jobs, ref, cfg))
            owner[futures[-1]] = (s, jobs)
    log_progress(f"submitted {len(futures)} Ray tasks ({res} each)")
    results, pending = [], list(futures)
    while pending:
        # Take tasks as they finish, so the resume log has every result the moment it exists.
        ready, pending = ray.wait(pending, num_returns=1)
        s, jobs = owner[ready[0]]
        rs = ray.get(ready[0])
        if on_result is not None:
            for job, r in zip(jobs, rs, strict=False):
                on_result(s, job, r)
        results += rs
    return results


def run_all_jobs(
    specs,
    teacher_spec,
    plan,
    payload,
    cfg,
    ray_tasks: bool,
    task_resources: dict | None,
    on_result: ResultHook | None = None,
) -> list[dict]:
    """Every planned job, in this process or as Ray tasks (one per model and length)."""
    if not ray_tasks:
        return _run_in_process(specs, teacher_spec, plan, payload, cfg, on_result)
    return _run_as_ray_tasks(specs, teacher_spec, plan, payload, cfg, task_resources, on_result)


# --------------------------------------------------------------------------- overall progress


def job_weight(job: tuple, payload: dict, cfg: Config) -> float:
    """A job's expected cost in tokens through a model, for the ETA: NLL reads each window once;
    relation KL runs the teacher and the model and compares every layer's relations (about five
    NLL passes on SmolLM2-135M on CPU); passkey generates an answer and scores the forced-choice
    candidates after each prompt."""
    if job[0] == "passkey":
        prompts = payload["passkey"][job[1]]
        return len(prompts) * job[1] * (2 if cfg.eval.passkey_choices else 1)
    windows = len(payload["windows"][job[1]][job[2]])
    return windows * job[2] * (RELATION_KL_COST if job[0] == "relkl" else 1)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class OverallProgress:
    """Jobs done of the total with an ETA, one line per finished job. The ETA is the time per token
    so far (``job_weight``) times the tokens left, so a long-context job ahead is not counted as
    cheap as the short ones behind."""

    def __init__(self, weights: dict, reused: int = 0):
        self.weights = weights  # (model name, job) -> weight, for the jobs still to run
        self.total_jobs = len(weights) + reused
        self.done_jobs = reused
        self.left = float(sum(weights.values()))
        self.done = 0.0
        self.started = time.time()

    def job_done(self, name: str, job: tuple) -> str:
        w = self.weights.get((name, job), 0.0)
        self.done_jobs += 1
        self.done += w
        self.left -= w
        elapsed = time.time() - self.started
        line = f"{self.done_jobs}/{self.total_jobs} jobs done, {_duration(elapsed)} elapsed"
        if self.left > 0 and self.done > 0:
            line += f", about {_duration(elapsed / self.done * self.left)} left"
        log_progress(line)
        return line


# --------------------------------------------------------------------------- resume


def job_keys(
    specs: list[ModelSpec], teacher_spec: ModelSpec, plan: dict[str, list[tuple]], payload: dict, cfg: Config
) -> dict[tuple[str, tuple], str]:
    """(model name, job) -> its resume key (see ``job_log.job_key``)."""
    settings = {
        "model": cfg.model.model_dump(mode="json"),
        "device": cfg.eval.device,
        "batch_size": cfg.eval.batch_size,
    }
    ident = {s.name: {**s.as_dict(), "files": model_fingerprint(s.path)} for s in specs}
    digests: dict[tuple, str] = {}
    keys = {}
    for s in specs:
        for job in plan[s.name]:
            where = ("passkey", job[1]) if job[0] == "passkey" else ("windows", job[1], job[2])
            if where not in digests:
                digests[where] = inputs_digest(
                    payload["passkey"][job[1]] if job[0] == "passkey" else payload["windows"][job[1]][job[2]]
                )
            teacher = None
            job_settings = settings
            if job[0] == "passkey":  # a record without the forced choice must not stand in for one with it
                job_settings = {**settings, "passkey_choices": cfg.eval.passkey_choices}
                if cfg.eval.passkey_distractors != "random":  # random keeps the keys of earlier records valid
                    job_settings["passkey_distractors"] = cfg.eval.passkey_distractors
            if job[0] == "relkl":
                teacher = {**ident[teacher_spec.name], "yarn_logit_correction": cfg.rope.yarn_logit_correction}
            keys[(s.name, job)] = job_key(job, ident[s.name], digests[where], job_settings, teacher)
    return keys


def reuse_finished_jobs(plan: dict[str, list[tuple]], keys: dict, log: JobLog) -> list[dict]:
    """Results of finished jobs from the log; drops those jobs from `plan` (in place)."""
    done = log.load()
    reused = []
    for name, jobs in plan.items():
        keep = []
        for job in jobs:
            r = done.get(keys[(name, job)])
            if r is None:
                keep.append(job)
            else:
                reused.append(r)
        plan[name] = keep
    return reused
