"""The report's files (``report.json``, ``report.md`` with its plots) and its MLflow run, which
links the evaluated students' training runs (``students``)."""

from __future__ import annotations

import json
from pathlib import Path

from linearard_ray.evaluation.markdown import render_markdown
from linearard_ray.evaluation.plots import plot_passkey, plot_passkey_summary, plot_ppl_vs_length, plot_unseen
from linearard_ray.evaluation.report import clean_json, flat_metrics, safe_name
from linearard_ray.evaluation.students import link_students_in_mlflow


def write_json(report: dict, path: Path) -> Path:
    """The report as strict JSON (NaN and infinities become null)."""
    path.write_text(json.dumps(clean_json(report), indent=2, ensure_ascii=False, allow_nan=False))
    return path


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """report.json, report.md, ppl_vs_length.png, unseen_recovery.png (held-out genres in
    eval.domains), passkey_summary.png and passkey_<model>.png; the report lists its plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ppl_plot = out_dir / "ppl_vs_length.png"
    if any(by_len for by_model in report["nll"].values() for by_len in by_model.values()):
        plots = [plot_ppl_vs_length(report, ppl_plot)]
    else:
        # A passkey-only evaluation has no perplexity to draw; an earlier run's figure in the same
        # directory would otherwise pass for this report's.
        ppl_plot.unlink(missing_ok=True)
        plots = []
    if report.get("unseen_recovery"):
        plots.append(plot_unseen(report, out_dir / "unseen_recovery.png"))
    if report["passkey"]:
        plots.append(plot_passkey_summary(report, out_dir / "passkey_summary.png"))
    for n in report["passkey"]:
        plots.append(plot_passkey(report, n, out_dir / f"passkey_{safe_name(n)}.png"))
    report["plots"] = [p.name for p in plots]
    md = out_dir / "report.md"
    md.write_text(
        render_markdown(report) + "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    )
    return [write_json(report, out_dir / "report.json"), md, *plots]


def log_mlflow(cfg, report: dict, out_dir: Path) -> dict:
    """One MLflow run with the config, every figure as a metric (perplexity also as a curve over
    length: metric <domain>.<model>.ppl with step = length) and the report files as artifacts."""
    from linearard_ray.config import flatten
    from linearard_ray.tracking import RunLogger, create_run, ensure_experiment

    uri = cfg.tracking.resolved_uri()
    exp = ensure_experiment(uri, cfg.tracking.experiment)
    names = "+".join(m["name"] for m in report["models"])
    run_id = create_run(uri, exp, f"eval-{names}", tags={"linearard.stage": "evaluate"})
    log = RunLogger(uri, run_id)
    try:
        params = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] in ("model", "rope", "eval")}
        log.log_params(params)
        log.log_metrics(flat_metrics(report), step=0)
        for dom, by_model in report["nll"].items():
            for n, by_len in by_model.items():
                for L, v in by_len.items():
                    log.log_metrics({f"{dom}.{safe_name(n)}.ppl": v["ppl"]}, step=int(L))
        log.log_artifact(out_dir, "eval")
        link_students_in_mlflow(report, log)
        log.finish("FINISHED")
    except Exception:
        log.finish("FAILED")
        raise
    return {"tracking_uri": uri, "experiment_id": exp, "run_id": run_id}
