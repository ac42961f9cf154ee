"""Paired bootstrap intervals: coverage of a known mean, pairing, verdicts, bad input."""

from __future__ import annotations

import random

import pytest

from sinkcache.compare.stats import Interval, bootstrap_mean, paired_difference, verdict


def test_interval_contains_the_mean_and_shrinks_with_n():
    rng = random.Random(0)
    small = bootstrap_mean([rng.gauss(1.0, 1.0) for _ in range(20)])
    large = bootstrap_mean([rng.gauss(1.0, 1.0) for _ in range(2000)], iters=2000)
    assert small.low < small.mean < small.high
    assert large.low < 1.0 < large.high  # the true mean
    assert (large.high - large.low) < (small.high - small.low) / 3  # ~ 1/sqrt(n)


def test_pairing_resolves_what_unpaired_scores_cannot():
    rng = random.Random(1)
    base = [rng.gauss(0, 5) for _ in range(50)]  # documents differ a lot
    a = base
    b = [x + 0.1 + rng.gauss(0, 0.01) for x in base]  # b is better by 0.1 on every document
    diff = paired_difference(a, b)
    assert diff.excludes_zero() and diff.mean == pytest.approx(0.1, abs=0.01)
    assert verdict(diff, higher_is_better=True) == "win"
    assert verdict(diff, higher_is_better=False) == "loss"
    assert verdict(paired_difference(a, a), higher_is_better=True) == "tie"


def test_same_seed_same_interval():
    v = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert bootstrap_mean(v, seed=3) == bootstrap_mean(v, seed=3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bootstrap_mean([1.0]), "need >= 2"),
        (lambda: bootstrap_mean([1.0, 2.0], level=95), "level=95"),
        (lambda: bootstrap_mean([1.0, 2.0], iters=10), "iters=10"),
        (lambda: bootstrap_mean([1.0, float("nan")]), "NaN"),
        (lambda: paired_difference([1.0, 2.0], [1.0]), "same documents"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_stratified_mean_resamples_within_tasks():
    from sinkcache.compare.stats import stratified_mean

    per_task = {"a": [1.0] * 50, "b": [0.0, 1.0] * 25}
    iv = stratified_mean(per_task, iters=2000)
    assert iv.mean == pytest.approx(0.75) and iv.n == 100
    # task "a" has no variance: the interval is half the width of "b"'s alone
    ib = stratified_mean({"b": per_task["b"]}, iters=2000)
    assert (iv.high - iv.low) == pytest.approx((ib.high - ib.low) / 2, rel=0.2)
    assert stratified_mean({"a": [1.0] * 10}, iters=200).low == 1.0
    with pytest.raises(ValueError, match="no documents"):
        stratified_mean({"a": []})
    with pytest.raises(ValueError, match="NaN"):
        stratified_mean({"a": [1.0, float("nan")]})


def test_ratio_of_sums_is_bits_per_byte_and_pairs():
    from sinkcache.compare.stats import ratio_of_sums

    num, den = [10.0, 20.0, 30.0, 40.0], [10.0, 10.0, 20.0, 20.0]
    iv = ratio_of_sums(num, den, iters=1000)
    assert iv.mean == pytest.approx(100 / 60)  # a ratio of sums, not a mean of ratios (1.625)
    assert iv.low <= iv.mean <= iv.high
    diff = ratio_of_sums([-1.0, -2.0, -1.5, -0.5], den, iters=1000)
    assert diff.high < 0 and diff.excludes_zero()
    with pytest.raises(ValueError, match="paired"):
        ratio_of_sums([1.0], [1.0])


def test_verdict_negligible_interval_is_a_tie():
    # resolved but tiny (float rounding between caches that keep the same tokens): a tie, not a loss
    tiny = Interval(mean=2e-7, low=1e-7, high=3e-7, n=600, level=0.95, iters=2000)
    assert verdict(tiny, higher_is_better=False) == "loss"
    assert verdict(tiny, higher_is_better=False, negligible=1e-4) == "tie"
    real = Interval(mean=0.01, low=0.005, high=0.015, n=600, level=0.95, iters=2000)
    assert verdict(real, higher_is_better=False, negligible=1e-4) == "loss"
    # an interval that reaches past the margin on one side is not negligible
    edge = Interval(mean=5e-5, low=1e-5, high=2e-4, n=600, level=0.95, iters=2000)
    assert verdict(edge, higher_is_better=True, negligible=1e-4) == "win"
    with pytest.raises(ValueError, match="negligible=-1"):
        verdict(real, higher_is_better=True, negligible=-1)
