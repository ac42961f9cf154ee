"""Cache layers driven directly: invariants under random update/reorder/crop/select sequences."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import generate, left_pad
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkcache import SinkCache
from sinkcache.context import TokenContext
from sinkcache.layers import EvictingLayer, QuantizedLayer
from sinkcache.policies import EvictPolicy, HybridPolicy, QuantizePolicy
from sinkcache.scores import SCORERS
from sinkcache.sinks import AutoSinks, FirstSinks, NoSinks, PunctSinks

B, H, D = 2, 2, 16

ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 20)),
        st.tuples(st.just("update1"), st.integers(1, 12)),
        st.tuples(st.just("reorder"), st.permutations(range(B))),
        st.tuples(st.just("crop"), st.integers(1, 3)),
    ),
    min_size=1,
    max_size=25,
)


class Reference:
    """All keys/values ever fed, per row, in column order (what a DynamicCache would hold)."""

    def __init__(self):
        self.k = torch.empty(B, H, 0, D)
        self.v = torch.empty(B, H, 0, D)

    def add(self, k, v):
        self.k = torch.cat([self.k, k], 2)
        self.v = torch.cat([self.v, v], 2)


def _run(layer, ref, op, gen):
    kind, arg = op
    if kind in ("update", "update1"):
        n = arg if kind == "update" else 1
        for _ in range(arg if kind == "update1" else 1):
            k = torch.randn(B, H, n, D, generator=gen)
            v = torch.randn(B, H, n, D, generator=gen)
            expected_len, offset = layer.get_mask_sizes(n)
            out_k, out_v = layer.update(k, v)
            ref.add(k, v)
            # get_mask_sizes predicted exactly what update returned; offset maps the new tokens to their columns.
            assert out_k.shape[2] == expected_len and out_v.shape[2] == expected_len
            assert offset + expected_len == layer.get_seq_length()
            # The newest tokens are returned exactly.
            assert torch.equal(out_k[:, :, -n:], k)
    elif kind == "reorder":
        idx = torch.tensor(arg)
        layer.reorder_cache(idx)
        ref.k, ref.v = ref.k[idx], ref.v[idx]
    elif kind == "crop":
        try:
            layer.crop(-arg)
        except ValueError:
            return  # refused: beyond the exact window; the layer must be unchanged (checked by invariants)
        ref.k, ref.v = ref.k[:, :, :-arg], ref.v[:, :, :-arg]


@settings(max_examples=60, deadline=None)
@given(ops=ops, extra=st.integers(1, 30), window=st.integers(0, 8), n_first=st.integers(0, 3), seed=st.integers(0, 999))
def test_evicting_layer_invariants(ops, extra, window, n_first, seed):
    budget = window + n_first + extra  # the smallest budget SinkCache accepts is window + sinks
    gen = torch.Generator().manual_seed(seed)
    sinks = FirstSinks(n_first) if n_first else NoSinks()
    layer = EvictingLayer(EvictPolicy(budget=budget, window=window), sinks, TokenContext(), 0)
    ref = Reference()
    for op in ops:
        _run(layer, ref, op, gen)
        if not layer.is_initialized:
            continue
        layer.compress()
        seen = layer.get_seq_length()
        assert seen == ref.k.shape[2]
        assert layer.held() <= budget
        pos = layer.pos.long()
        # Positions strictly increasing, all from the past, the recent window always held.
        assert torch.all(pos[..., 1:] > pos[..., :-1])
        assert torch.all(pos < seen)
        for c in range(max(0, seen - window), seen):
            assert torch.all((pos == c).any(-1))
        # Sinks are never evicted.
        for c in range(min(n_first, seen)):
            assert torch.all((pos == c).any(-1)), f"sink column {c} was evicted"
        # What is held is exactly what was fed at those columns.
        idx = pos.unsqueeze(-1).expand(-1, -1, -1, D)
        assert torch.equal(layer.keys, ref.k.gather(2, idx))
        assert torch.equal(layer.values, ref.v.gather(2, idx))


@settings(max_examples=60, deadline=None)
@given(
    ops=ops,
    bits=st.sampled_from([2, 4, 8]),
    window=st.integers(0, 10),
    group=st.sampled_from([4, 8]),
    n_first=st.integers(0, 2),
    seed=st.integers(0, 999),
)
def test_quantized_layer_matches_reference(ops, bits, window, group, n_first, seed):
    gen = torch.Generator().manual_seed(seed)
    sinks = FirstSinks(n_first) if n_first else NoSinks()
    layer = QuantizedLayer(QuantizePolicy(bits=bits, window=window, group_size=group), sinks, TokenContext(), 0)
    ref = Reference()
    for op in ops:
        _run(layer, ref, op, gen)
        if not layer.is_initialized:
            continue
        layer.compress()
        seen = layer.get_seq_length()
        assert seen == ref.k.shape[2] == layer.held()
        # Window stays exact; each token is quantized once when it leaves it.
        assert layer.win_k.shape[2] >= min(window, seen)
        assert layer.body_len() % group == 0
        assert layer.k_codes.shape[-1] == D * bits // 8
        if seen == 0:
            continue
        k, v = layer._materialize()
        assert k.shape[2] == seen
        tb = layer.body_len()
        assert torch.equal(k[:, :, tb:], ref.k[:, :, tb:])
        # Sinks come back exactly; everything else within one quantization step of its group.
        for c in range(min(n_first, tb)):
            assert torch.equal(k[:, :, c], ref.k[:, :, c]) and torch.equal(v[:, :, c], ref.v[:, :, c])
        if tb:
            rk = ref.k[:, :, :tb].reshape(B, H, tb // group, group, D)
            step_k = (rk.amax(3) - rk.amin(3)) / ((1 << bits) - 1)
            err_k = (k[:, :, :tb] - ref.k[:, :, :tb]).abs().reshape(B, H, tb // group, group, D)
            assert torch.all(err_k <= step_k.unsqueeze(3) * 0.5 + 1e-4)
            rv = ref.v[:, :, :tb]
            step_v = (rv.amax(-1, keepdim=True) - rv.amin(-1, keepdim=True)) / ((1 << bits) - 1)
            assert torch.all((v[:, :, :tb] - rv).abs() <= step_v * 0.5 + 1e-4)


@settings(max_examples=40, deadline=None)
@given(ops=ops, extra=st.integers(0, 40), n_first=st.integers(0, 2), seed=st.integers(0, 999))
def test_hybrid_layer_stays_within_budget(ops, extra, n_first, seed):
    gen = torch.Generator().manual_seed(seed)
    group, window = 4, 4
    budget = window + 2 * group - 1 + (n_first + 1) * group + extra
    sinks = FirstSinks(n_first) if n_first else NoSinks()
    layer = QuantizedLayer(HybridPolicy(bits=2, window=window, group_size=group, budget=budget), sinks, TokenContext(), 0)
    ref = Reference()
    for op in ops:
        _run(layer, ref, op, gen)
        if not layer.is_initialized:
            continue
        layer.compress()
        assert layer.held() <= budget
        assert layer.get_seq_length() == ref.k.shape[2]
        gid = layer.gid.long()
        assert torch.all(gid[..., 1:] > gid[..., :-1])
        if layer.body_len():
            k, _ = layer._materialize()
            for c in range(min(n_first, layer.body_len())):
                # The sink's group is still held and the sink comes back exactly.
                assert torch.all((gid == c // group).any(-1))
                slot = layer.sink_slot[..., 0] - 1 if c == 0 else None
                if slot is not None:
                    got = k.gather(2, slot.view(B, H, 1, 1).expand(B, H, 1, D)).squeeze(2)
                    assert torch.equal(got, ref.k[:, :, 0])


def test_batch_select_and_repeat_keep_rows_together():
    gen = torch.Generator().manual_seed(0)
    layer = EvictingLayer(EvictPolicy(budget=12, window=4), FirstSinks(1), TokenContext(), 0)
    k = torch.randn(B, H, 30, D, generator=gen)
    layer.update(k, k.clone())
    layer.compress()
    layer.batch_repeat_interleave(3)
    assert layer.keys.shape[0] == B * 3 and layer.pos.shape[0] == B * 3
    assert torch.equal(layer.keys[0], layer.keys[2])
    layer.batch_select_indices(torch.tensor([3, 0]))
    assert layer.keys.shape[0] == 2 and layer.shape[0] == 2
    out, _ = layer.update(torch.zeros(2, H, 1, D), torch.zeros(2, H, 1, D))
    assert out.shape[0] == 2


def test_rejected_update_leaves_no_partial_state():
    layer = QuantizedLayer(QuantizePolicy(bits=4, window=4, group_size=4), FirstSinks(1), TokenContext(), 0)
    layer.update(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    before = (layer.seen, layer.win_k.clone(), layer.k_codes.clone())
    try:
        layer.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))  # wrong head count
    except ValueError as e:
        assert "kv_heads=2" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected ValueError")
    assert layer.seen == before[0] and torch.equal(layer.win_k, before[1]) and torch.equal(layer.k_codes, before[2])


# ---- one column set per layer (pooled scorers) --------------------------------------------------------


def _pooled_run(tiny, score, sinks):
    m = tiny("llama", "eager")
    ids, mask = left_pad([prompt(40, seed=1)[0], prompt(33, seed=2)[0]])
    cache = SinkCache("evict", budget=20, window=4, score=score, sinks=sinks, model=m)
    out = generate(m, ids, cache, 10, mask=mask)
    return cache, out


def _selector(kind):
    # punctuation ids that the seeded prompts contain, capped so that the cap's bookkeeping runs too
    return {"first": "first", "none": "none", "punct": PunctSinks([5, 17, 33, 64], n_first=1, max_sinks=3)}[kind]


@pytest.mark.parametrize("score", ["tova-pooled", "vatp", "tova-span"])
@pytest.mark.parametrize("sinks", ["first", "none", "punct"])
def test_pooled_scorers_keep_one_column_set_while_sinks_are_marked_alike(tiny, score, sinks, monkeypatch):
    cache, out = _pooled_run(tiny, score, _selector(sinks))
    layers = [layer for layer in cache.layers if isinstance(layer, EvictingLayer)]
    assert layers and all(layer.seen > layer.held() for layer in layers)  # something was evicted
    for layer in layers:
        assert not layer.marks_per_head
        assert torch.equal(layer.pos, layer.pos[:, :1].expand_as(layer.pos))
    if sinks == "punct":
        assert any(bool(layer.sink.sum(-1).gt(1).any()) for layer in layers)  # punctuation was kept
    # the plain-mean pool gives what the per-column pool gives: same tokens, same logits
    monkeypatch.setattr(SCORERS[score], "one_set_per_layer", False)
    general, ref = _pooled_run(tiny, score, _selector(sinks))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_per_head_sinks_switch_the_layer_to_the_per_column_pool(tiny):
    cache, _ = _pooled_run(tiny, "tova-pooled", AutoSinks(n_first=1, max_sinks=4))
    layers = [layer for layer in cache.layers if isinstance(layer, EvictingLayer)]
    assert layers and all(layer.marks_per_head for layer in layers)
    cache.reset()
    assert not any(layer.marks_per_head for layer in layers)
