"""Policy objects validate their knobs and name the bad value."""

from __future__ import annotations

import pytest

from sinkcache.policies import EvictPolicy, FullPolicy, HybridPolicy, QuantizePolicy, make_policy


def test_defaults():
    assert make_policy() == QuantizePolicy(bits=4, window=128, group_size=64)
    assert make_policy("full") == FullPolicy()
    assert make_policy("evict", budget=512) == EvictPolicy(budget=512, window=256)
    assert make_policy("hybrid", bits=2, budget=1024, window=128) == HybridPolicy(bits=2, window=128, group_size=64, budget=1024)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="bogus"), "policy='bogus'"),
        (dict(policy="quantize", bits=3), "bits=3"),
        (dict(policy="quantize", bits=-2), "bits=-2"),
        (dict(policy="quantize", window=-1), "window=-1"),
        (dict(policy="quantize", group_size=0), "group_size=0"),
        (dict(policy="evict", budget=100, window=200), "window=200 exceeds budget=100"),
        (dict(policy="evict", budget=-5), "budget=-5"),
        (dict(policy="evict"), "needs budget"),
        (dict(policy="hybrid", bits=2), "needs budget"),
        (dict(policy="hybrid", bits=2, budget=150, window=128), "budget=150"),
        (dict(policy="full", bits=2), "does not use bits"),
        (dict(policy="quantize", budget=10), "does not use budget"),
        (dict(policy="evict", budget=64, bits=4), "does not use bits"),
        (dict(policy="evict", budget=1.5), "budget=1.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_policy(**kwargs)


def test_policy_object_rejects_loose_knobs():
    with pytest.raises(ValueError, match="inside the policy object"):
        make_policy(QuantizePolicy(), bits=2)
    assert make_policy(QuantizePolicy(bits=2)) == QuantizePolicy(bits=2)


def test_hybrid_capacity_keeps_total_within_budget():
    p = HybridPolicy(bits=2, budget=1024, window=128, group_size=64)
    # Body + the largest window between flushes never exceeds the budget.
    assert p.body_capacity() % 64 == 0
    assert p.body_capacity() + p.window + p.group_size - 1 <= p.budget
