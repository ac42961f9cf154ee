"""Helpers for the generation tests: deterministic generate, left padding, invariant checks.

Kept out of ``conftest.py`` (owned elsewhere); import with ``from helpers import ...``.
"""

from __future__ import annotations

import torch
from conftest import _build
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicSlidingWindowLayer

from sinkcache import SinkCache
from sinkcache.layers import CompressingLayer, EvictingLayer, QuantizedLayer
from sinkcache.policies import HybridPolicy


def generate(model, ids, cache, n: int, mask=None, **kw):
    """``model.generate`` with scores and raw logits, and with EOS disabled so that every row yields exactly ``n`` tokens.

    The tiny random models emit EOS (id 2) now and then; a finished row would then be padded in a batch
    but stop early alone, which makes row-by-row comparisons meaningless.
    """
    kw.setdefault("do_sample", False)
    return model.generate(
        ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=n,
        eos_token_id=None,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


def max_diff(scores_a, scores_b) -> float:
    """Largest absolute difference between two lists of per-step score tensors."""
    assert len(scores_a) == len(scores_b)
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(scores_a, scores_b, strict=True))


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into ``(ids, attention_mask)``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    return ids, mask


_UNTIED: dict = {}


def untied(tiny, arch: str, attn: str = "eager", dtype=torch.float32):
    """The tiny model, with random q_norm/k_norm weights where the architecture has them (Qwen 3, Gemma 3).

    With freshly initialised q/k norms every key has the same L2 norm (``sqrt(head_dim)``), so the
    eviction score (negative key norm) ties to ~1e-6 and which token is evicted is decided by float
    noise. Tests that compare runs with *different batch compositions* (a row alone vs. in a batch)
    would then compare noise. Random norm weights (as trained models have) make the scores distinct.
    Built fresh (not deep-copied) so no cache hooks from other tests come along.
    """
    model = tiny(arch, attn, dtype)
    if not any(n.endswith(("k_norm.weight", "q_norm.weight")) for n, _ in model.named_parameters()):
        return model
    key = (arch, attn, dtype)
    if key not in _UNTIED:
        m = _build(arch, attn, torch.float32)
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("k_norm.weight", "q_norm.weight")):
                    p.copy_(p + torch.empty(p.shape).uniform_(-0.5, 0.5, generator=g))
        _UNTIED[key] = m.to(dtype).eval()
    return _UNTIED[key]


class Probe(StoppingCriteria):
    """Checks cache invariants after every forward of ``generate`` (never stops generation).

    At each call the newest token is not in the cache yet, so ``get_seq_length() == len - 1``; what
    attention will see at the next forward (``held_after_compress``) must fit the budget.
    """

    def __init__(self, cache) -> None:
        self.cache = cache
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        cache = self.cache
        assert cache.get_seq_length() == input_ids.shape[-1] - 1, (cache.get_seq_length(), input_ids.shape)
        for i, layer in enumerate(cache.layers):
            budget = _budget(layer)
            if budget is not None:
                assert layer.held_after_compress() <= budget, (i, layer.held_after_compress(), budget)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def probed(cache) -> tuple[Probe, StoppingCriteriaList]:
    p = Probe(cache)
    return p, StoppingCriteriaList([p])


def _budget(layer) -> int | None:
    if isinstance(layer, EvictingLayer):
        return layer.policy.budget
    if isinstance(layer, QuantizedLayer) and isinstance(layer.policy, HybridPolicy):
        return layer.policy.budget
    return None


def check_invariants(cache: SinkCache, seen: int) -> None:
    """Structural invariants of a SinkCache after generation, checked after ``cache.compress()``.

    * every layer (sliding ones included) counts ``seen`` tokens;
    * sliding layers are transformers' own ``DynamicSlidingWindowLayer``, holding the usual window;
    * evicting layers hold exactly ``min(seen, budget)`` tokens, in strictly increasing column order,
      including the protected recent window and the first ``n_first`` real tokens of every row;
    * quantized layers: body in whole groups, in column order, before the window; the window holds
      ``window .. window + group - 1`` tokens; ``quantize`` drops nothing, ``hybrid`` stays in budget;
      the first ``n_first`` real tokens of every row are exact sinks (or still in the window).
    """
    cache.compress()
    assert cache.get_seq_length() == seen
    sel = cache.sink_selector
    k = sel.n_first if sel.name != "none" else 0
    for i, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == seen, (i, layer.get_seq_length(), seen)
        if getattr(layer, "is_sliding", False):
            assert type(layer) is DynamicSlidingWindowLayer, (i, type(layer))
            assert layer.keys.shape[-2] == min(seen, layer.sliding_window - 1), (i, layer.keys.shape)
            continue
        if not isinstance(layer, CompressingLayer):
            assert layer.keys.shape[-2] == seen
            continue
        b = layer.shape[0]
        pad = cache.ctx.pad_counts(b, torch.device("cpu")).tolist()
        if isinstance(layer, EvictingLayer):
            _check_evicting(i, layer, seen, k, pad)
        else:
            _check_quantized(i, layer, seen, k, pad)


def _first_cols(pad: list[int], k: int, seen: int) -> list[list[int]]:
    return [list(range(p, min(p + k, seen))) for p in pad]


def _check_evicting(i: int, layer: EvictingLayer, seen: int, k: int, pad: list[int]) -> None:
    pol = layer.policy
    t = layer.held()
    assert t == min(seen, pol.budget), (i, t, seen, pol.budget)
    for name in ("keys", "values"):
        assert getattr(layer, name).shape[2] == t
    for name in ("pos", "score", "sink"):
        assert getattr(layer, name).shape[-1] == t
    pos = layer.pos.long()
    assert bool((pos[..., 1:] > pos[..., :-1]).all()), f"layer {i}: positions not strictly increasing"
    assert bool((pos >= 0).all()) and bool((pos < seen).all())
    w = min(pol.window, seen)
    if w:
        tail = torch.arange(seen - w, seen).expand_as(pos[..., -w:])
        assert torch.equal(pos[..., -w:], tail), f"layer {i}: the recent window was evicted"
    if layer.sinks.max_sinks is not None:
        assert int(layer.sink.sum(-1).max()) <= layer.sinks.max_sinks
    for row, cols in enumerate(_first_cols(pad, k, seen)):
        for c in cols:
            hit = pos[row] == c  # [H, T]
            assert bool(hit.any(-1).all()), f"layer {i}: sink column {c} of row {row} was evicted"
            assert bool(layer.sink[row][hit].all()), f"layer {i}: column {c} of row {row} is not marked as sink"


def _check_quantized(i: int, layer: QuantizedLayer, seen: int, k: int, pad: list[int]) -> None:
    pol = layer.policy
    g = pol.group_size
    body = layer.body_len()
    win = layer.win_k.shape[2]
    assert body % g == 0 and layer.win_start % g == 0
    assert layer.win_start + win == seen, (i, layer.win_start, win, seen)
    assert min(pol.window, seen) <= win < pol.window + g, (i, win, pol.window, g)
    gid = layer.gid.long()
    assert gid.shape[-1] == body // g
    assert bool((gid[..., 1:] > gid[..., :-1]).all()), f"layer {i}: groups out of column order"
    assert bool(((gid + 1) * g <= layer.win_start).all())
    if isinstance(pol, HybridPolicy):
        assert layer.held() <= pol.budget, (i, layer.held(), pol.budget)
        assert body <= pol.body_capacity()
    else:
        assert layer.held() == seen, (i, layer.held(), seen)
        assert torch.equal(gid, torch.arange(body // g).expand_as(gid))
    col = layer.sink_col.long()
    if layer.sinks.max_sinks is not None and col.numel():
        assert int((col >= 0).sum(-1).max()) <= layer.sinks.max_sinks
    for row, cols in enumerate(_first_cols(pad, k, seen)):
        for c in cols:
            if c >= layer.win_start:
                continue  # still exact in the window
            assert bool((col[row] == c).any(-1).all()), f"layer {i}: column {c} of row {row} is not an exact sink"
            assert bool((gid[row] == c // g).any(-1).all()), f"layer {i}: the group of sink column {c} was evicted"


def eager_prefill(model, cache, ids):
    """One prompt forward with eager attention weights; returns ``{layer: [B, Hk, q, T] weights
    averaged over each kv group's query heads}``."""
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True)
    hk = model.config.num_key_value_heads
    res = {}
    for i, a in enumerate(out.attentions):
        b, hq, q, t = a.shape
        res[i] = a.view(b, hk, hq // hk, q, t).mean(2)
    return res


def assert_layer_scores(cache, att, want) -> None:
    """Each evicting layer's ``score`` ``[B, Hk, T]`` equals ``want(last, layer)``, where ``last`` ``[B, Hk, T]``
    is the eager attention of the prompt's last query (from :func:`eager_prefill`); at least one layer checked."""
    checked = 0
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictingLayer):
            expected = want(att[i][:, :, -1, :].float(), layer).expand_as(layer.score)
            torch.testing.assert_close(layer.score, expected, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked
