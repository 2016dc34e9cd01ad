"""Evaluation of restoration and long context: how much short-text ability came back, and does the
long window work?

For every model (default: the teacher, the RoPE-scaled but unrestored student, and the restored
student), on the main texts and on a second domain:
- mean NLL and perplexity on held-out windows at ``eval.short_lengths`` and ``eval.long_lengths``;
- relation KL(teacher ‖ model) per layer and relation (Q·Qᵀ, K·Kᵀ, V·Vᵀ row distributions) at the
  short lengths;
- restoration figures at the short lengths (see ``report.DEFINITIONS``);
- passkey retrieval over ``eval.passkey_lengths`` × ``eval.passkey_depths``.

Work is split into jobs per (model, domain, length) and per (model, passkey length) (``jobs``).
They run in this process, or as Ray tasks with one GPU each when a Ray cluster with several GPUs is
available. Windows and passkey prompts are built once, here, so every model and every task sees
the same tokens. Each finished job is appended to ``<eval.output_dir>/jobs.jsonl`` at once; a rerun
of an interrupted evaluation reuses those whose models, inputs and settings are unchanged
(``eval.resume``, see ``job_log``). The report (``report.json``, ``report.md``, PNG plots) goes
to ``eval.output_dir`` and, when tracking is enabled, into an MLflow run.

Modules of this stage: ``specs`` (the models), ``texts`` and ``passkey`` (the inputs), ``metrics``
(the measurements), ``jobs`` (planning, running, resuming), ``harness`` (lm-eval), ``report``
(figures), ``markdown``, ``plots`` and ``outputs`` (the report's files and MLflow run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from linearard_ray.config import Config, ConfigError, EvalModelSpec
from linearard_ray.data.genres import source_family
from linearard_ray.evaluation.harness import check_lm_eval, run_lm_eval
from linearard_ray.evaluation.job_log import JobLog
from linearard_ray.evaluation.jobs import (
    OverallProgress,
    job_keys,
    job_weight,
    plan_jobs,
    reuse_finished_jobs,
    run_all_jobs,
    use_ray,
)
from linearard_ray.evaluation.passkey import min_length, prompts_for
from linearard_ray.evaluation.specs import (
    EvalError,
    ModelSpec,
    check_model_paths,
    log_progress,
    model_specs,
    reference_tokenizer,
)
from linearard_ray.evaluation.texts import (
    TextsError,
    bos_prefix,
    check_source,
    load_documents,
    make_windows,
    tokenize_documents,
)
from linearard_ray.paths import output_path

__all__ = ["EvalError", "evaluate", "evaluate_student", "prepare_inputs"]


def eval_domains(cfg: Config) -> dict[str, list[str]]:
    """Every text domain of the evaluation, by its key in the report: main, other, then eval.domains."""
    ev = cfg.eval
    return {k: list(v) for k, v in (("main", ev.texts), ("other", ev.other_texts), *ev.domains.items()) if v}


def check_eval_texts(cfg: Config) -> None:
    """ConfigError naming the field unless every evaluation source can be read here (a genre not
    built yet names the command that builds it); before any model is loaded."""
    fields = {"main": "eval.texts", "other": "eval.other_texts"}
    for dom, sources in eval_domains(cfg).items():
        for src in sources:
            try:
                check_source(src)
            except TextsError as e:
                raise ConfigError(f"{fields.get(dom, f'eval.domains.{dom}')}: {e}") from None


def check_inputs(cfg: Config) -> list[ModelSpec]:
    """Every check ``evaluate`` makes before it loads a model (lm-eval tasks, the texts, the models'
    paths), raising ConfigError; returns the model specs. --dry-run makes the same checks."""
    ev = cfg.eval
    check_lm_eval(ev.lm_eval_tasks, ev.lm_eval_args)
    if not ev.texts:
        raise ConfigError("eval.texts is empty: give at least one text source (default builtin:sotu/eval)")
    check_eval_texts(cfg)
    specs = model_specs(cfg)
    check_model_paths(specs, cfg)  # a wrong student path fails now, not after the teacher's jobs
    return specs


def in_domain(sources: list[str], cfg: Config) -> bool:
    """Whether a domain's text is of the genre the training sources name (data.sources)."""
    trained = {source_family(s) for s in (*cfg.data.sources, *(cfg.data.lm_sources or []))}
    return any(source_family(s) in trained for s in sources)


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
    for dom, sources in eval_domains(cfg).items():
        docs = load_documents(sources, cfg.data.text_column)
        tok_docs = tokenize_documents(docs, tokenizer)
        ids = [d.id for d in docs.documents]
        info[dom] = {
            "sources": list(sources),
            "documents": len(docs.documents),
            "empty_documents_skipped": docs.empty_skipped,
            "tokens": int(sum(len(t) for t in tok_docs)),
            "in_domain": in_domain(sources, cfg),
            "lengths": {},
        }
        windows[dom] = {}
        for L in lengths:
            ws = make_windows(tok_docs, ids, L, ev.windows_at(L), ev.seed, prefix, sep)
            info[dom]["lengths"][str(L)] = ws.describe()
            if ws.skipped:
                skipped.append({"section": "nll", "domain": dom, "length": L, "reason": ws.skipped_reason})
                log_progress(f"{dom} L={L}: skipped ({ws.skipped_reason})")
            else:
                windows[dom][L] = ws.windows
                if ws.n < ws.requested:
                    log_progress(f"{dom} L={L}: only {ws.n} of {ws.requested} windows available")
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


def _write_outputs(cfg: Config, report: dict, specs, out_dir: Path, t_start: float) -> list[Path]:
    """lm-eval scores (when asked for), the report's files, its MLflow run and the evaluated
    students' model cards."""
    from linearard_ray.evaluation import outputs
    from linearard_ray.evaluation.students import update_student_cards

    if cfg.eval.lm_eval_tasks:
        report["lm_eval"] = run_lm_eval(specs, cfg)
    report["seconds"] = round(time.time() - t_start, 1)
    report["output_dir"] = str(out_dir.resolve())
    files = outputs.write_report(report, out_dir)
    try:
        if cfg.tracking.enabled:
            report["mlflow"] = outputs.log_mlflow(cfg, report, out_dir)
            outputs.write_json(report, out_dir / "report.json")
    finally:
        # Once, after the MLflow run so the cards name it; a failed run still leaves them updated.
        update_student_cards(report, report.get("mlflow", {}).get("run_id"))
    return files


def _log_preset(ev) -> None:
    """Which preset sized this evaluation, and the fields the config set over it."""
    kept = ev.preset_overrides()
    log_progress(
        f"eval.preset={ev.preset}"
        + ("; set in the config over it: " + ", ".join(f"{k}={v[1]}" for k, v in kept.items()) if kept else "")
    )


def evaluate(
    cfg: Config, *, ray_address: str | None = None, distribute: bool | None = None, task_resources: dict | None = None
) -> dict:
    """Evaluate the configured models; write report.json / report.md / plots to eval.output_dir,
    log an MLflow run when tracking is enabled, and return the report dict.

    ``distribute``: None = Ray tasks when a Ray cluster with more than one GPU (or a GPU this
    machine lacks) is reachable (already initialised, or at ``ray_address``); True/False force it.
    ``task_resources`` are the Ray resources of one task (default one GPU).
    """
    from linearard_ray.evaluation.report import build_report

    t_start = time.time()
    ev = cfg.eval
    specs = check_inputs(cfg)
    _log_preset(ev)
    teacher_spec = next(s for s in specs if s.role == "teacher")
    out_dir = Path(output_path(ev.output_dir))  # not in Ray's copy of a submitted job's working_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = reference_tokenizer(cfg, specs)
    windows, info, passkey, skipped = prepare_inputs(cfg, tokenizer)
    payload = {"windows": windows, "passkey": passkey, "tokenizer": tokenizer}
    plan = plan_jobs(specs, windows, passkey, cfg)
    keys = job_keys(specs, teacher_spec, plan, payload, cfg)
    log = JobLog(out_dir / "jobs.jsonl")
    reused = reuse_finished_jobs(plan, keys, log) if ev.resume else []
    if not ev.resume and log.path.exists():
        log.path.unlink()  # a fresh run: the log describes this run only
    ray_tasks = use_ray(ray_address, distribute)
    todo = sum(len(j) for j in plan.values())
    progress = OverallProgress(
        {(n, job): job_weight(job, payload, cfg) for n, jobs in plan.items() for job in jobs}, len(reused)
    )
    log_progress(
        f"{len(specs)} models, {todo + len(reused)} jobs ({len(reused)} reused from {log.path}), "
        f"{'Ray tasks' if ray_tasks else 'in this process'}; output {out_dir}"
    )
    results = reused + run_all_jobs(
        specs,
        teacher_spec,
        plan,
        payload,
        cfg,
        ray_tasks,
        task_resources,
        lambda s, job, r: (log.append(keys[(s.name, job)], r), progress.job_done(s.name, job)),
    )
    report = build_report(cfg, [s.as_dict() for s in specs], info, results, skipped, passkey)
    files = _write_outputs(cfg, report, specs, out_dir, t_start)
    log_progress(f"done in {report['seconds']}s: " + ", ".join(str(p) for p in files))
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
