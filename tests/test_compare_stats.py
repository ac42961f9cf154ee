"""Paired bootstrap intervals: coverage of a known mean, pairing, verdicts, bad input."""

from __future__ import annotations

import random

import pytest

from sinkcache.compare.stats import bootstrap_mean, paired_difference, verdict


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
