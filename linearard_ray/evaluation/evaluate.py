"""Evaluation of restoration and long context: how much short-text ability came back, and does the
long window work?

For every model (default: the teacher, the RoPE-scaled but unrestored student, and the restored
student), on the main texts and on a second domain:
- mean NLL and perplexity on held-out windows at ``eval.short_lengths`` and ``eval.long_lengths``;
- relation KL(teacher ‖ model) per layer and relation (Q·Qᵀ, K·Kᵀ, V·Vᵀ row distributions) at the
  short lengths;
- restoration figures at the short lengths (see ``report.DEFINITIONS``);
- passkey retrieval over ``eval.passkey_lengths`` × ``eval.passkey_depths``.

Work is split into jobs per (model, domain, length) and per (model, passkey length). They run in
this process, or as Ray tasks with one GPU each when a Ray cluster with several GPUs is available.
Windows and passkey prompts are built once, here, so every model and every task sees the same
tokens. Each finished job is appended to ``<eval.output_dir>/jobs.jsonl`` at once; a rerun of an
interrupted evaluation reuses those whose models, inputs and settings are unchanged
(``eval.resume``, see ``eval_resume``). The report (``report.json``, ``report.md``, PNG plots) goes
to ``eval.output_dir`` and, when tracking is enabled, into an MLflow run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linearard_ray.config import Config, ConfigError, EvalModelSpec, RopeConfig
from linearard_ray.evaluation.job_log import JobLog, inputs_digest, job_key, model_fingerprint
from linearard_ray.evaluation.metrics import sequence_nll_rows
from linearard_ray.evaluation.passkey import min_length, prompts_for, run_passkey, score_key_choices
from linearard_ray.evaluation.texts import bos_prefix, load_documents, make_windows, tokenize_documents
from linearard_ray.models.unwrap import decoder_and_head

DOMAINS = ("main", "other")  # eval.texts, eval.other_texts


class EvalError(RuntimeError):
    """Evaluation cannot run as configured; the message says why."""


@dataclass
class ModelSpec:
    name: str
    path: str
    rope: RopeConfig | None  # None = the RoPE of the checkpoint
    role: str  # teacher | scaled | restored | model

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "role": self.role,
            "rope": self.rope.model_dump(mode="json", exclude_none=True) if self.rope else "from checkpoint",
        }


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


# --------------------------------------------------------------------------- models


def model_specs(cfg: Config) -> list[ModelSpec]:
    """The models to evaluate: `eval.models`, or teacher / scaled / restored by default.

    With an explicit list, the model named 'teacher' (else the first) is the reference for
    relation KL and restoration; the unrestored baseline of "gap closed" is the model named
    'scaled', else the first other entry that sets `rope` (a RoPE-scaled copy), else none.
    """
    ev = cfg.eval
    if ev.models:
        names = [m.name for m in ev.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"eval.models: duplicate model names {dup}")
        ref = "teacher" if "teacher" in names else names[0]
        scaled = (
            "scaled"
            if "scaled" in names
            else next((m.name for m in ev.models if m.rope is not None and m.name != ref), None)
        )
        return [
            ModelSpec(
                m.name, m.path, m.rope, "teacher" if m.name == ref else ("scaled" if m.name == scaled else "model")
            )
            for m in ev.models
        ]
    specs = [
        ModelSpec("teacher", cfg.model.teacher, None, "teacher"),
        ModelSpec("scaled", cfg.model.teacher, cfg.rope, "scaled"),
    ]
    if ev.student_path:
        specs.append(ModelSpec("restored", ev.student_path, None, "restored"))
    return specs


def _device(cfg: Config) -> torch.device:
    d = cfg.eval.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise ConfigError(f"eval.device: {d!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"eval.device is {d!r} but CUDA is not available here")
    return dev


def load_eval_model(spec: ModelSpec, cfg: Config, device: torch.device):
    from linearard_ray.models.loading import load_model

    return load_model(spec.path, cfg.model, rope_cfg=spec.rope, device=device)


def _tokenizer(cfg: Config, specs: list[ModelSpec]):
    """The reference model's tokenizer; every model is fed the same token ids."""
    from linearard_ray.models.loading import load_tokenizer

    teacher = next(s for s in specs if s.role == "teacher")
    return load_tokenizer(cfg.model.model_copy(update={"teacher": teacher.path}))


def _max_window(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


# --------------------------------------------------------------------------- metrics


def nll_windows(model, windows: np.ndarray, batch_size: int, device) -> dict:
    """Summed NLL and predicted-token count over windows (each window predicts its own tokens), and
    each window's mean NLL in window order: every model gets the same windows, so the report can
    compare two of them window by window."""
    sums: list[float] = []
    counts: list[int] = []
    for s in range(0, len(windows), batch_size):
        ids = torch.as_tensor(windows[s : s + batch_size], dtype=torch.long, device=device)
        t, c = sequence_nll_rows(model, ids, torch.ones_like(ids))
        sums += t
        counts += c
    return {
        "nll_sum": float(sum(sums)),
        "tokens": int(sum(counts)),
        "window_nll": [t / c for t, c in zip(sums, counts, strict=False)],
    }


def qk_correction(hf_config, yarn_logit_correction: str) -> float:
    """Multiplier on the Q·Qᵀ and K·Kᵀ logit scale of one model (V·Vᵀ keeps its scale).

    RoPE types with an attention factor m (yarn, longrope) multiply cos/sin by m, so q·q and k·k
    carry m²; 'divide' removes it so the relation compares shapes of distributions, as the
    training objective does.
    """
    if yarn_logit_correction != "divide":
        return 1.0
    from linearard_ray.models.rope import rope_attention_factor

    return 1.0 / rope_attention_factor(hf_config) ** 2


@torch.no_grad()
def relation_kl_windows(
    teacher,
    student,
    windows: np.ndarray,
    batch_size: int,
    device,
    yarn_logit_correction: str = "divide",
    layers: list[int] | None = None,
) -> dict:
    """Per layer, summed row KL(teacher ‖ student) of the Q/Q, K/K and V/V self-relations and of the
    attention map ("qk": the causal softmax of Q·Kᵀ the model reads positions with), and the number
    of rows (batch × heads × positions) each was summed over.

    Relation logits use each attention's own softmax scale (1/√D for the supported models); the
    attention map keeps YaRN's m² (it is what the model attends with), the Q/Q and K/K relations
    divide it out as the objective does."""
    from linearard_ray.models.capture import capture_qkv
    from linearard_ray.ops import relation_kl, relation_kl_layer

    n_layers = teacher.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else layers
    ct_corr = qk_correction(teacher.config, yarn_logit_correction)
    cs_corr = qk_correction(student.config, yarn_logit_correction)
    sums = {l: {"q": 0.0, "k": 0.0, "v": 0.0, "qk": 0.0} for l in layers}
    rows = {"q": 0, "k": 0, "v": 0}
    for s in range(0, len(windows), batch_size):
        ids = torch.as_tensor(windows[s : s + batch_size], dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        with capture_qkv(teacher, layers) as ct:
            decoder_and_head(teacher)[0](input_ids=ids, attention_mask=mask)
        ct.check_complete()
        with capture_qkv(student, layers) as cs:
            decoder_and_head(student)[0](input_ids=ids, attention_mask=mask)
        cs.check_complete()
        for l in layers:
            a_t, a_s = ct.scaling[l], cs.scaling[l]
            kls = relation_kl_layer(
                cs.q[l],
                cs.k[l],
                cs.v[l],
                ct.q[l],
                ct.k[l],
                ct.v[l],
                attention_mask=mask,
                causal=True,
                student_scales=(a_s * cs_corr, a_s * cs_corr, a_s),
                teacher_scales=(a_t * ct_corr, a_t * ct_corr, a_t),
                reduction="sum",
            )
            for r, kl in zip("qkv", kls, strict=False):
                sums[l][r] += float(kl)
            sums[l]["qk"] += float(
                relation_kl(
                    cs.q[l],
                    cs.k[l],
                    ct.q[l],
                    ct.k[l],
                    attention_mask=mask,
                    causal=True,
                    student_scale=a_s,
                    teacher_scale=a_t,
                    reduction="sum",
                )
            )
        B, T = ids.shape
        rows["q"] += B * ct.q[layers[0]].shape[1] * T
        rows["k"] += B * ct.k[layers[0]].shape[1] * T
        rows["v"] += B * ct.v[layers[0]].shape[1] * T
        del ct, cs
    rows["qk"] = rows["q"]  # the attention map has a row per query head and position, as Q/Q
    return {"sums": {str(l): v for l, v in sums.items()}, "rows": rows}


# --------------------------------------------------------------------------- jobs


def _run_jobs(
    spec: ModelSpec,
    teacher_spec: ModelSpec,
    jobs: list[tuple],
    payload: dict,
    cfg: Config,
    cache: dict | None = None,
    on_result: Callable[[ModelSpec, tuple, dict], None] | None = None,
) -> list[dict]:
    """Run `jobs` for one model: ('nll', domain, L), ('relkl', domain, L), ('passkey', L).

    `cache` keeps loaded models between calls in this process (teacher pinned); `on_result` sees
    each job's result as soon as it exists (the resume log)."""
    device = _device(cfg)
    cache = {} if cache is None else cache

    def get(s: ModelSpec):
        if s.name not in cache:
            if s.name != teacher_spec.name:  # at most the teacher and one other model stay loaded
                for k in [k for k in cache if k != teacher_spec.name]:
                    del cache[k]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.time()
            cache[s.name] = load_eval_model(s, cfg, device)
            _log(f"loaded {s.name} ({s.path}) on {device} in {time.time() - t0:.1f}s")
        return cache[s.name]

    ev = cfg.eval
    out = []
    model = get(spec)
    for job in jobs:
        t0 = time.time()
        if job[0] == "nll":
            _, dom, L = job
            r = nll_windows(model, payload["windows"][dom][L], ev.batch_size, device)
            res = {"kind": "nll", "model": spec.name, "domain": dom, "length": L, **r}
            msg = f"ppl {math.exp(r['nll_sum'] / r['tokens']):.3f}"
        elif job[0] == "relkl":
            from linearard_ray.models.loading import ModelError, check_same_architecture

            _, dom, L = job
            teacher = get(teacher_spec)
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
                msg = "relation KL skipped (architecture differs from the teacher's)"
            else:
                r = relation_kl_windows(
                    teacher, model, payload["windows"][dom][L], ev.batch_size, device, cfg.rope.yarn_logit_correction
                )
                res = {"kind": "relkl", "model": spec.name, "domain": dom, "length": L, **r}
                mean = {k: sum(v[k] for v in r["sums"].values()) / (len(r["sums"]) * r["rows"][k]) for k in r["rows"]}
                msg = "relation KL " + " ".join(f"{k} {v:.4g}" for k, v in mean.items())
        elif job[0] == "passkey":
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
            res = {"kind": "passkey", "model": spec.name, "length": L, "results": rows}
            dom = "passkey"
        else:  # pragma: no cover - internal
            raise ValueError(job)
        res["seconds"] = time.time() - t0
        res["max_position_embeddings"] = _max_window(model)
        _log(f"{spec.name} {dom} L={job[-1]}: {msg} ({res['seconds']:.1f}s)")
        out.append(res)
        if on_result is not None:
            on_result(spec, job, res)
    return out


def _plan(specs: list[ModelSpec], windows: dict, passkey: dict, cfg: Config) -> dict[str, list[tuple]]:
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


def _use_ray(ray_address: str | None, distribute: bool | None) -> bool:
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


def _run_all(
    specs,
    teacher_spec,
    plan,
    payload,
    cfg,
    use_ray: bool,
    task_resources: dict | None,
    on_result: Callable[[ModelSpec, tuple, dict], None] | None = None,
) -> list[dict]:
    if not use_ray:
        cache: dict = {}
        results = []
        # Teacher first so it stays loaded for every relation-KL job that follows.
        for s in sorted(specs, key=lambda s: s.role != "teacher"):
            if plan[s.name]:
                results += _run_jobs(s, teacher_spec, plan[s.name], payload, cfg, cache, on_result)
        return results
    import ray

    res = task_resources or {"num_gpus": 1}
    remote = ray.remote(**res)(_run_jobs)
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
    _log(f"submitted {len(futures)} Ray tasks ({res} each)")
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


# --------------------------------------------------------------------------- lm-eval


def check_lm_eval(tasks: list[str]) -> None:
    """Fail early, with the fix, when lm-evaluation-harness tasks are asked for but not installed."""
    if not tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            f"eval.lm_eval_tasks={tasks} needs lm-evaluation-harness, which is not installed: "
            "`pip install 'linearard_ray[lm-eval]'` or `pip install 'lm-eval[hf]'` (its task data must be "
            "downloadable or already in the HF datasets cache), "
            "or set eval.lm_eval_tasks=[]"
        ) from None


def run_lm_eval(specs: list[ModelSpec], cfg: Config) -> dict:
    """lm-evaluation-harness scores per model (optional extra)."""
    check_lm_eval(cfg.eval.lm_eval_tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from linearard_ray.models.loading import load_tokenizer

    device = _device(cfg)
    tok = load_tokenizer(cfg.model)
    out = {}
    for s in specs:
        model = load_eval_model(s, cfg, device)
        try:
            r = simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.eval.batch_size),
                tasks=list(cfg.eval.lm_eval_tasks),
            )
        except Exception as e:  # dataset download refused offline, unknown task, ...
            raise EvalError(
                f"lm-evaluation-harness failed for tasks {cfg.eval.lm_eval_tasks} on model {s.name}: "
                f"{type(e).__name__}: {e}. Offline, its datasets must already be in the HF cache."
            ) from e
        out[s.name] = {
            t: {k: v for k, v in m.items() if isinstance(v, (int, float))}
            for t, m in (r or {}).get("results", {}).items()
        }
        del model
    return out


# --------------------------------------------------------------------------- entry points


def prepare_inputs(cfg: Config, tokenizer) -> tuple[dict, dict, dict, list[dict]]:
    """(windows[domain][L], window descriptions, passkey prompts[L], skipped entries)."""
    ev = cfg.eval
    lengths = sorted(set(ev.short_lengths) | set(ev.long_lengths))
    bad = [L for L in lengths + list(ev.passkey_lengths) if L < 8]
    if bad:
        raise ConfigError(f"eval lengths must be >= 8 tokens, got {bad}")
    prefix = bos_prefix(tokenizer)
    sep = tokenizer.eos_token_id
    windows: dict = {}
    info: dict = {}
    skipped: list[dict] = []
    for dom, sources in (("main", ev.texts), ("other", ev.other_texts)):
        if not sources:
            continue
        docs = load_documents(sources, cfg.data.text_column)
        tok_docs = tokenize_documents(docs, tokenizer)
        ids = [d.id for d in docs.documents]
        info[dom] = {
            "sources": list(sources),
            "documents": len(docs.documents),
            "empty_documents_skipped": docs.empty_skipped,
            "tokens": int(sum(len(t) for t in tok_docs)),
            "lengths": {},
        }
        windows[dom] = {}
        for L in lengths:
            ws = make_windows(tok_docs, ids, L, ev.max_windows, ev.seed, prefix, sep)
            info[dom]["lengths"][str(L)] = ws.describe()
            if ws.skipped:
                skipped.append({"section": "nll", "domain": dom, "length": L, "reason": ws.skipped_reason})
                _log(f"{dom} L={L}: skipped ({ws.skipped_reason})")
            else:
                windows[dom][L] = ws.windows
                if ws.n < ws.requested:
                    _log(f"{dom} L={L}: only {ws.n} of {ws.requested} windows available")
    passkey: dict = {}
    need = min_length(tokenizer, prefix)
    for L in sorted(set(ev.passkey_lengths)):
        if L < need:
            skipped.append(
                {
                    "section": "passkey",
                    "length": L,
                    "reason": f"shorter than the passkey prompt without filler ({need} tokens)",
                }
            )
            continue
        passkey[L] = prompts_for(tokenizer, L, list(ev.passkey_depths), ev.passkey_trials, ev.seed, prefix)
    return windows, info, passkey, skipped


def _job_keys(
    specs: list[ModelSpec], teacher_spec: ModelSpec, plan: dict[str, list[tuple]], payload: dict, cfg: Config
) -> dict[tuple[str, tuple], str]:
    """(model name, job) -> its resume key (see `eval_resume`)."""
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


def _reuse(plan: dict[str, list[tuple]], keys: dict, log: JobLog) -> list[dict]:
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


def evaluate(
    cfg: Config, *, ray_address: str | None = None, distribute: bool | None = None, task_resources: dict | None = None
) -> dict:
    """Evaluate the configured models; write report.json / report.md / plots to eval.output_dir,
    log an MLflow run when tracking is enabled, and return the report dict.

    ``distribute``: None = Ray tasks when a Ray cluster with more than one GPU (or a GPU this
    machine lacks) is reachable (already initialised, or at ``ray_address``); True/False force it. ``task_resources`` are the
    Ray resources of one task (default one GPU).
    """
    from linearard_ray.evaluation import report as rep

    t_start = time.time()
    ev = cfg.eval
    check_lm_eval(ev.lm_eval_tasks)
    if not ev.texts:
        raise ConfigError("eval.texts is empty: give at least one text source (default builtin:sotu/eval)")
    specs = model_specs(cfg)
    teacher_spec = next(s for s in specs if s.role == "teacher")
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _tokenizer(cfg, specs)
    windows, info, passkey, skipped = prepare_inputs(cfg, tokenizer)
    payload = {"windows": windows, "passkey": passkey, "tokenizer": tokenizer}
    plan = _plan(specs, windows, passkey, cfg)
    keys = _job_keys(specs, teacher_spec, plan, payload, cfg)
    log = JobLog(out_dir / "jobs.jsonl")
    reused = _reuse(plan, keys, log) if ev.resume else []
    if not ev.resume and log.path.exists():
        log.path.unlink()  # a fresh run: the log describes this run only
    use_ray = _use_ray(ray_address, distribute)
    todo = sum(len(j) for j in plan.values())
    _log(
        f"{len(specs)} models, {todo + len(reused)} jobs ({len(reused)} reused from {log.path}), "
        f"{'Ray tasks' if use_ray else 'in this process'}; output {out_dir}"
    )
    results = reused + _run_all(
        specs,
        teacher_spec,
        plan,
        payload,
        cfg,
        use_ray,
        task_resources,
        lambda s, job, r: log.append(keys[(s.name, job)], r),
    )
    report = rep.build_report(cfg, [s.as_dict() for s in specs], info, results, skipped, passkey)
    if ev.lm_eval_tasks:
        report["lm_eval"] = run_lm_eval(specs, cfg)
    report["seconds"] = round(time.time() - t_start, 1)
    report["output_dir"] = str(out_dir.resolve())
    files = rep.write_report(report, out_dir)
    if cfg.tracking.enabled:
        report["mlflow"] = rep.log_mlflow(cfg, report, out_dir)
        rep.write_json(report, out_dir / "report.json")
    _log(f"done in {report['seconds']}s: " + ", ".join(str(p) for p in files))
    return report


def evaluate_student(cfg: Config, student_dir: str | os.PathLike) -> dict:
    """Evaluate an exported student against the teacher and the unrestored scaled model (what
    training calls at the end when ``train.evaluate_at_end`` is true). The report goes to
    ``<student_dir>/eval`` unless ``eval.output_dir`` was changed from its default."""
    from linearard_ray.config import EvalConfig

    student_dir = str(student_dir)
    upd: dict[str, Any] = {"student_path": student_dir}
    if cfg.eval.output_dir == EvalConfig().output_dir:
        upd["output_dir"] = str(Path(student_dir) / "eval")
    if cfg.eval.models:
        # An explicit list: evaluate it plus this student unless it is already there.
        if not any(m.path == student_dir for m in cfg.eval.models):
            upd["models"] = list(cfg.eval.models) + [EvalModelSpec(name="restored", path=student_dir)]
    new = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=upd)})
    return evaluate(new)
