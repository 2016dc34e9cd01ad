"""Passkey statistics against independent computations: the Wilson interval as the set of
proportions its score test accepts (found by bisection), the sign test by summing the exact
binomial law over every outcome at least as uneven, the permutation tests by walking every sign flip
or split (or, past that, by counting sign patterns of integer sums), and paired counts by a direct
walk."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from linearard_ray.evaluation.paired_stats import (
    answer_kinds,
    paired_comparison,
    paired_logprob,
    paired_windows,
    pooled_passkey,
    pooled_windows,
    sign_flip_p,
    sign_test_p,
    wilson_interval,
)

Z95 = 1.959963984540054


def _score_accepts(p: float, k: int, n: int) -> bool:
    return (k / n - p) ** 2 <= Z95**2 * p * (1 - p) / n


def _edge(k: int, n: int, lo: float, hi: float, inside_at_hi: bool) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        if _score_accepts(mid, k, n) == inside_at_hi:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("seed", range(5))
def test_wilson_interval_is_the_score_tests_acceptance_set(seed):
    rng = random.Random(seed)
    for _ in range(20):
        n = rng.randint(1, 120)
        k = rng.randint(0, n)
        lo, hi = wilson_interval(k, n)
        p_hat = k / n
        want_lo = 0.0 if k == 0 else _edge(k, n, 0.0, p_hat, inside_at_hi=True)
        want_hi = 1.0 if k == n else _edge(k, n, p_hat, 1.0, inside_at_hi=False)
        assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)
        assert lo <= p_hat <= hi
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="7 correct of 5"):
        wilson_interval(7, 5)


def test_sign_test_sums_the_binomial_law_over_outcomes_as_uneven():
    rng = random.Random(3)
    for _ in range(40):
        wins, losses = rng.randint(0, 30), rng.randint(0, 30)
        n = wins + losses
        if n == 0:
            continue
        dev = abs(wins - n / 2)
        want = sum(Fraction(math.comb(n, i), 2**n) for i in range(n + 1) if abs(i - n / 2) >= dev)
        assert sign_test_p(wins, losses) == pytest.approx(float(want), rel=1e-12)
    assert sign_test_p(9, 1) == pytest.approx(22 / 1024)
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(4, 4) == 1.0


def _by_length(trials: list[dict]) -> dict[int, list[dict]]:
    """The shape evaluate.py's passkey jobs give: prompt length -> its trials, in order."""
    out: dict[int, list[dict]] = {}
    for t in trials:
        out.setdefault(t["length"], []).append(t)
    return out


def test_paired_comparison_counts_prompt_by_prompt():
    rng = random.Random(7)
    prompts = [(L, d, f"{rng.randrange(10**5):05d}") for L in (512, 1024) for d in (0.1, 0.5, 0.9) for _ in range(6)]
    prompts += [prompts[0]]  # the same key drawn twice at one depth stays two prompts
    a = [{"length": L, "depth": d, "key": k, "correct": rng.random() < 0.6} for L, d, k in prompts]
    b = [{"length": L, "depth": d, "key": k, "correct": rng.random() < 0.4} for L, d, k in prompts]
    got = paired_comparison(
        _by_length(a), _by_length(list(reversed(b[:-1])) + [b[-1]])
    )  # order within a key group is what pairs
    wins = sum(x["correct"] and not y["correct"] for x, y in zip(a, b, strict=False))
    losses = sum(y["correct"] and not x["correct"] for x, y in zip(a, b, strict=False))
    assert got == {
        "paired": len(prompts),
        "wins": wins,
        "losses": losses,
        "ties": len(prompts) - wins - losses,
        "p_value": sign_test_p(wins, losses),
    }
    # only the shared prompts count; none shared means no comparison
    half = paired_comparison(_by_length(a[:10]), _by_length(b))
    assert half["paired"] == 10
    other_seed = [dict(x, key=str(int(x["key"]) + 1)) for x in b]
    assert paired_comparison(_by_length(a), _by_length(other_seed)) is None


def test_paired_logprob_orders_models_that_both_rank_the_key_first():
    """Both models pick the true key on every prompt (forced-choice accuracy 1.0 each), yet one gives
    it more probability on most prompts: the paired log-probability tells them apart."""
    rng = random.Random(3)
    prompts = [(L, d, f"{rng.randrange(10**5):05d}") for L in (512, 1024) for d in (0.1, 0.9) for _ in range(8)]
    base = [
        {"length": L, "depth": d, "key": k, "choice_correct": True, "key_logprob": -rng.uniform(2, 6)}
        for L, d, k in prompts
    ]
    better = [dict(t, key_logprob=t["key_logprob"] + rng.uniform(-0.2, 1.0)) for t in base]
    assert paired_comparison(_by_length(better), _by_length(base), field="choice_correct")["p_value"] == 1.0
    got = paired_logprob(_by_length(better), _by_length(base))
    diffs = [x["key_logprob"] - y["key_logprob"] for x, y in zip(better, base, strict=False)]
    higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    assert got == pytest.approx(
        {
            "paired": len(prompts),
            "higher": higher,
            "lower": lower,
            "mean_diff": sum(diffs) / len(diffs),
            "p_value": sign_test_p(higher, lower),
        }
    )
    assert higher > lower and got["p_value"] < 0.05
    other_seed = [dict(x, key=str(int(x["key"]) + 1)) for x in base]
    assert paired_logprob(_by_length(better), _by_length(other_seed)) is None


def test_answer_kinds_tell_a_miss_in_words_from_a_wrong_number():
    trials = [
        {"correct": True, "answer": "12345"},
        {"correct": False, "answer": "1234"},
        {"correct": False, "answer": None},
        {"correct": False, "answer": None},
    ]
    assert answer_kinds(trials) == {"right": 1, "other_number": 1, "no_number": 2}


def test_paired_windows_against_every_sign_flip():
    import itertools

    rng = random.Random(11)
    for n in (1, 2, 5, 8, 11):
        base = [rng.uniform(2.5, 3.5) for _ in range(n)]
        model = [b + rng.gauss(-0.02, 0.05) for b in base]
        d = [m - b for m, b in zip(model, base, strict=False)]
        obs = abs(sum(d) / n)
        flips = [
            abs(sum(s * x for s, x in zip(signs, d, strict=False)) / n)
            for signs in itertools.product((1, -1), repeat=n)
        ]
        want = sum(f >= obs - 1e-12 for f in flips) / len(flips)
        got = paired_windows(model, base)
        assert got["windows"] == n and got["better"] == sum(x < 0 for x in d)
        assert got["mean_diff"] == pytest.approx(sum(d) / n, abs=1e-12)
        assert got["p_value"] == pytest.approx(want, abs=1e-12)
    # all 8 windows better: the smallest p eight windows can give
    assert paired_windows([1.0 + i for i in range(8)], [1.5 + i for i in range(8)])["p_value"] == pytest.approx(2 / 256)
    # past the exact limit: seeded random flips agree with the exact figure
    base = [rng.uniform(2.5, 3.5) for _ in range(12)]
    model = [b + rng.gauss(-0.01, 0.05) for b in base]
    exact = paired_windows(model, base)["p_value"]
    assert paired_windows(model, base, exact_up_to=4, samples=100_000)["p_value"] == pytest.approx(exact, abs=0.01)
    assert paired_windows([], []) is None and paired_windows([1.0, 2.0], [1.0]) is None
    assert paired_windows([1.0, 2.0, 3.0], [1.0, 2.0]) is None
    # past the default exact limit (16 windows) the seeded sampler answers, and stays in [0, 1]
    big = paired_windows([3.0 + 0.01 * i for i in range(24)], [3.0] * 24)
    assert big["better"] == 0 and 0 < big["p_value"] < 1e-3


def _trials(rng: random.Random, lengths=(8192, 16384), depths=(0.25, 0.75), keys=("4821", "903")) -> dict:
    return {
        L: [
            {
                "depth": d,
                "key": k,
                "correct": rng.random() < 0.5,
                "choice_correct": rng.random() < 0.8,
                "key_logprob": rng.uniform(-8, -0.5),
            }
            for d in depths
            for k in keys
        ]
        for L in lengths
    }


@pytest.mark.parametrize("field", ["correct", "choice_correct", "key_logprob"])
def test_pooled_passkey_averages_each_prompt_over_trainings_before_the_flip_test(field):
    import itertools

    rng = random.Random(hash(field) % 1000)
    recipe = [_trials(rng) for _ in range(3)]
    baseline = [_trials(rng) for _ in range(2)]
    prompts = [(L, i) for L in (8192, 16384) for i in range(4)]

    def side(ts):
        return [sum(float(t[L][i][field]) for t in ts) / len(ts) for L, i in prompts]

    mine, theirs = side(recipe), side(baseline)
    d = [a - b for a, b in zip(mine, theirs, strict=False)]
    obs = abs(sum(d) / len(d))
    flips = [
        abs(sum(s * x for s, x in zip(signs, d, strict=False)) / len(d))
        for signs in itertools.product((1, -1), repeat=len(d))
    ]
    got = pooled_passkey(recipe, baseline, field=field)
    assert got["paired"] == 8
    assert got["recipe"] == pytest.approx(sum(mine) / 8) and got["baseline"] == pytest.approx(sum(theirs) / 8)
    assert got["higher"] == sum(x > 0 for x in d) and got["lower"] == sum(x < 0 for x in d)
    assert got["mean_diff"] == pytest.approx(sum(d) / 8)
    assert got["p_value"] == pytest.approx(sum(f >= obs - 1e-12 for f in flips) / len(flips), abs=1e-12)


def test_pooled_passkey_keeps_only_prompts_every_training_answered():
    rng = random.Random(5)
    recipe = [_trials(rng), _trials(rng, lengths=(8192,))]  # the second training never reached 16K
    baseline = [_trials(rng)]
    got = pooled_passkey(recipe, baseline)
    assert got["paired"] == 4
    want = [
        (recipe[0][8192][i]["correct"] + recipe[1][8192][i]["correct"]) / 2 - baseline[0][8192][i]["correct"]
        for i in range(4)
    ]
    assert got["mean_diff"] == pytest.approx(sum(want) / 4)
    assert pooled_passkey([], baseline) is None and pooled_passkey(recipe, []) is None
    assert pooled_passkey([_trials(rng, keys=("111",))], [_trials(rng, keys=("222",))]) is None


def test_pooled_windows_compares_the_window_means_of_each_side():
    rng = random.Random(9)
    recipe = [[rng.uniform(2.9, 3.1) for _ in range(6)] for _ in range(4)]
    baseline = [[rng.uniform(2.9, 3.1) for _ in range(6)] for _ in range(2)]
    mine = [sum(t[w] for t in recipe) / 4 for w in range(6)]
    theirs = [sum(t[w] for t in baseline) / 2 for w in range(6)]
    got = pooled_windows(recipe, baseline)
    want = paired_windows(mine, theirs)
    assert got["windows"] == 6 and got["better"] == want["better"]
    assert got["mean_diff"] == pytest.approx(want["mean_diff"]) and got["p_value"] == pytest.approx(want["p_value"])
    assert pooled_windows(recipe, [[3.0] * 5]) is None and pooled_windows([], baseline) is None


def test_trainings_permutation_p_counts_every_split_of_the_pooled_trainings():
    import itertools

    from linearard_ray.evaluation.paired_stats import trainings_permutation_p

    rng = random.Random(17)
    for k, m in ((2, 3), (4, 7), (3, 3), (1, 5)):
        a = [rng.uniform(20.4, 20.7) for _ in range(k)]
        b = [rng.uniform(20.55, 20.7) for _ in range(m)]
        pooled = a + b
        obs = abs(sum(a) / k - sum(b) / m)
        # every labelling of the pooled trainings with exactly k recipe labels
        hits = splits = 0
        for labels in itertools.product((0, 1), repeat=k + m):
            if sum(labels) != k:
                continue
            x = [v for v, t in zip(pooled, labels, strict=False) if t]
            y = [v for v, t in zip(pooled, labels, strict=False) if not t]
            hits += abs(sum(x) / k - sum(y) / m) >= obs - 1e-12
            splits += 1
        assert splits == math.comb(k + m, k)
        assert trainings_permutation_p(a, b) == pytest.approx(hits / splits, abs=1e-12)
    # four trainings below seven tightly spread ones: only the observed split is as extreme
    assert trainings_permutation_p([1.0, 1.1, 1.2, 1.3], [2.0, 2.01, 2.02, 2.03, 2.04, 2.05, 2.06]) == pytest.approx(
        1 / math.comb(11, 4)
    )
    # past the exact limit: seeded random splits agree with the exact figure
    a, b = [rng.uniform(20.4, 20.7) for _ in range(6)], [rng.uniform(20.5, 20.7) for _ in range(7)]
    assert trainings_permutation_p(a, b, exact_up_to=100, samples=100_000) == pytest.approx(
        trainings_permutation_p(a, b), abs=0.01
    )
    with pytest.raises(ValueError, match="both sides"):
        trainings_permutation_p([], [1.0])


def _exact_flip_p_in_thirds(m: list[int]) -> Fraction:
    """Exact two-sided sign-flip p for differences m_i / 3: the flipped sums are integers (in
    thirds), so their law is a count of sign patterns per sum, built one difference at a time."""
    counts = {0: 1}
    for v in m:
        nxt: dict[int, int] = {}
        for total, c in counts.items():
            for s in (total + v, total - v):
                nxt[s] = nxt.get(s, 0) + c
        counts = nxt
    observed = abs(sum(m))
    return Fraction(sum(c for total, c in counts.items() if abs(total) >= observed), 2 ** len(m))


def test_sampled_sign_flips_estimate_the_exact_law_of_thirds():
    """Past the exact limit (40 prompts, shares right over three trainings against one baseline), the
    seeded random flips estimate the exact p within a few standard errors."""
    rng = random.Random(23)
    for _ in range(3):
        m = [rng.choice([-3, -2, -1, 0, 0, 1, 1, 2, 3]) for _ in range(40)]
        want = float(_exact_flip_p_in_thirds(m))
        got = sign_flip_p([v / 3 for v in m], samples=100_000, seed=rng.randrange(100))
        standard_error = math.sqrt(max(want * (1 - want), 1e-5) / 100_000)
        assert abs(got - want) <= 5 * standard_error, (m, got, want)


def test_differences_that_cancel_but_for_rounding_give_p_one():
    """Thirds that sum to zero leave a float mean of a few 1e-17; the observed flip (and every flip
    that ties it) must still count, exact or sampled."""
    thirds = [1 / 3, 1 / 3, 1 / 3, -1.0, 2 / 3, -1 / 3, -1 / 3]
    assert sign_flip_p(thirds) == 1.0
    assert sign_flip_p(thirds * 4, samples=2_000) == 1.0
    assert sign_flip_p([0.0] * 5) == 1.0 and sign_flip_p([0.3]) == 1.0
    with pytest.raises(ValueError, match="no paired differences"):
        sign_flip_p([])
