"""The metric names a sweep trial reports: what can be the objective (tune.metric), and what the
results table shows next to it."""

from __future__ import annotations

from typing import Any

from linearard_ray.config import HELDOUT_METRICS, UNSEEN_MEAN, UNSEEN_WORST, domain_metric

METRICS = HELDOUT_METRICS + ("loss",)  # held-out SOTU and the training loss; see objective_metrics
CONTEXT_METRICS = ("nll_gap", "student_nll", "teacher_nll", "long_nll", "loss")  # results-table columns
HIGHER_IS_BETTER = ("recovery_pct",)


def objective_metrics(eval_sources: dict[str, Any] | None = None) -> list[str]:
    """Every name a trial reports that can be ``tune.metric``: the held-out SOTU metrics, the loss,
    the same metrics of each train.eval_sources domain as ``eval_<name>_<metric>`` and, with any
    domain, the mean and worst recovery over them."""
    domains = list(eval_sources or {})
    summary = [UNSEEN_MEAN, UNSEEN_WORST] if domains else []
    return list(METRICS) + [domain_metric(d, m) for d in domains for m in HELDOUT_METRICS] + summary


def context_metrics(metric: str, eval_sources: dict[str, Any] | None = None) -> list[str]:
    """Results-table columns next to the objective: held-out SOTU's and the loss, plus each extra
    domain's gap and recovery (a sweep judged on one domain still shows the others)."""
    extra = [domain_metric(d, m) for d in (eval_sources or {}) for m in ("nll_gap", "recovery_pct")]
    extra += [UNSEEN_MEAN, UNSEEN_WORST] if eval_sources else []
    return [k for k in list(CONTEXT_METRICS) + extra if k != metric]
