"""What an evaluation records on the exported students it measured.

A directory exported by training carries ``linearard_student.json`` (``models.card``): the
student's MLflow training run and registered model version. For every evaluated model that has
one, the evaluation

- rewrites the student's model card with its results (``model-index``), and
- logs its headline figures into the student's training run (``report/<figure>``, at the run's
  last step) and as tags on the registered version (``eval.<figure>``), so the registry shows which
  student is best; the evaluation's own run is tagged with the student's run and version.

None of this may fail an evaluation whose report is written: problems are printed and skipped.
"""

from __future__ import annotations

from typing import Any

from linearard_ray.evaluation.report import safe_name
from linearard_ray.evaluation.specs import log_progress

# The figures of a model that tell students apart (the report's flat metric names, model left out).
HEADLINE_PREFIXES = ("ppl_", "recovery_pct_", "gap_closed_pct_")
HEADLINE_FIGURES = ("acc", "choice_acc")  # passkey, over every prompt


def evaluated_students(report: dict) -> list[tuple[dict, Any]]:
    """(model entry, student card record) of every evaluated model exported by this package."""
    from linearard_ray.models.card import read_student_record

    out = []
    for m in report["models"]:
        if m.get("role") in ("teacher", "scaled"):
            continue
        try:
            card = read_student_record(m["path"])
        except OSError:  # a hub id or an unreadable path: not a student exported here
            card = None
        if card is not None:
            out.append((m, card))
    return out


def headline_metrics(report: dict, model: str) -> dict[str, float]:
    """The model's headline figures from the report's flat metrics, named without the model:
    ``main.ppl_2048``, ``main.recovery_pct_512``, ``passkey.acc``, ..."""
    scopes = [*report["nll"], "passkey"]
    out = {}
    for key, value in report.get("metrics", {}).items():
        for scope in scopes:
            prefix = f"{scope}.{safe_name(model)}."
            figure = key[len(prefix) :] if key.startswith(prefix) else ""
            if figure.startswith(HEADLINE_PREFIXES) or figure in HEADLINE_FIGURES:
                out[f"{scope}.{figure}"] = value
    return out


def card_figures(report: dict, model: str) -> list:
    """The model's results as the card's ``model-index`` states them: perplexity at every length,
    restoration at the short lengths, passkey accuracy over every prompt."""
    from linearard_ray.models.card import EvalFigure

    figures = []
    for dom, by_model in report["nll"].items():
        texts = ", ".join(report["domains"].get(dom, {}).get("sources", [])) or dom
        for length, v in by_model.get(model, {}).items():
            figures.append(EvalFigure(dom, texts, "perplexity", v["ppl"], int(length)))
        for length, v in report["restoration"].get(dom, {}).get(model, {}).items():
            if v.get("recovery_pct") is not None:
                figures.append(EvalFigure(dom, texts, "recovery_pct", v["recovery_pct"], int(length)))
    pk = report["passkey"].get(model)
    if pk:
        figures.append(EvalFigure("passkey", "passkey retrieval", "passkey_accuracy", pk["accuracy_overall"]))
    return [f for f in figures if f.value is not None]


def update_student_cards(report: dict, eval_run_id: str | None = None) -> None:
    """Each evaluated student's card rewritten with this evaluation's results."""
    from linearard_ray.models.card import write_model_card

    for m, card in evaluated_students(report):
        card.evaluation = card_figures(report, m["name"])
        card.evaluation_source = {"report_dir": report.get("output_dir"), "mlflow_run_id": eval_run_id}
        try:
            write_model_card(m["path"], card)
        except OSError as e:
            log_progress(f"could not update the model card of {m['path']}: {e}")


def link_students_in_mlflow(report: dict, eval_logger) -> None:
    """Each evaluated student's headline figures into its training run and onto its registered
    version; the evaluation run (`eval_logger`, a ``tracking.RunLogger``) tagged with them."""
    for m, card in evaluated_students(report):
        if not (card.mlflow and card.mlflow.get("run_id")):
            continue
        try:
            _link_one(report, m["name"], card, eval_logger)
        except Exception as e:  # an unreachable or different store: the report stands on its own
            log_progress(f"could not link {m['name']} to its training run {card.mlflow['run_id']}: {e}")


def _link_one(report: dict, model: str, card, eval_logger) -> None:
    from linearard_ray.tracking import log_to_finished_run, set_version_tags

    mlflow = card.mlflow
    uri, run_id = mlflow.get("tracking_uri") or eval_logger.uri, mlflow["run_id"]
    headline = headline_metrics(report, model)
    log_to_finished_run(
        uri,
        run_id,
        {f"report/{k}": v for k, v in headline.items()},
        step=card.steps or 0,
        tags={"evaluation.mlflow_run_id": eval_logger.run_id, "evaluation.report_dir": report.get("output_dir")},
    )
    tags = {f"linearard.student.{safe_name(model)}.run_id": run_id}
    if mlflow.get("registered_model"):
        name, version = mlflow["registered_model"], mlflow["version"]
        set_version_tags(
            uri, name, version, {**{f"eval.{k}": v for k, v in headline.items()}, "eval.run_id": eval_logger.run_id}
        )
        tags[f"linearard.student.{safe_name(model)}.model_version"] = f"{name}/{version}"
    eval_logger.set_tags(tags)
    log_progress(
        f"{model}: headline figures logged to training run {run_id}"
        + (
            f" and registered version {mlflow['registered_model']}/{mlflow['version']}"
            if mlflow.get("registered_model")
            else ""
        )
    )
