"""The metric names a sweep trial reports: what can be the objective (tune.metric), and what the
results table shows next to it."""

from __future__ import annotations

from typing import Any

from linearard_ray.config import HELDOUT_METRICS, domain_metric

METRICS = HELDOUT_METRICS + ("loss",)  # held-out SOTU and the training loss; see objective_metrics
CONTEXT_METRICS = ("nll_gap", "student_nll", "teacher_nll", "long_nll", "loss")  # results-table columns
HIGHER_IS_BETTER = ("recovery_pct",)


def objective_metrics(eval_sources: dict[str, Any] | None = None) -> list[str]:
    """Every name a trial reports that can be ``tune.metric``: the held-out SOTU metrics, the loss,
    and the same metrics of each train.eval_sources domain as ``eval_<name>_<metric>``."""
    return list(METRICS) + [domain_metric(d, m) for d in (eval_sources or {}) for m in HELDOUT_METRICS]


def context_metrics(metric: str, eval_sources: dict[str, Any] | None = None) -> list[str]:
    """Results-table columns next to the objective: held-out SOTU's and the loss, plus each extra
    domain's gap and recovery (a sweep judged on one domain still shows the others)."""
    extra = [domain_metric(d, m) for d in (eval_sources or {}) for m in ("nll_gap", "recovery_pct")]
    return [k for k in list(CONTEXT_METRICS) + extra if k != metric]
