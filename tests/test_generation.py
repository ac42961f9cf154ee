"""End-to-end ``model.generate`` with SinkCache on tiny random models of every architecture.

Unless a test says otherwise it runs for every architecture under eager *and* sdpa attention: a
cache whose ``get_mask_sizes`` disagrees with what ``update`` returns raises under eager attention
but passes silently under sdpa. Tests that compare a row alone with the same row in a batch use
``helpers.untied`` models (see there: fresh q/k norms make every key norm, the eviction score, tie).

Sections:
 1. exactness: ``full`` and every policy whose budget/window holds everything equal ``DynamicCache``
    (tokens exactly, logits to float tolerance, in float32); half precision stays finite.
 2. generation modes at tight budgets: greedy, seeded sampling, beam search, num_return_sequences,
    left-padded batches, multi-turn reuse, reset, deepcopy, batch ops, assisted decoding,
    contrastive search.
 3. invariants after generation (``helpers.check_invariants``, and ``helpers.Probe`` at every step).
 4. boundaries: the first compression happens exactly when the budget/window says; prompt of one
    token, window=0, identical tokens, bits 2/4/8.

Generation uses ``eos_token_id=None`` (see ``helpers.generate``) so every row yields exactly ``N``
tokens. After ``generate(prompt of L, N new tokens)`` the cache has seen ``L + N - 1`` tokens (the
last generated token is never fed back).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, prompt
from helpers import (
    check_invariants,
    generate,
    left_pad,
    max_diff,
    probed,
    untied,
)
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from sinkcache import SinkCache
from sinkcache.layers import CompressingLayer, QuantizedLayer
from sinkcache.sinks import AutoSinks

ATTNS = ["eager", "sdpa"]
L, N = 14, 6  # prompt length and new tokens for most tests
SEEN = L + N - 1
ATOL = 1e-5  # float32 logits: same math, different kernels/shapes

#: Budgets/windows far smaller than L + N: every policy compresses (and hybrid evicts groups).
#: evict runs with the default sinks ("first"); quantize and hybrid with measured sinks ("auto"),
#: so every generation mode exercises both selectors (AutoSinks keeps per-row state of its own).
TIGHT = {
    "evict": dict(policy="evict", budget=8, window=3),
    "evict_shifted": dict(policy="evict", budget=8, window=3, positions="shifted"),
    # attention scorers (forward hooks): TOVA with measured sinks, H2O and SnapKV with the default sinks
    "evict_tova": dict(policy="evict", budget=8, window=3, score="tova", sinks="auto"),
    "evict_tova_pooled": dict(policy="evict", budget=8, window=3, score="tova-pooled", sinks="auto"),
    "evict_h2o": dict(policy="evict", budget=8, window=3, score="h2o"),
    "evict_snapkv": dict(policy="evict", budget=8, window=3, score="snapkv"),
    "quantize": dict(policy="quantize", bits=2, window=2, group_size=4, sinks="auto"),
    "hybrid": dict(policy="hybrid", bits=4, budget=16, window=2, group_size=4, sinks="auto"),
}
#: Budgets/windows that hold every token of the tests that use them: nothing is ever compressed.
ROOMY = {
    "evict": dict(policy="evict", budget=64),
    "evict_shifted": dict(policy="evict", budget=64, positions="shifted"),
    "evict_tova": dict(policy="evict", budget=64, score="tova"),
    "evict_h2o": dict(policy="evict", budget=64, score="h2o"),
    "quantize": dict(policy="quantize", bits=2, window=48, group_size=16),
    "hybrid": dict(policy="hybrid", bits=2, budget=160, window=48, group_size=16),
}
ALL = {"full": dict(policy="full"), **TIGHT}
BUDGETED = ("evict", "evict_shifted", "evict_tova", "evict_tova_pooled", "evict_h2o", "evict_snapkv", "hybrid")


pytestmark = pytest.mark.usefixtures("one_thread")


def make(model, cfg: dict, **extra) -> SinkCache:
    kw = dict(cfg)
    return SinkCache(kw.pop("policy"), model=model, **kw, **extra)


def dynamic(model) -> DynamicCache:
    return DynamicCache(config=model.config)


_REFS: dict = {}


def reference(model, key, fn):
    """A DynamicCache reference run, computed once per model and key (several configs compare to it)."""
    k = (id(model), key)
    if k not in _REFS:
        _REFS[k] = fn()
    return _REFS[k]


def same_run(out, ref, atol: float = ATOL, what: str = "") -> None:
    """Greedy tokens exactly equal and per-step logits within ``atol``."""
    assert torch.equal(out.sequences, ref.sequences), f"{what}: tokens differ\n{out.sequences}\n{ref.sequences}"
    d = max_diff(out.scores, ref.scores)
    assert d <= atol, f"{what}: logits differ by {d:.3g}"


def batch_of(layer) -> int:
    return layer.shape[0] if isinstance(layer, CompressingLayer) else layer.keys.shape[0]


def finite(out) -> bool:
    """Raw logits of every step are finite (processed scores may hold -inf from top-k filtering)."""
    return all(bool(torch.isfinite(s).all()) for s in out.logits)


def _aa(fn):
    """Parametrize over every architecture and both attention implementations."""
    return pytest.mark.parametrize("attn", ATTNS)(pytest.mark.parametrize("arch", ARCHS)(fn))


# ============================================================================ 1. exactness


@_aa
@pytest.mark.parametrize("length", [L, 1])
def test_roomy_policies_equal_dynamic_cache(tiny, arch, attn, length):
    m = tiny(arch, attn)
    ids = prompt(length)
    seen = length + N - 1
    ref = generate(m, ids, dynamic(m), N)
    variants = {
        "full": SinkCache("full", model=m),
        "full(no model)": SinkCache("full"),  # layers created lazily, all full attention
        "full(config=)": SinkCache("full", config=m.config),
        "evict(config=)": SinkCache("evict", budget=64, config=m.config),
        **{name: make(m, cfg) for name, cfg in ROOMY.items()},
    }
    for name, cache in variants.items():
        p, stop = probed(cache)
        out = generate(m, ids, cache, N, stopping_criteria=stop)
        same_run(out, ref, what=name)
        assert p.calls == N
        check_invariants(cache, seen)
        st = cache.stats()
        assert st["tokens_seen"] == seen and st["tokens_held"] == seen, (name, st)


@_aa
def test_roomy_beam_search_equals_dynamic_cache(tiny, arch, attn):
    m = tiny(arch, attn)
    ids = prompt(L, seed=3)
    kw = dict(num_beams=3, num_return_sequences=3)
    ref = generate(m, ids, dynamic(m), 6, **kw)
    for name, cfg in {"full": dict(policy="full"), **ROOMY}.items():
        cache = make(m, cfg)
        out = generate(m, ids, cache, 6, **kw)
        assert torch.equal(out.sequences, ref.sequences), name
        assert torch.allclose(out.sequences_scores, ref.sequences_scores, atol=ATOL), name
        check_invariants(cache, L + 6 - 1)


@_aa
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_finite_under_every_policy(tiny, arch, attn, dtype):
    m = tiny(arch, attn, dtype)
    ids = prompt(L)
    for name, cfg in ALL.items():
        cache = make(m, cfg)
        out = generate(m, ids, cache, N)
        assert finite(out), f"{name}: NaN/Inf logits in {dtype}"
        assert out.sequences.shape == (1, L + N)
        check_invariants(cache, SEEN)
        assert cache.memory_bytes() > 0


# ============================================================================ 2. generation modes


@_aa
@pytest.mark.parametrize("policy", list(TIGHT))
def test_greedy_at_tight_budget(tiny, arch, attn, policy):
    m = tiny(arch, attn)
    cache = make(m, TIGHT[policy])
    p, stop = probed(cache)
    out = generate(m, prompt(L), cache, N, stopping_criteria=stop)
    assert out.sequences.shape == (1, L + N) and finite(out)
    assert p.calls == N
    check_invariants(cache, SEEN)
    st = cache.stats()
    assert st["tokens_seen"] == SEEN
    if policy in BUDGETED:
        assert st["tokens_held"] <= TIGHT[policy]["budget"] < SEEN
    else:
        assert st["tokens_held"] == SEEN


@_aa
@pytest.mark.parametrize("policy", list(TIGHT))
def test_sampling_same_seed_same_tokens(tiny, arch, attn, policy):
    m = tiny(arch, attn)
    ids = prompt(L, batch=2)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        cache = make(m, TIGHT[policy])
        outs.append(generate(m, ids, cache, N, do_sample=True, top_k=0, temperature=1.5))
        check_invariants(cache, SEEN)
    same_run(outs[0], outs[1], atol=0.0, what="same seed")
    assert finite(outs[0])


@_aa
@pytest.mark.parametrize("policy", list(TIGHT))
@pytest.mark.parametrize("beams", [2, 3])
def test_beam_search_at_tight_budget(tiny, arch, attn, policy, beams):
    """Beam search reorders the cache (``reorder_cache``, padding bookkeeping included) after every
    step; here on a left-padded batch of two prompts."""
    m = tiny(arch, attn)
    cache = make(m, TIGHT[policy])
    p, stop = probed(cache)
    ids, mask = left_pad([prompt(L, seed=1)[0], prompt(L - 4, seed=2)[0]])
    out = generate(m, ids, cache, N, mask=mask, num_beams=beams, num_return_sequences=beams, stopping_criteria=stop)
    assert out.sequences.shape == (2 * beams, L + N)
    assert torch.equal(out.sequences[:, :L], ids.repeat_interleave(beams, dim=0))
    assert bool(torch.isfinite(out.sequences_scores).all())
    assert p.calls == N
    assert cache.layers[-1].get_seq_length() == SEEN
    check_invariants(cache, SEEN)


@_aa
@pytest.mark.parametrize("policy", list(TIGHT))
def test_sampling_num_return_sequences(tiny, arch, attn, policy):
    """transformers 5.23 expands the prompt *before* the first forward, so this path does not call
    ``batch_repeat_interleave`` (``test_batch_ops_continue_like_fresh_runs`` calls it directly)."""
    m = tiny(arch, attn)
    cache = make(m, TIGHT[policy])
    torch.manual_seed(7)
    out = generate(m, prompt(L), cache, N, do_sample=True, num_return_sequences=3)
    assert out.sequences.shape == (3, L + N) and finite(out)
    assert all(batch_of(layer) == 3 for layer in cache.layers)
    check_invariants(cache, SEEN)


@_aa
@pytest.mark.parametrize("policy", list(TIGHT))
def test_batch_ops_continue_like_fresh_runs(tiny, arch, attn, policy):
    """reorder_cache / batch_select_indices / batch_repeat_interleave move every per-row tensor.

    One cache goes through all three (swap the two rows, keep one, repeat it three times), decoding
    a few tokens after each; at every stage the rows equal a fresh run on the swapped prompts.
    """
    m = untied(tiny, arch, attn)
    cfg = TIGHT[policy]
    ids = torch.cat([prompt(L, seed=1), prompt(L, seed=2)])
    n = 3
    ref = generate(m, ids.flip(0), make(m, cfg), 4 * n)

    def expect(out, stage: int, rows: list[int], what: str) -> None:
        want = ref.sequences[rows, : L + (stage + 1) * n]
        assert torch.equal(out.sequences, want), f"{what}: tokens differ"
        d = max_diff(out.scores, [s[rows] for s in ref.scores[stage * n : (stage + 1) * n]])
        assert d <= ATOL, f"{what}: logits differ by {d:.3g}"
        check_invariants(c, L + (stage + 1) * n - 1)

    c = make(m, cfg)
    a = generate(m, ids, c, n).sequences
    c.reorder_cache(torch.tensor([1, 0]))  # beam search's op
    out = generate(m, a.flip(0), c, n)
    expect(out, 1, [0, 1], "after reorder_cache")
    c.batch_select_indices(torch.tensor([0]))
    out = generate(m, out.sequences[:1], c, n)
    expect(out, 2, [0], "after batch_select_indices")
    c.batch_repeat_interleave(3)
    out = generate(m, out.sequences.repeat(3, 1), c, n)
    expect(out, 3, [0, 0, 0], "after batch_repeat_interleave")


@pytest.mark.parametrize("op", ["reorder", "select", "repeat"])
def test_auto_sink_observations_follow_batch_ops(tiny, op):
    """``sinks="auto"`` keeps per-row attention measurements (``AutoSinks.observed``) that quantized
    layers read when tokens leave the window, possibly many steps later. Like every per-row tensor,
    they must follow the rows through the cache's batch ops."""
    m = tiny("llama")
    c = SinkCache("quantize", bits=2, window=8, group_size=8, sinks="auto", model=m)
    assert isinstance(c.sink_selector, AutoSinks)
    generate(m, torch.cat([prompt(L, seed=1), prompt(L, seed=2)]), c, 2)
    before = {i: att.clone() for i, (_, att) in c.sink_selector.observed.items()}
    assert before and all(att.shape[0] == 2 for att in before.values())
    if op == "reorder":
        c.reorder_cache(torch.tensor([1, 0]))
        want = {i: att[[1, 0]] for i, att in before.items()}
    elif op == "select":
        c.batch_select_indices(torch.tensor([1]))
        want = {i: att[[1]] for i, att in before.items()}
    else:
        c.batch_repeat_interleave(2)
        want = {i: att.repeat_interleave(2, dim=0) for i, att in before.items()}
    for i, att in want.items():
        assert torch.equal(c.sink_selector.observed[i][1], att), f"layer {i}: observed attention did not follow {op}"


@_aa
def test_reorder_keeps_measured_sinks_with_their_rows(tiny, arch, attn):
    """Observable consequence of the above: after a row swap, tokens still in the quantization window
    are later marked as sinks from the *other* row's attention. A low threshold makes the sink choice
    row-dependent in these tiny models (at the default 0.05 nearly every early column is a sink)."""
    m = tiny(arch, attn)
    ids = torch.cat([prompt(24, seed=1), prompt(24, seed=2)])
    n1, n2 = 2, 10

    def mk():
        return SinkCache("quantize", bits=2, window=8, group_size=8, model=m, sinks=AutoSinks(threshold=0.01))

    c = mk()
    a = generate(m, ids, c, n1).sequences
    c.reorder_cache(torch.tensor([1, 0]))
    out = generate(m, a.flip(0), c, n2)
    ref = generate(m, ids.flip(0), mk(), n1 + n2)
    d = max_diff(out.scores, ref.scores[n1:])
    assert torch.equal(out.sequences, ref.sequences) and d <= ATOL, f"logits differ by {d:.3g} after the swap"


PAD_CFG = {
    "full": dict(policy="full"),
    "evict": dict(policy="evict", budget=10, window=4),  # budget < the short row's 12 or 13 tokens
    "evict_shifted": dict(policy="evict", budget=10, window=4, positions="shifted"),
    "evict_tova": dict(policy="evict", budget=10, window=4, score="tova"),
    "evict_tova_pooled": dict(policy="evict", budget=10, window=4, score="tova-pooled"),
    "evict_h2o": dict(policy="evict", budget=10, window=4, score="h2o"),
    "evict_snapkv": dict(policy="evict", budget=10, window=4, score="snapkv"),
    "quantize": dict(policy="quantize", bits=2, window=4, group_size=4),
    "hybrid": dict(policy="hybrid", bits=4, budget=20, window=4, group_size=4),
}
HYBRID_PAD_ERROR = "policy='hybrid' evicts whole quantized groups"


@_aa
@pytest.mark.parametrize(
    ("policy", "sinks"),
    [("full", "auto")] + [(p, "first") for p in list(PAD_CFG)[1:]] + [("evict", "auto"), ("quantize", "auto")],
)
@pytest.mark.parametrize("short", [12, 13], ids=["pad8", "pad7"])
def test_left_padded_batch_rows_equal_single_runs(tiny, arch, attn, policy, sinks, short):
    """Rows of unequal length, left-padded, with ``model=`` so the cache sees the padding mask: each
    row equals its own batch-size-1 run (greedy tokens, and logits to 1e-4). pad8 keeps the short row's
    tokens aligned with the quantization groups (group_size=4), pad7 does not. ``hybrid`` may instead
    raise its documented ValueError.

    Known limitation (README, "Supported"): quantization groups are aligned to columns shared by the
    batch, so a row whose pad count is not a multiple of ``group_size`` is grouped differently than
    alone: it is still quantized within the same error bound, but not bit-identically. For those rows
    only the unpadded row is held to exact equality."""
    m = untied(tiny, arch, attn)
    cfg = PAD_CFG[policy]
    extra = {} if policy == "full" else dict(sinks=sinks)
    seqs = [prompt(20, seed=1)[0], prompt(short, seed=2)[0]]
    ids, mask = left_pad(seqs)
    cache = make(m, cfg, **extra)
    try:
        out = generate(m, ids, cache, N, mask=mask)
    except ValueError as e:
        if policy == "hybrid" and HYBRID_PAD_ERROR in str(e):
            return
        raise
    check_invariants(cache, 20 + N - 1)
    misaligned = cfg.get("bits") is not None and (20 - short) % cfg["group_size"] != 0
    for row, s in enumerate(seqs):
        if misaligned and len(s) < 20:
            assert torch.isfinite(torch.stack([sc[row] for sc in out.scores])).all()
            continue
        one = generate(m, s[None], make(m, cfg, **extra), N)
        assert torch.equal(out.sequences[row, -N:], one.sequences[0, -N:]), (
            f"row {row} (pad {20 - len(s)}): batched {out.sequences[row, -N:].tolist()} "
            f"vs alone {one.sequences[0, -N:].tolist()}"
        )
        d = max_diff([sc[row : row + 1] for sc in out.scores], one.scores)
        assert d <= 1e-4, f"row {row} (pad {20 - len(s)}): logits differ by {d:.3g}"


ROOMY_SOME = {f"roomy_{k}": ROOMY[k] for k in ("evict", "quantize")}
MULTI = {"full": dict(policy="full"), **TIGHT, **ROOMY_SOME}


@_aa
@pytest.mark.parametrize("name", list(MULTI))
def test_multi_turn_reuse(tiny, arch, attn, name):
    """One cache across two generate calls; the second passes the whole conversation so far.
    Policies that hold everything must equal a DynamicCache doing the same."""
    m = tiny(arch, attn)
    cache = make(m, MULTI[name])
    user2 = prompt(12, seed=9)  # more new tokens in one forward than the tight budgets hold
    o1 = generate(m, prompt(L), cache, N).sequences
    assert cache.get_seq_length() == SEEN
    conv = torch.cat([o1, user2], dim=1)
    p, stop = probed(cache)
    out = generate(m, conv, cache, N, stopping_criteria=stop)
    total = conv.shape[1] + N - 1
    assert cache.get_seq_length() == total
    assert torch.equal(out.sequences[:, : conv.shape[1]], conv) and finite(out)
    check_invariants(cache, total)
    if name == "full" or name.startswith("roomy_"):

        def two_turns():
            d = dynamic(m)
            r1 = generate(m, prompt(L), d, N).sequences
            return generate(m, torch.cat([r1, user2], dim=1), d, N)

        same_run(out, reference(m, "two_turns", two_turns), what=name)


@_aa
@pytest.mark.parametrize("policy", list(ALL))
def test_reset_then_reuse_equals_fresh_cache(tiny, arch, attn, policy):
    m = tiny(arch, attn)
    cfg = ALL[policy]
    cache = make(m, cfg)
    first, mask = left_pad([prompt(12, seed=4)[0], prompt(8, seed=5)[0]])  # other batch size, padding
    generate(m, first, cache, 5, mask=mask)
    cache.reset()
    assert cache.get_seq_length() == 0
    ids = prompt(L)
    out = generate(m, ids, cache, N)
    ref = generate(m, ids, make(m, cfg), N)
    same_run(out, ref, atol=0.0, what="after reset")
    check_invariants(cache, SEEN)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", list(ALL))
@pytest.mark.parametrize("how", ["decode", "new_turn"])
def test_deepcopy_continues_identically(tiny, arch, policy, how):
    """A deep copy taken after generate continues exactly like the original: by decoding on
    (one token per forward) and with a new multi-token user turn. (Eager attention only: copying
    does not depend on it, and mask sizes under sdpa are covered by the multi-turn test.)"""
    m = tiny(arch, "eager")
    cache = make(m, ALL[policy])
    o1 = generate(m, prompt(L), cache, N).sequences
    twin = copy.deepcopy(cache)
    nxt = o1 if how == "decode" else torch.cat([o1, prompt(9, seed=5)], dim=1)
    a = generate(m, nxt, cache, N)
    b = generate(m, nxt, twin, N)
    same_run(b, a, atol=0.0, what=f"deepcopy, {how}")
    sa, sb = cache.stats(), twin.stats()
    for key in ("tokens_seen", "tokens_held", "sinks_per_layer", "memory_bytes"):
        assert sa[key] == sb[key], (key, sa[key], sb[key])


ASSIST = {"full": dict(policy="full"), **TIGHT, **ROOMY_SOME}


@_aa
@pytest.mark.parametrize("name", list(ASSIST))
def test_assisted_decoding(tiny, arch, attn, name):
    """Assisted decoding (the same tiny model as assistant) works with every policy: it verifies
    several draft tokens per forward and rolls rejected ones back with ``crop``. Policies that hold
    everything give exactly the plain greedy tokens."""
    m = tiny(arch, attn)
    ids = prompt(L)
    cache = make(m, ASSIST[name])
    n = 12
    p, stop = probed(cache)
    out = generate(m, ids, cache, n, assistant_model=m, stopping_criteria=stop)
    assert out.sequences.shape == (1, L + n) and p.calls >= 1
    assert cache.get_seq_length() == L + n - 1
    check_invariants(cache, L + n - 1)
    if name == "full" or name.startswith("roomy_"):
        ref = reference(m, ("greedy", L, n), lambda: generate(m, ids, dynamic(m), n))
        assert torch.equal(out.sequences, ref.sequences), name


@pytest.mark.parametrize("policy", list(ALL))
def test_contrastive_search_is_not_in_core(tiny, policy):
    """transformers 5.23 moved contrastive search to the Hub (``transformers-community/contrastive-search``);
    ``generate(penalty_alpha=..., top_k=...)`` raises before any forward unless
    ``trust_remote_code=True`` (which then needs the Hub). Nothing to support in core."""
    m = tiny("llama")
    cache = make(m, ALL[policy])
    with pytest.raises(ValueError, match="Contrastive Search requires `trust_remote_code=True`"):
        m.generate(prompt(L), past_key_values=cache, penalty_alpha=0.6, top_k=4, max_new_tokens=4)
    assert cache.get_seq_length() == 0


# ============================================================================ 3. invariants


@_aa
@pytest.mark.parametrize("policy", ["evict", "evict_shifted", "quantize", "hybrid"])
@pytest.mark.parametrize("n_first", [1, 3])
def test_first_sinks_are_never_evicted(tiny, arch, attn, policy, n_first):
    """``sinks="first", n_first=k``: the first k real tokens of every row stay held (exact), in a
    left-padded batch, however far generation runs past the budget."""
    m = tiny(arch, attn)
    cfg = {
        "evict": dict(policy="evict", budget=8, window=3),
        "evict_shifted": dict(policy="evict", budget=8, window=3, positions="shifted"),
        "quantize": dict(policy="quantize", bits=2, window=2, group_size=4),
        "hybrid": dict(policy="hybrid", bits=2, budget=24, window=2, group_size=4),
    }[policy]
    ids, mask = left_pad([prompt(L, seed=1)[0], prompt(L - 4, seed=2)[0]])  # pad 4 = one group
    cache = make(m, cfg, sinks="first", n_first=n_first)
    p, stop = probed(cache)
    n = 12
    generate(m, ids, cache, n, mask=mask, stopping_criteria=stop)
    assert p.calls == n
    check_invariants(cache, L + n - 1)  # includes: first n_first real columns held, as sinks
    for layer in cache.layers:
        if hasattr(layer, "pos"):
            first = torch.tensor([0, 4]).view(2, 1, 1) + torch.arange(n_first)
            assert torch.equal(layer.pos[..., :n_first].long(), first.expand_as(layer.pos[..., :n_first]))


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("policy", list(ALL))
def test_gemma3_sliding_layers_are_left_alone(tiny, attn, policy):
    """Gemma 3's sliding-window layers stay transformers' DynamicSlidingWindowLayer, uncompressed:
    layer 0 holds exactly the keys a DynamicCache holds for the same token sequence."""
    m = tiny("gemma3", attn)
    cache = make(m, ALL[policy])
    out = generate(m, prompt(20), cache, N)
    types = m.config.layer_types
    for i, layer in enumerate(cache.layers):
        if types[i] == "sliding_attention":
            assert type(layer) is DynamicSlidingWindowLayer
        else:
            assert not getattr(layer, "is_sliding", False)
    st = cache.stats()
    assert st["sliding_layers"] == 2
    assert all(st["sinks_per_layer"][i] == 0.0 for i, t in enumerate(types) if t == "sliding_attention")
    ref = dynamic(m)
    with torch.no_grad():
        m(out.sequences[:, :-1], past_key_values=ref)
    assert torch.allclose(cache.layers[0].keys, ref.layers[0].keys, atol=ATOL)
    assert torch.allclose(cache.layers[0].values, ref.layers[0].values, atol=ATOL)
    check_invariants(cache, 20 + N - 1)


# ============================================================================ 4. boundaries

# name: (config, prompt length, t*) -- generate's step t (t=0: the prompt forward) sees every token
# exactly for t < t*, and step t* is the first to see a compressed cache. Compression runs at the
# start of a forward, on what earlier forwards stored:
#   evict budget B:           first eviction at t* = B - L + 2 (held L + t - 1 > B)
#   quantize window W, G:     first flush at t* = W + G - L + 1 (window holds W + G tokens)
#   hybrid:                   its first flush, as quantize
# Quantizing cases use sinks="first": with "auto" (no sink cap under quantize) nearly every key of a
# prompt this short draws >= 0.05 mean attention in a random model, so everything stays exact.
BOUNDARY = {
    "evict_len1": (dict(policy="evict", budget=6, window=2, sinks="first"), 1, 7),
    "evict_at_budget": (dict(policy="evict", budget=8, window=3), 8, 2),
    "evict_budget_plus_1": (dict(policy="evict", budget=8, window=3), 9, 1),
    "evict_window0": (dict(policy="evict", budget=6, window=0, sinks="first"), 6, 2),
    "evict_shifted_budget_plus_1": (dict(policy="evict", budget=8, window=3, positions="shifted"), 9, 1),
    "quantize_len1": (dict(policy="quantize", bits=2, window=2, group_size=4, sinks="first"), 1, 6),
    "quantize_at_window_plus_group_minus_1": (dict(policy="quantize", bits=2, window=2, group_size=4, sinks="first"), 5, 2),
    "quantize_at_window_plus_group": (dict(policy="quantize", bits=2, window=2, group_size=4, sinks="first"), 6, 1),
    "quantize_window0": (dict(policy="quantize", bits=2, window=0, group_size=4, sinks="first"), 4, 1),
    "hybrid_len1": (dict(policy="hybrid", bits=2, budget=16, window=2, group_size=4, sinks="first"), 1, 6),
    "hybrid_at_budget": (dict(policy="hybrid", bits=2, budget=16, window=2, group_size=4, sinks="first"), 16, 1),
    "hybrid_window0": (dict(policy="hybrid", bits=2, budget=12, window=0, group_size=4, sinks="first"), 3, 2),
}


@_aa
@pytest.mark.parametrize("case", list(BOUNDARY))
def test_first_compression_happens_exactly_at_the_boundary(tiny, arch, attn, case):
    """Off-by-one guard for budgets and windows: logits equal DynamicCache's up to step t*-1 and
    differ from step t* on."""
    cfg, length, t_star = BOUNDARY[case]
    m = tiny(arch, attn)
    ids = prompt(length, seed=11)
    n = t_star + 3
    cache = make(m, cfg)
    p, stop = probed(cache)
    out = generate(m, ids, cache, n, stopping_criteria=stop)
    ref = reference(m, ("boundary", length, n), lambda: generate(m, ids, dynamic(m), n))
    assert torch.equal(out.sequences[:, : length + t_star], ref.sequences[:, : length + t_star])
    assert max_diff(out.scores[:t_star], ref.scores[:t_star]) <= ATOL, "compressed too early"
    d = max_diff(out.scores[t_star : t_star + 1], ref.scores[t_star : t_star + 1])
    assert d > 1e-4, f"step {t_star} still equals the full cache (diff {d:.2g}): compressed too late"
    assert p.calls == n
    check_invariants(cache, length + n - 1)


@_aa
@pytest.mark.parametrize("policy", list(ALL))
def test_all_identical_tokens(tiny, arch, attn, policy):
    """A prompt of one repeated token: equal key norms (eviction ties), equal values per position."""
    m = tiny(arch, attn)
    ids = torch.full((1, 20), 7)
    cache = make(m, ALL[policy])
    p, stop = probed(cache)
    out = generate(m, ids, cache, N, stopping_criteria=stop)
    assert finite(out) and p.calls == N
    check_invariants(cache, 20 + N - 1)
    if policy == "full":
        same_run(out, generate(m, ids, dynamic(m), N), what="full")


def _teacher_forced(model, cache, ids, cont) -> torch.Tensor:
    with torch.no_grad():
        logits = [model(ids, past_key_values=cache).logits[:, -1]]
        for j in range(cont.shape[1]):
            logits.append(model(cont[:, j : j + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits, dim=1)


@_aa
@pytest.mark.parametrize("policy", ["quantize", "hybrid"])
def test_bits_2_4_8(tiny, arch, attn, policy):
    """Every width runs; memory grows strictly with bits; under ``quantize`` 8 bits is closer to the
    full cache than 2 bits (teacher-forced logits over the same tokens)."""
    m = tiny(arch, attn)
    ids, cont = prompt(20, seed=1), prompt(12, seed=2)
    ref = _teacher_forced(m, dynamic(m), ids, cont)
    err, mem = {}, {}
    for bits in (2, 4, 8):
        kw = dict(bits=bits, window=2, group_size=8)
        if policy == "hybrid":
            kw["budget"] = 32  # two quantized groups: one pinned by the first-token sink
        cache = SinkCache(policy, model=m, **kw)
        logits = _teacher_forced(m, cache, ids, cont)
        assert bool(torch.isfinite(logits).all()), bits
        err[bits] = float((logits - ref).abs().max())
        mem[bits] = cache.memory_bytes()
        check_invariants(cache, 20 + 12)
        assert any(isinstance(layer, QuantizedLayer) and layer.body_len() > 0 for layer in cache.layers)
    assert mem[2] < mem[4] < mem[8], mem
    if policy == "quantize":  # hybrid's error is dominated by the (bit-independent) group eviction
        assert err[8] < err[2], err
