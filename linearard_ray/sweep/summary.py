"""The summary of a sweep: one row per trial, the best trial (by configuration when repeated),
the results table, the objective plot, the best trial's config file, and the MLflow summary run.

MLflow: one experiment per sweep (named after it), one run per trial written by
``MLflowLoggerCallback`` on the Tuner (swept values as params, reported metrics over optimizer
steps), and a summary run with the results table, a plot of the objective against each swept
value and the best trial's config. The training job's own MLflow logging is switched off inside
trials, so that every trial is exactly one MLflow run."""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linearard_ray.config import Config, TuneConfig, build_config, dump_config
from linearard_ray.logs import get_logger, show_result
from linearard_ray.storage import fs_and_path, read_text, write_bytes
from linearard_ray.sweep.metrics import context_metrics
from linearard_ray.sweep.plan import repeat_dict
from linearard_ray.sweep.search_space import ParamSpec, apply_params, plain, split_repeat
from linearard_ray.sweep.trial import TRIAL_RESULT_FILE, ran_every_step

log = get_logger(__name__)

SWEEP_TAG = "linearard.sweep"
ROLE_TAG = "linearard.sweep.role"
SESSION_TAG = "linearard.sweep.session"
STATUSES = ("completed", "stopped", "error", "unfinished")
OBJECTIVE_DPI = 110


@dataclass
class SweepResult:
    sweep_name: str
    sweep_dir: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_path: str | None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    summary_run_id: str | None = None
    files: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- rows


def collect_rows(grid, specs: list[ParamSpec], plan: dict, t: TuneConfig, stopped: set[str]) -> list[dict[str, Any]]:
    """One row per trial: name, status (error, stopped early by the scheduler, completed, or
    unfinished when the sweep was interrupted), swept values, the objective (last and best) and
    context."""
    rows = [_trial_row(r, specs, plan, t, stopped) for r in grid]
    rows.sort(key=lambda x: x["trial"])
    return rows


def _trial_row(r, specs: list[ParamSpec], plan: dict, t: TuneConfig, stopped: set[str]) -> dict[str, Any]:
    """The row of one trial's Tune result ``r``."""
    name = Path(str(r.path)).name
    m = dict(r.metrics or {})
    done = read_text(f"{plan['run_storage']}/{name}/{TRIAL_RESULT_FILE}")
    done = json.loads(done) if done else None
    row: dict[str, Any] = {"trial": name, "status": _trial_status(r, name, m, stopped)}
    row["repeat"] = split_repeat(r.config or {})[1]
    for s in specs:
        row[s.key] = plain((r.config or {}).get(s.key))
    row[t.metric] = _num(m.get(t.metric))
    row[f"best_{t.metric}"] = _best_reported(r.metrics_dataframe, t.metric, t.mode)
    for k in context_metrics(t.metric, plan["base"]["train"]["eval_sources"]):
        row[k] = _num(m.get(k))
    for k in ("step", "tokens_seen"):
        v = _num(m.get(k))
        row[k] = int(v) if v is not None else None
    row["student_dir"] = (done or {}).get("student_dir")
    row["error"] = (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error is not None else None
    return row


def _trial_status(r, name: str, metrics: dict[str, Any], stopped: set[str]) -> str:
    if r.error is not None:
        return "error"
    if name in stopped:
        # a stop decided on the report of the last step cut nothing short
        return "completed" if ran_every_step(metrics) else "stopped"
    # Tune marks a trial's last result done when its function returned; not when interrupted
    return "completed" if metrics.get("done") else "unfinished"


def _best_reported(df, metric: str, mode: str) -> float | None:
    """The best finite value of ``metric`` over all of a trial's reports (None when none)."""
    if df is None or metric not in df:
        return None
    vals = [float(v) for v in df[metric].tolist() if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return min(vals) if mode == "min" else max(vals)


def _num(v: Any) -> float | None:
    v = plain(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# --------------------------------------------------------------------------- the best trial


def _pool(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Trials that ran to the end with an objective (all that reported one, when none did): a trial
    ASHA stopped was already behind at its last rung."""
    scored = [r for r in rows if r.get(metric) is not None]
    return [r for r in scored if r["status"] == "completed"] or scored


def point_rows(rows: list[dict[str, Any]], keys: list[str], metric: str) -> list[dict[str, Any]]:
    """One row per configuration (the swept values of ``keys``): its trials and the mean, lowest
    and highest objective over those in ``_pool``; first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(json.dumps([r.get(k) for k in keys], default=str), []).append(r)
    pool = {id(r) for r in _pool(rows, metric)}
    out = []
    for trials in groups.values():
        vals = [r[metric] for r in trials if id(r) in pool]
        out.append(
            {
                **{k: trials[0].get(k) for k in keys},
                "trials": len(trials),
                "scored": len(vals),
                f"mean_{metric}": sum(vals) / len(vals) if vals else None,
                f"min_{metric}": min(vals, default=None),
                f"max_{metric}": max(vals, default=None),
                "trial_names": [r["trial"] for r in trials],
            }
        )
    return out


def pick_best(
    rows: list[dict[str, Any]], metric: str, mode: str, keys: list[str] | None = None
) -> dict[str, Any] | None:
    """The trial with the best last-reported objective among ``_pool``. With repeats (``keys``
    given and a configuration trained more than once), the configuration with the best mean wins
    first, then its best trial: one lucky training must not pick the configuration."""
    pool = _pool(rows, metric)
    if not pool:
        return None
    better = min if mode == "min" else max
    points = point_rows(pool, keys, metric) if keys else []
    if any(p["trials"] > 1 for p in points):
        top = better(points, key=lambda p: p[f"mean_{metric}"])
        pool = [r for r in pool if r["trial"] in top["trial_names"]]
    return better(pool, key=lambda r: r[metric])


def best_config_yaml(plan: dict, row: dict[str, Any], specs: list[ParamSpec], metric: str) -> str:
    """The best trial's full config as YAML that pipelines/distill.py --config accepts as it is:
    the base plus the trial's values, named after the trial; the testing aid train.fail_at_step
    is cleared (it would only inject a failure into the real run)."""
    params = {s.key: row[s.key] for s in specs}
    k = row.get("repeat", 0)  # that trial's own seed, so that the file trains it again
    d = repeat_dict(plan["base"], params, k)
    d["train"]["run_name"] = row["trial"]
    d["train"]["fail_at_step"] = None
    cfg = build_config(d)
    head = (
        f"# Best trial of sweep {plan['sweep_name']}: {row['trial']} ({metric} = {row[metric]:.6g}).\n"
        + "".join(f"#   {k} = {v!r}\n" for k, v in params.items())
        + (f"# Its student: {row['student_dir']}\n" if row.get("student_dir") else "")
        + (f"# Repeat {k + 1} of its configuration: train.seed is the sweep's + {k}.\n" if k else "")
        + "# Train it again: python pipelines/distill.py --config best_config.yaml\n"
    )
    text = head + dump_config(cfg)
    build_config(yaml.safe_load(text))  # what distill.py will do with it
    return text


def remove_other_students(plan: dict, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """tune.keep_students=best: delete the exported students of the other trials of this sweep
    (each is a full merged model), only inside the sweep's own students directory."""
    root = Path(plan["students_dir"]).resolve()
    removed = []
    for r in rows:
        if best is not None and r["trial"] == best["trial"]:
            continue
        d = (root / r["trial"]).resolve()
        if d.parent == root and d.is_dir():
            shutil.rmtree(d)
            removed.append(r["trial"])
            r["student_dir"] = None
    if removed:
        log.info(
            f"[tune] tune.keep_students=best: removed the exported students of {len(removed)} other trial(s) "
            f"under {root}",
        )


# --------------------------------------------------------------------------- tables and plot


def results_table(rows: list[dict[str, Any]], columns: list[str]) -> tuple[str, str]:
    """(CSV, markdown) of the rows."""
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def results_columns(t: TuneConfig, specs: list[ParamSpec], eval_sources: dict[str, Any] | None) -> list[str]:
    """The columns of results.csv/.md: trial and status, swept values, objective, context."""
    return (
        ["trial", "status"]
        + [s.key for s in specs]
        + [t.metric, f"best_{t.metric}"]
        + context_metrics(t.metric, eval_sources)
        + ["step", "tokens_seen", "error", "student_dir"]
    )


def _results_texts(cfg: Config, specs: list[ParamSpec], rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(results.csv, results.md); the markdown adds a per-configuration table when any
    configuration was trained more than once."""
    t = cfg.tune
    csv_text, md_text = results_table(rows, results_columns(t, specs, cfg.train.eval_sources))
    keys = [s.key for s in specs]
    points = point_rows(rows, keys, t.metric)
    if any(p["trials"] > 1 for p in points):
        for p in points:
            p["trial names"] = ", ".join(p["trial_names"])
        _, points_md = results_table(
            points,
            keys + ["trials", "scored", f"mean_{t.metric}", f"min_{t.metric}", f"max_{t.metric}", "trial names"],
        )
        md_text += (
            "\nPer configuration, over its repeats (repeat k trains with train.seed + k; the best "
            "configuration is the best mean; once any trial has completed, trials the scheduler stopped "
            "early are not averaged, their objective being from an earlier step):\n\n" + points_md
        )
    return csv_text, md_text


def objective_figure(rows: list[dict[str, Any]], specs: list[ParamSpec], metric: str):
    """The objective (last reported) against each swept value, one panel per parameter; completed
    trials filled, stopped ones hollow. The title is wrapped to the figure's width: with one or two
    swept parameters the figure is narrower than the title's line."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(specs)
    cols = min(n, 3)  # rows of at most three panels keep the PNG narrow enough to read unscaled
    n_rows = math.ceil(n / cols)
    width = max(4.1 * cols, 6.0)
    fig, axes = plt.subplots(n_rows, cols, figsize=(width, 3.6 * n_rows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    scored = [r for r in rows if r.get(metric) is not None]
    for ax, s in zip(axes.flat, specs, strict=False):
        pos = _x_positions(ax, s, [r[s.key] for r in scored])
        for x, r in zip(pos, scored, strict=False):
            done = r["status"] == "completed"
            ax.scatter([x], [r[metric]], s=40, facecolors="C0" if done else "none", edgecolors="C0")
        ax.set_xlabel(s.key, fontsize=10)
        ax.set_ylabel(metric, fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    failed = len(rows) - len(scored)
    title = (
        f"{metric} per trial, last report ({len(scored)} scored"
        + (f", {failed} without a result" if failed else "")
        + "; hollow: stopped early)"
    )
    chars_per_line = int(width * 72 / (11 * 0.6))  # an 11 pt character is about 0.6 em wide
    fig.suptitle("\n".join(textwrap.wrap(title, chars_per_line)), fontsize=11)
    fig.tight_layout()
    return fig


def plot_objective(rows: list[dict[str, Any]], specs: list[ParamSpec], metric: str) -> bytes:
    """objective.png (see ``objective_figure``) as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = objective_figure(rows, specs, metric)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=OBJECTIVE_DPI)
    plt.close(fig)
    return buf.getvalue()


def _x_positions(ax, spec: ParamSpec, xs: list[Any]) -> list[float]:
    """Where each swept value sits on the panel's x axis: the value itself when every value is a
    number (log scale for loguniform), else the index of its label, with the labels as ticks."""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs) and xs
    if numeric:
        if spec.kind == "loguniform":
            ax.set_xscale("log")
        return [float(x) for x in xs]

    def label(x: Any) -> str:
        return json.dumps(x, default=str) if not isinstance(x, str) else x

    labels = sorted({label(x) for x in xs})
    index = {lab: i for i, lab in enumerate(labels)}
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, fontsize=9)
    return [index[label(x)] for x in xs]


# --------------------------------------------------------------------------- the summary


def summarize(
    cfg: Config,
    specs: list[ParamSpec],
    plan: dict,
    rows: list[dict[str, Any]],
    uri: str | None,
    exp_id: str | None,
    session: str,
    wall_s: float,
) -> SweepResult:
    """Write results.csv/.md, objective.png and best_config.yaml into the sweep directory, add
    each trial's config to its MLflow run, and log the summary run."""
    t = cfg.tune
    sweep_dir = plan["sweep_dir"]
    csv_text, md_text = _results_texts(cfg, specs, rows)
    png = plot_objective(rows, specs, t.metric)
    best = pick_best(rows, t.metric, t.mode, [s.key for s in specs])
    files = {
        "results.csv": f"{sweep_dir}/results.csv",
        "results.md": f"{sweep_dir}/results.md",
        "objective.png": f"{sweep_dir}/objective.png",
    }
    write_bytes(files["results.csv"], csv_text.encode())
    write_bytes(files["results.md"], md_text.encode())
    write_bytes(files["objective.png"], png)
    best_path = None
    if best is not None:
        best_path = files["best_config.yaml"] = f"{sweep_dir}/best_config.yaml"
        write_bytes(best_path, best_config_yaml(plan, best, specs, t.metric).encode())

    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    _print_results(t, rows, counts, md_text, wall_s)
    summary_id = None
    if uri and exp_id:
        summary_id = _log_mlflow(cfg, specs, plan, rows, best, uri, exp_id, session, files, counts, wall_s)
    _print_where(t, best, best_path, uri, exp_id, summary_id)
    on_disk = {"sweep_dir": sweep_dir, "best_config_path": best_path, "files": files}
    in_mlflow = {"tracking_uri": uri, "experiment_id": exp_id, "summary_run_id": summary_id}
    return SweepResult(sweep_name=t.sweep_name, trials=rows, best=best, **on_disk, **in_mlflow)


def _print_results(t: TuneConfig, rows: list[dict[str, Any]], counts: dict[str, int], md_text: str, wall_s: float):
    log.info(
        f"\n[tune] sweep {t.sweep_name}: {len(rows)} trials, {counts['completed']} completed, "
        f"{counts['stopped']} stopped early, {counts['error']} failed"
        + (f", {counts['unfinished']} unfinished" if counts["unfinished"] else "")
        + f" ({wall_s:.0f} s)\n{md_text}",
    )
    for r in rows:
        if r["status"] == "error":
            log.warning(f"[tune] trial {r['trial']} failed: {r['error']}")


def _print_where(
    t: TuneConfig,
    best: dict[str, Any] | None,
    best_path: str | None,
    uri: str | None,
    exp_id: str | None,
    summary_id: str | None,
) -> None:
    """The best trial, its config file, and where the sweep is in MLflow."""
    if best is not None:
        show_result(f"[tune] best trial: {best['trial']} ({t.metric} {best[t.metric]:.4f}); config: {best_path}")
    if uri:
        from linearard_ray.tracking import run_url

        where = run_url(uri, exp_id, summary_id) if summary_id else uri
        show_result(f"[tune] MLflow experiment {t.sweep_name!r}: {where}")


# --------------------------------------------------------------------------- MLflow


def _log_mlflow(cfg, specs, plan, rows, best, uri, exp_id, session, files, counts, wall_s) -> str:
    """Complete each trial's MLflow run and log the summary run; returns the summary run's id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    _complete_trial_runs(client, exp_id, session, specs, plan, rows)
    return _log_summary_run(cfg, plan, rows, best, uri, exp_id, session, files, counts, wall_s)


def _complete_trial_runs(client, exp_id: str, session: str, specs: list[ParamSpec], plan: dict, rows) -> None:
    """Add each trial's status, name and config to its MLflow run (among the runs this invocation of
    the sweep wrote, tagged with its ``session`` id), and the run's id to its row."""
    from linearard_ray import tracking

    runs = client.search_runs([exp_id], filter_string=f"tags.`{SESSION_TAG}` = '{session}'", max_results=10000)
    by_name = {r.data.tags.get("trial_name"): r.info.run_id for r in runs}
    for row in rows:
        rid = by_name.get(row["trial"])
        row["mlflow_run_id"] = rid
        if rid is None:
            continue
        params = {s.key: row[s.key] for s in specs}
        # Written straight through the client: the trial's run is already closed by the callback.
        client.set_tag(rid, "linearard.trial.status", row["status"])
        client.set_tag(rid, tracking.RUN_NAME_TAG, row["trial"])
        client.log_text(rid, dump_config(apply_params(plan["base"], params)), "config.yaml")


def _log_summary_run(cfg, plan, rows, best, uri, exp_id, session, files, counts, wall_s) -> str:
    """The sweep's summary run: the tune settings, counts of trials by status, the best objective,
    and the result files as artifacts."""
    import tempfile

    from linearard_ray import tracking

    t = cfg.tune
    run_id = tracking.create_run(
        uri,
        exp_id,
        f"{t.sweep_name}-summary",
        tags={SWEEP_TAG: t.sweep_name, ROLE_TAG: "summary", SESSION_TAG: session},
    )
    lg = tracking.RunLogger(uri, run_id)
    lg.log_params({f"tune.{k}": v for k, v in t.model_dump(mode="json").items() if k != "space"})
    lg.log_params(
        {
            "tune.space": json.dumps(t.space),
            "best_trial": best["trial"] if best else None,
            "sweep_dir": plan["sweep_dir"],
        }
    )
    metrics = {
        "trials": len(rows),
        "trials_completed": counts["completed"],
        "trials_stopped": counts["stopped"],
        "trials_failed": counts["error"],
        "trials_unfinished": counts["unfinished"],
        "wall_time_s": wall_s,
    }
    if best is not None:
        metrics[f"best_{t.metric}"] = best[t.metric]
    lg.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory(prefix="linearard_sweep_") as tmp:
        for name, path in files.items():
            data = read_bytes(path)
            (Path(tmp) / name).write_bytes(data)
            lg.log_artifact(Path(tmp) / name)
    lg.log_text(dump_config(cfg), "sweep_config.yaml")
    lg.finish("FINISHED")
    return run_id


def read_bytes(path: str) -> bytes:
    fs, p = fs_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read()
