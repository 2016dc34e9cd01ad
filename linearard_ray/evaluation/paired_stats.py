"""How sure a comparison between two models is. Every model of an evaluation sees the same inputs
(same seed: the same perplexity windows, the same passkey prompts), so two models are compared
input by input rather than by their averages alone.

- Passkey: the prompts only one of the two gets right decide; an exact sign test on those
  (McNemar's test) says how likely a split at least that uneven is when neither model is better.
  A model's own accuracy gets a Wilson 95% interval, which stays inside [0, 1] and is honest at 0
  or n correct. Where every model ranks the true key first, the key's own log-probability, paired
  prompt by prompt with a sign test, still orders them.
- Perplexity: the per-window NLL differences; an exact sign-flip permutation test on their mean
  says how likely a mean difference at least that large is when the two are exchangeable. With
  the usual 6-8 windows of a long-context length, the smallest p it can give is 2/2^n (0.008 at 8).
- A recipe trained several times (seeds) against a baseline: each input's figure is averaged over
  each side's trainings first, then the same sign-flip test runs on the per-input differences. The
  inputs, not the (training, input) pairs, are the independent draws: the hard prompts are hard for
  every seed, so pooling the pairs would overstate how sure the comparison is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (95% by default); None without trials."""
    if n <= 0:
        return None
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: {correct} correct of {n} trials")
    ci = stats.binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided p-value of ``wins`` against ``losses`` when each is equally likely (McNemar's
    exact test on the discordant pairs); 1.0 when there are none."""
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def _keyed(trials: Mapping[Any, Iterable[dict]], field: str = "correct", cast=bool) -> dict[tuple, Any]:
    """(length, depth, key, repeat) -> cast(trial[field]); the repeat count keeps two trials that drew
    the same key at the same depth apart."""
    seen: Counter = Counter()
    out = {}
    for length, rows in trials.items():
        for t in rows:
            k = (length, float(t["depth"]), str(t["key"]))
            out[(*k, seen[k])] = cast(t[field])
            seen[k] += 1
    return out


def paired_comparison(
    model: Mapping[Any, Iterable[dict]], baseline: Mapping[Any, Iterable[dict]], field: str = "correct"
) -> dict | None:
    """Compare two models on the prompts both answered. Each side maps a prompt length to its trials
    (dicts with depth, key and ``field``: "correct" for the greedy answer, "choice_correct" for the
    forced choice), as evaluate.py's passkey jobs and report give them. Returns wins (model right,
    baseline wrong), losses, ties, the prompts paired and the sign-test p-value; None when no prompt
    is shared (different seeds or lengths)."""
    a, b = _keyed(model, field), _keyed(baseline, field)
    shared = a.keys() & b.keys()
    if not shared:
        return None
    wins = sum(1 for k in shared if a[k] and not b[k])
    losses = sum(1 for k in shared if b[k] and not a[k])
    return {
        "paired": len(shared),
        "wins": wins,
        "losses": losses,
        "ties": len(shared) - wins - losses,
        "p_value": sign_test_p(wins, losses),
    }


def paired_logprob(
    model: Mapping[Any, Iterable[dict]], baseline: Mapping[Any, Iterable[dict]], field: str = "key_logprob"
) -> dict | None:
    """Compare the true key's log-probability (teacher-forced after the question) prompt by prompt.

    Accuracy saturates once every candidate key but the true one is far less likely; the
    log-probability keeps ranking models after that. Returns the prompts paired, how many the model
    gives the key a higher / lower log-probability than the baseline, the mean difference (model −
    baseline, nats) and the sign-test p of higher against lower; None when no prompt is shared."""
    a, b = _keyed(model, field, float), _keyed(baseline, field, float)
    shared = sorted(a.keys() & b.keys())
    if not shared:
        return None
    diff = [a[k] - b[k] for k in shared]
    higher, lower = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
    return {
        "paired": len(shared),
        "higher": higher,
        "lower": lower,
        "mean_diff": float(np.mean(diff)),
        "p_value": sign_test_p(higher, lower),
    }


def answer_kinds(trials: Iterable[dict]) -> dict[str, int]:
    """How greedy passkey answers went: right, another number (a retrieval error), or no number at
    all (the model answered in words: its wording failed, whatever it retrieved)."""
    out = {"right": 0, "other_number": 0, "no_number": 0}
    for t in trials:
        out["right" if t["correct"] else "no_number" if t.get("answer") is None else "other_number"] += 1
    return out


def paired_windows(
    model: Sequence[float], baseline: Sequence[float], exact_up_to: int = 16, samples: int = 200_000, seed: int = 0
) -> dict | None:
    """Compare two models' per-window mean NLL on the same windows (lower is better). Returns the
    windows, how many the model does better on, the mean difference (model − baseline, nats per
    token) and the two-sided sign-flip permutation p of that mean: exact over all 2^n flips up to
    ``exact_up_to`` windows, else from ``samples`` seeded random flips. None without windows or
    when the two lists differ in length (the windows would not be the same)."""
    if len(model) == 0 or len(model) != len(baseline):
        return None
    d = np.asarray(model, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return {
        "windows": int(d.size),
        "better": int((d < 0).sum()),
        "mean_diff": float(d.mean()),
        "p_value": sign_flip_p(d, exact_up_to, samples, seed),
    }


def sign_flip_p(d: Sequence[float], exact_up_to: int = 16, samples: int = 200_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p of the mean of paired differences ``d``: exact over all 2^n
    flips up to ``exact_up_to`` pairs (or when ``samples`` would cover them all), else from
    ``samples`` seeded random flips."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        raise ValueError("sign_flip_p: no paired differences")
    if d.size == 1:
        return 1.0  # both signs of a lone difference give the same |mean| (scipy wants two or more)
    scale = float(np.abs(d).max())

    def abs_mean(x, axis):
        return _tie_safe(np.abs(np.mean(x, axis=axis)), scale)

    return _permutation_p((d,), abs_mean, "samples", d.size <= exact_up_to, samples, seed)


def _tie_safe(statistic: np.ndarray, scale: float) -> np.ndarray:
    """The statistic on a grid of 1e-12 of the data's scale. scipy counts a permuted statistic as
    tying the observed one within a relative slack only; statistics that are equal but for float
    rounding (a mean of zero left as 1e-17, sums of thirds added in another order) must tie, else the
    observed permutation itself could fail to count."""
    return np.round(statistic / (scale or 1.0), 12)


def _permutation_p(data: tuple, statistic, kind: str, exact: bool, samples: int, seed: int) -> float:
    """scipy's permutation test of a statistic that is already two-sided (an absolute value), so the
    p is the share of permutations at least as large: exact over every permutation when ``exact``,
    else from ``samples`` seeded random ones counting the observed one too (never 0). Batches keep
    the memory of a sampled test with many pairs bounded; they do not change the draws."""
    result = stats.permutation_test(
        data,
        statistic,
        permutation_type=kind,
        vectorized=True,
        n_resamples=np.inf if exact else samples,
        batch=20_000,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def pooled_passkey(
    recipe: Sequence[Mapping[Any, Iterable[dict]]],
    baseline: Sequence[Mapping[Any, Iterable[dict]]],
    field: str = "correct",
) -> dict | None:
    """A recipe's trainings against a baseline's (one or more), prompt by prompt, on the prompts every
    training of both answered. Each side's figure per prompt is its mean over its trainings (the
    share right for "correct" / "choice_correct", the mean for "key_logprob"); higher is better.
    Returns the prompts, each side's mean, the prompts where the recipe is higher / lower, the mean
    difference and the sign-flip p of it over prompts; None when no prompt is shared by all."""
    if not recipe or not baseline:
        return None
    cast = float if field == "key_logprob" else (lambda v: float(bool(v)))
    keyed = [_keyed(t, field, cast) for t in (*recipe, *baseline)]
    shared = sorted(set.intersection(*(set(k) for k in keyed)))
    if not shared:
        return None
    mine = np.array([[k[s] for s in shared] for k in keyed[: len(recipe)]]).mean(axis=0)
    theirs = np.array([[k[s] for s in shared] for k in keyed[len(recipe) :]]).mean(axis=0)
    d = mine - theirs
    return {
        "paired": len(shared),
        "recipe": float(mine.mean()),
        "baseline": float(theirs.mean()),
        "higher": int((d > 0).sum()),
        "lower": int((d < 0).sum()),
        "mean_diff": float(d.mean()),
        "p_value": sign_flip_p(d),
    }


def pooled_windows(recipe: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> dict | None:
    """A recipe's trainings against a baseline's on the same perplexity windows: each window's NLL is
    averaged over each side's trainings, then compared as paired_windows does (lower is better).
    None when a side has no training or the trainings differ in their windows."""
    if not recipe or not baseline or len({len(w) for w in (*recipe, *baseline)}) != 1:
        return None
    return paired_windows(
        np.mean(np.asarray(recipe, dtype=np.float64), axis=0), np.mean(np.asarray(baseline, dtype=np.float64), axis=0)
    )


def trainings_permutation_p(
    recipe: Sequence[float],
    baseline: Sequence[float],
    exact_up_to: int = 200_000,
    samples: int = 200_000,
    seed: int = 0,
) -> float:
    """Two-sided permutation p of the difference in means between a recipe's trainings and a
    baseline's (one figure per training, e.g. its perplexity at 32K): over every way of choosing
    which len(recipe) of the pooled trainings are the recipe's while there are at most
    ``exact_up_to`` such splits, else over ``samples`` seeded random ones. Here the trainings are the
    draws, so it says whether the recipe's edge survives the spread from one training to the next
    (the window tests say whether it survives the evaluation text)."""
    a, b = np.asarray(recipe, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"trainings_permutation_p: need trainings on both sides (got {a.size} and {b.size})")
    scale = float(np.abs(np.concatenate([a, b])).max())

    def abs_mean_diff(x, y, axis):
        return _tie_safe(np.abs(np.mean(x, axis=axis) - np.mean(y, axis=axis)), scale)

    if min(a.size, b.size) == 1:
        return _lone_training_p(a, b)
    exact = math.comb(a.size + b.size, a.size) <= exact_up_to
    return _permutation_p((a, b), abs_mean_diff, "independent", exact, samples, seed)


def _lone_training_p(a: np.ndarray, b: np.ndarray) -> float:
    """trainings_permutation_p when a side has one training, which scipy's test does not take: the
    splits are which one of the pooled trainings is that side's, so the p is the share of trainings
    whose distance from the mean of the others is at least the observed one."""
    pooled = np.concatenate([a, b])
    rest = (pooled.sum() - pooled) / (pooled.size - 1)
    scale = float(np.abs(pooled).max())
    distances = _tie_safe(np.abs(pooled - rest), scale)
    return float(np.mean(distances >= _tie_safe(np.abs(a.mean() - b.mean()), scale)))


def recovery_pct(teacher: Sequence[float], model: Sequence[float]) -> float:
    """100 × teacher perplexity ÷ model perplexity from per-window mean NLLs of equal-length windows."""
    return 100.0 * math.exp(float(np.mean(teacher)) - float(np.mean(model)))


def bootstrap_recovery(
    domains: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    samples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict | None:
    """Recovery across domains with percentile bootstrap intervals over windows.

    ``domains`` maps a domain to (teacher's, model's) per-window mean NLL on the same windows. Each
    resample draws every domain's windows with replacement (the same draw for teacher and model:
    the windows are paired), so the interval reflects which windows the evaluation happened to cut.
    Returns each domain's recovery with its interval, the mean over domains with its interval and
    the worst domain (lowest recovery) with its own; None without domains."""
    if not domains:
        return None
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    per_domain, draws = {}, []
    for name in sorted(domains):
        t, m = (np.asarray(x, dtype=np.float64) for x in domains[name])
        if t.size == 0 or t.size != m.size:
            raise ValueError(f"bootstrap_recovery: {name}: {t.size} teacher and {m.size} model windows")
        idx = rng.integers(0, t.size, size=(samples, t.size))
        boot = 100.0 * np.exp(t[idx].mean(axis=1) - m[idx].mean(axis=1))
        draws.append(boot)
        low, high = np.quantile(boot, [alpha, 1 - alpha])
        per_domain[name] = {"recovery_pct": recovery_pct(t, m), "ci": (float(low), float(high)), "windows": t.size}
    mean_draws = np.mean(draws, axis=0)
    worst = min(per_domain, key=lambda k: per_domain[k]["recovery_pct"])
    return {
        "domains": per_domain,
        "mean": {
            "recovery_pct": float(np.mean([d["recovery_pct"] for d in per_domain.values()])),
            "ci": tuple(float(x) for x in np.quantile(mean_draws, [alpha, 1 - alpha])),
        },
        "worst": {"domain": worst, **per_domain[worst]},
        "confidence": confidence,
        "samples": samples,
        "seed": seed,
    }
