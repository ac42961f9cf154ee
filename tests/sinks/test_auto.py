"""The runtime sink detector (``sinks="auto"``, :mod:`sinkcache.sinks.auto`) on a tiny planted-sink model.

The planted model (as in tests/test_analysis.py): every query carries a constant component in one
head dimension and only token ``SINK`` has a key there, so every later query attends to it. All
other attention is close to uniform, which is the hard case for chunk-local scoring: the earliest
keys of a chunk draw ~H(w)/w of a uniform window's attention.
"""

from __future__ import annotations

import pytest
import torch
from planted import NORMAL, SINK, planted_model

from sinkcache import SinkCache
from sinkcache.sinks.auto import AutoSinks, make_auto_sinks, window_attention

QUIET = 60  # a "punctuation" id that draws no attention


def ids_without_sink(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 128, (1, length), generator=g)
    ids[(ids == SINK) | (ids == QUIET)] = NORMAL
    return ids


def sink_cols(cache: SinkCache, layer: int = 0) -> set[int]:
    return {int(c) for c in cache.layers[layer].sink_col[0].flatten() if int(c) >= 0}


def feed(model, cache, ids: torch.Tensor, chunk: int) -> None:
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True)


def test_window_attention_with_context_is_one_softmax():
    """Scoring a forward's keys with older keys as context = scoring all keys in one forward."""
    torch.manual_seed(1)
    b, hq, hk, t, m, w, d = 2, 4, 2, 24, 10, 8, 16
    q = torch.randn(b, hq, w, d)
    k = torch.randn(b, hk, m + t, d)
    full, none = window_attention(q, k, 0.25)
    assert none is None
    new, old = window_attention(q, k[:, :, m:], 0.25, ctx_k=k[:, :, :m], ctx_ok=torch.ones(b, m, dtype=torch.bool))
    assert old is not None
    torch.testing.assert_close(new, full[..., m:])
    torch.testing.assert_close(old, full[..., :m])
    # an unusable context entry takes no attention
    ok = torch.ones(b, m, dtype=torch.bool)
    ok[1, 3] = False
    _, old2 = window_attention(q, k[:, :, m:], 0.25, ctx_k=k[:, :, :m], ctx_ok=ok)
    assert old2 is not None and float(old2[1, :, 3].abs().max()) == 0.0


@pytest.mark.parametrize("chunk", [32, 96])
def test_chunked_prefill_finds_planted_sink_and_nothing_else(chunk):
    """A planted key is found; ordinary keys are not, also when the prompt arrives in chunks smaller
    than the recent window (measurements wait until the layer compresses those columns) and in
    chunks that hold no sink (the first token and known sinks stay in the softmax)."""
    model = planted_model()
    ids = ids_without_sink(192)
    ids[0, 20] = SINK
    cache = SinkCache(policy="quantize", bits=2, window=64, group_size=16, sinks=AutoSinks(threshold=0.05), model=model)
    feed(model, cache, ids, chunk)
    feed(model, cache, ids[:, -1:], 1)  # runs pending compression
    assert sink_cols(cache) == {0, 20}
    for h in range(2):
        assert 20 in cache.layers[0].sink_col[0, h].tolist()
    cache.detach()


@pytest.mark.parametrize(
    "kw, extra",
    [
        # chunk-local scoring (each chunk's softmax alone, no uniform check): every chunk's earliest
        # keys look like sinks
        (dict(context=0, bank_size=0, min_ratio=0), {1, 2, 32, 33, 64, 65, 96, 97}),
        # older keys in the softmax fix later chunks; the prompt's first queries still see few keys
        (dict(min_ratio=0), {1, 2}),
        # the uniform-share check alone fixes both here
        (dict(context=0, bank_size=0), set()),
    ],
)
def test_each_safeguard_matters(kw, extra):
    model = planted_model()
    ids = ids_without_sink(192)
    ids[0, 20] = SINK
    cache = SinkCache(
        policy="quantize", bits=2, window=64, group_size=16, sinks=AutoSinks(threshold=0.05, **kw), model=model
    )
    feed(model, cache, ids, 32)
    feed(model, cache, ids[:, -1:], 1)
    cols = sink_cols(cache)
    assert {0, 20} <= cols
    assert extra <= cols
    if not extra:
        assert cols == {0, 20}
    cache.detach()


def test_no_sink_found_without_planted_token():
    model = planted_model()
    ids = ids_without_sink(160)
    cache = SinkCache(policy="quantize", bits=2, window=0, group_size=16, sinks=AutoSinks(threshold=0.05), model=model)
    feed(model, cache, ids, 160)
    feed(model, cache, ids[:, -1:], 1)
    assert sink_cols(cache) == {0}
    cache.detach()


@pytest.mark.parametrize("with_candidates", [True, False])
def test_decoded_candidate_is_confirmed_by_attention(with_candidates):
    """A generated punctuation token that draws attention becomes a sink; a generated punctuation
    token that draws none does not; without candidate ids decoded tokens are never sinks."""
    model = planted_model()
    prompt = ids_without_sink(64)
    sel = AutoSinks(threshold=0.05, punct_ids=[SINK, QUIET] if with_candidates else None)
    cache = SinkCache(policy="quantize", bits=2, window=16, group_size=16, sinks=sel, model=model)
    feed(model, cache, prompt, 64)
    decoded = ids_without_sink(48, seed=3)
    decoded[0, 4] = QUIET  # column 68
    decoded[0, 10] = SINK  # column 74
    feed(model, cache, decoded, 1)
    feed(model, cache, decoded[:, :1], 1)
    want = {0, 74} if with_candidates else {0}
    assert sink_cols(cache) == want
    cache.detach()


def test_candidate_test_runs_once_per_forward_and_each_layer_keeps_its_own(monkeypatch):
    """Every layer of a decode step asks whether the new token is a candidate: the ids lookup runs
    once per forward, and the layers' candidate flags stay independent (each updates its own)."""
    model = planted_model(layers=3)
    sel = AutoSinks(threshold=0.05, punct_ids=[SINK, QUIET])
    calls = []
    real = AutoSinks._candidate_now
    monkeypatch.setattr(AutoSinks, "_candidate_now", lambda self, *a: calls.append(1) or real(self, *a))
    cache = SinkCache(policy="quantize", bits=2, window=16, group_size=16, sinks=sel, model=model)
    feed(model, cache, ids_without_sink(64), 64)
    decoded = ids_without_sink(40, seed=3)
    decoded[0, 10] = SINK  # column 74
    feed(model, cache, decoded, 1)
    assert len(calls) == 40  # one per decode forward, not one per layer
    assert all(sink_cols(cache, i) == {0, 74} for i in range(3))
    st = [sel.state[i].cand for i in range(3)]
    assert all(c is not None for c in st) and len({id(c) for c in st}) == 3
    cache.detach()


def test_repeated_columns_forget_old_measurements():
    """Re-feeding columns (as after a crop) replaces their measurements."""
    model = planted_model()
    ids = ids_without_sink(96)
    ids[0, 40] = SINK
    sel = AutoSinks(threshold=0.05)
    sel.max_sinks = 8
    cache = SinkCache(policy="evict", budget=96, window=32, sinks=sel, model=model)
    feed(model, cache, ids[:, :64], 64)
    assert sel.observed[0][1].shape[-1] >= 1
    st = sel.state[0]
    sel._truncate(st, 32)
    assert st.end() <= 32
    assert all(c < 32 for c in st.ring_col) and all(c < 32 for c in st.bank_col)
    cache.detach()


def test_auto_validates_arguments():
    with pytest.raises(ValueError, match="threshold"):
        AutoSinks(threshold=0.0)
    with pytest.raises(ValueError, match="obs_window"):
        AutoSinks(obs_window=0)
    with pytest.raises(ValueError, match="context"):
        AutoSinks(context=-1)
    with pytest.raises(ValueError, match="bank_size"):
        AutoSinks(bank_size=1.5)  # type: ignore[arg-type]


def test_make_auto_sinks_without_model_is_first():
    sel = make_auto_sinks(1, None, None, None)
    assert sel.name == "auto" and not isinstance(sel, AutoSinks)


@pytest.mark.real_model
def test_auto_on_smollm_marks_few_sinks_and_the_first_token():
    from sinkcache.calibration import token_chunks
    from sinkcache.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor([token_chunks(tok, "heldout", 256, n=1)[0]])
    cache = SinkCache(policy="quantize", bits=2, window=0, sinks="auto", model=model, tokenizer=tok)
    assert isinstance(cache.sink_selector, AutoSinks) and cache.sink_selector.punct_ids is not None
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    per_layer = cache.stats()["sinks_per_layer"]
    assert all(s >= 1.0 for s in per_layer)  # the first token everywhere
    assert sum(per_layer) / len(per_layer) < 0.25 * 256  # a minority of the tokens
    cache.detach()
    # generation with decode-time candidates runs and matches the greedy tokens of a fresh cache run
    prompt = ids[:, :64]
    runs = []
    for _ in range(2):
        c = SinkCache(policy="quantize", bits=4, window=16, group_size=16, model=model, tokenizer=tok)
        out = model.generate(prompt, past_key_values=c, max_new_tokens=24, do_sample=False)
        runs.append(out[0, 64:].tolist())
        c.detach()
    assert len(runs[0]) == 24 and runs[0] == runs[1]


def _decode_states(model, fast: bool, policy: dict, punct: list[int], batch: int, steps: int, prompt_sink: int | None = None, **detector):
    """Prefill a (left-padded) batch, decode ``steps`` tokens in which every 3rd is a candidate;
    returns the detector's state after each step, the sinks found and how often the fast path ran.
    ``detector``: more :class:`AutoSinks` arguments (e.g. a small ``context``)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(10, 128, (batch, 40 + steps), generator=g)
    ids[:, 40::3] = punct[0]
    ids[0, 40 + 7] = SINK
    if prompt_sink is not None:
        ids[0, prompt_sink] = SINK
    mask = torch.ones_like(ids)
    mask[-1, :5] = 0  # the last row is left-padded
    sel = AutoSinks(threshold=0.05, punct_ids=punct, max_sinks=4, **detector)
    sel.fast_decode = fast
    ran: list[bool] = []
    real = AutoSinks._observe_step

    def spy(self, *a):
        r = real(self, *a)
        ran.append(r)
        return r

    cache = SinkCache(**policy, sinks=sel, model=model)
    states = []
    with torch.no_grad():
        AutoSinks._observe_step = spy
        try:
            model(input_ids=ids[:, :40], attention_mask=mask[:, :40], past_key_values=cache, use_cache=True)
            for i in range(40, 40 + steps):
                model(input_ids=ids[:, i : i + 1], attention_mask=mask[:, : i + 1], past_key_values=cache, use_cache=True)
                states.append({j: (s.lo, s.sum.clone(), s.cnt.clone(), s.cand.clone(), list(s.bank_col), list(s.ring_col),
                                   s.ring_k.clone(), s.ring_ok.clone())
                               for j, s in sel.state.items()})
        finally:
            AutoSinks._observe_step = real
    sinks = [held_sinks(cache, j) for j in range(len(cache.layers))]
    cache.detach()
    return states, sinks, ran


def held_sinks(cache: SinkCache, layer: int) -> set[int]:
    """Columns held as sinks by a quantizing layer, or positions held as sinks by an evicting one."""
    lay = cache.layers[layer]
    if hasattr(lay, "sink_col"):
        return sink_cols(cache, layer)
    return {int(p) for p in lay.pos[lay.sink].flatten()}


@pytest.mark.parametrize(
    ("policy", "detector", "steps"),
    [
        (dict(policy="quantize", bits=2, window=16, group_size=16), {}, 30),
        (dict(policy="quantize", bits=2, window=0, group_size=8), {}, 30),  # sinks confirmed while still in the ring
        (dict(policy="evict", budget=40, window=8, score="keynorm"), {}, 30),
        # a ring of 8 keys slides through its 16-column buffer several times (it moves to the
        # buffer's front every 8 steps): the keys it holds stay the general path's
        (dict(policy="quantize", bits=2, window=16, group_size=16), dict(context=8, obs_window=8), 40),
    ],
)
def test_fast_decode_step_measures_what_the_general_path_measures(policy, detector, steps):
    """The decode fast path and the general path give the same measurements at every step (the
    same shares up to float summation order, the same counts, candidates, bank, ring keys and sinks)."""
    model = planted_model(layers=2)
    slow, slow_sinks, slow_ran = _decode_states(model, False, policy, [QUIET, SINK], batch=2, steps=steps, **detector)
    fast, fast_sinks, fast_ran = _decode_states(model, True, policy, [QUIET, SINK], batch=2, steps=steps, **detector)
    assert not slow_ran and sum(fast_ran) >= steps  # the fast path really ran (2 layers x steps, minus fallbacks)
    assert fast_sinks == slow_sinks
    if policy.get("window") == 16 and not detector:
        assert all(47 in s for s in fast_sinks)  # the decoded planted sink was confirmed (row 0, column 47)
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys()
        for j in a:
            (lo, s, c, cd, bank, ring, rk, rok), (lo2, s2, c2, cd2, bank2, ring2, rk2, rok2) = a[j], b[j]
            assert (lo, bank, ring) == (lo2, bank2, ring2)
            assert torch.equal(c, c2) and torch.equal(cd, cd2)
            assert torch.equal(rk, rk2) and torch.equal(rok, rok2)
            torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-7)


def test_evicting_layer_confirms_a_decoded_sink():
    """An evicting layer decides a token when it leaves the recent window, as the quantizing layer
    does, so a decoded candidate has been measured by then (it used to be decided one forward after
    it arrived, unmeasured, and never confirmed)."""
    model = planted_model(layers=2)
    policy = dict(policy="evict", budget=60, window=16, score="keynorm")
    _, sinks, _ = _decode_states(model, True, policy, [QUIET, SINK], batch=2, steps=30)
    assert all(47 in s for s in sinks)  # what the quantizing layer confirms (see the test above)


def test_evicting_layer_decides_a_measured_prompt_sink_at_the_window_edge():
    """A planted prompt sink inside the last window of the prompt is decided when it leaves the
    window, from its prefill measurement: the one-column path and the general path agree."""
    model = planted_model(layers=2)
    policy = dict(policy="evict", budget=40, window=8, score="keynorm")
    fast = _decode_states(model, True, policy, [QUIET, SINK], batch=2, steps=12, prompt_sink=36)
    slow = _decode_states(model, False, policy, [QUIET, SINK], batch=2, steps=12, prompt_sink=36)
    assert all(36 in s for s in fast[1]) and fast[1] == slow[1]


def test_evicting_layer_decides_late_under_left_padding():
    """A row padded far past the recent window evicts its newest pads before the layer, deciding at
    the window's edge, reaches them: the layer finds columns by position, so the first real token of
    every row is a sink and no pad is."""
    model = planted_model(layers=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 128, (2, 24 + 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # row 1: 20 pads, 4 real prompt tokens
    sel = AutoSinks(punct_ids=[QUIET], max_sinks=4)
    cache = SinkCache(policy="evict", budget=20, window=8, score="keynorm", sinks=sel, model=model)
    held_while_deciding_pads = []
    with torch.no_grad():
        model(input_ids=ids[:, :24], attention_mask=mask[:, :24], past_key_values=cache, use_cache=True)
        for i in range(24, 36):
            model(input_ids=ids[:, i : i + 1], attention_mask=mask[:, : i + 1], past_key_values=cache, use_cache=True)
            lay = cache.layers[0]
            if lay.marked <= 20:
                held_while_deciding_pads.append(sorted({int(p) for p in lay.pos[1, 0]}))
    # the case this is about: row 1 had already evicted pad columns the layer had not decided yet
    assert any(set(range(17, 20)) - set(h) for h in held_while_deciding_pads)
    for lay in cache.layers:
        assert lay.marked == 35 - 8 > 20  # decided up to the window's edge at the last update
        for row, first_real in ((0, 0), (1, 20)):
            held_sinks = {int(p) for p in lay.pos[row][lay.sink[row]].flatten()}
            assert first_real in held_sinks
            assert all(p >= first_real for p in held_sinks)
    cache.detach()


def test_a_candidate_stops_collecting_after_obs_window_queries_across_paths():
    """A decode-time candidate collects exactly ``obs_window`` queries, also when the fast path
    took the first ones and a general-path forward (here a two-token chunk) comes after: counts
    and shares equal a run that never took the fast path."""
    model = planted_model(layers=2)
    ids = ids_without_sink(52, seed=7)
    ids[0, 40] = QUIET  # a decode-time candidate at column 40

    def run(fast: bool):
        sel = AutoSinks(threshold=0.05, punct_ids=[SINK, QUIET], obs_window=8, context=32)
        sel.fast_decode = fast
        cache = SinkCache(policy="quantize", bits=2, window=64, group_size=16, sinks=sel, model=model)
        feed(model, cache, ids[:, :40], 40)
        feed(model, cache, ids[:, 40:49], 1)  # column 40, then the 8 queries it collects
        feed(model, cache, ids[:, 49:51], 2)  # a general-path forward
        st = sel.state[0]
        out = (int(st.cnt[40 - st.lo]), st.sum[:, :, 40 - st.lo].clone())
        cache.detach()
        return out

    (c_fast, s_fast), (c_slow, s_slow) = run(True), run(False)
    assert c_slow == 8 and c_fast == 8
    torch.testing.assert_close(s_fast, s_slow, rtol=1e-5, atol=1e-7)
