"""SinkCache container: construction errors, accounting, model attachment."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import prompt
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer, QuantizedLayer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sinks="bogus"), "sinks='bogus'"),
        (dict(policy="evict", budget=100, window=96, sinks="first", n_first=8), "budget=100 is smaller than window=96"),
        (dict(policy="evict", budget=100, window=90, max_sinks=20, sinks="auto"), "budget=100"),
        (dict(sinks="punct"), "needs tokenizer"),
        (dict(n_first=-1, sinks="first"), "n_first=-1"),
        (dict(max_sinks=-3, sinks="auto"), "max_sinks=-3"),
        (dict(sinks="first", n_first=2, max_sinks=5), "max_sinks=5"),
        (dict(policy="quantize", bits=3), "bits=3"),
        (dict(policy="hybrid", bits=2, budget=300, window=128, max_sinks=8, sinks="auto"), "budget=300"),
        (dict(max_sinks=4), "sinks='first' keeps exactly n_first=1"),  # the default sinks="first"
        (dict(profile={"bogus": 1}, sinks="auto"), "cannot be combined with sinks='auto'"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkCache(**kwargs)


def test_model_and_config_together_rejected(tiny):
    m = tiny("llama")
    with pytest.raises(ValueError, match="not both"):
        SinkCache(model=m, config=m.config)


def test_layer_types_follow_config(tiny):
    m = tiny("gemma3")
    c = SinkCache(policy="evict", budget=64, window=16, config=m.config)
    kinds = [type(layer) for layer in c.layers]
    assert kinds == [DynamicSlidingWindowLayer, EvictingLayer, DynamicSlidingWindowLayer, EvictingLayer]
    c = SinkCache(policy="quantize", bits=2, model=m)
    assert isinstance(c.layers[1], QuantizedLayer) and isinstance(c.layers[0], DynamicSlidingWindowLayer)


def test_unsupported_layer_type_rejected(tiny):
    cfg = copy.deepcopy(tiny("llama").config)
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="'linear_attention' layer"):
        SinkCache(config=cfg)


@pytest.mark.parametrize("bits, min_ratio", [(8, 2.5), (4, 4.5), (2, 7.0)])
def test_memory_is_bit_packed(tiny, bits, min_ratio):
    m = tiny("llama")  # float32 model, head_dim 32
    ids = prompt(520)
    dyn = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, past_key_values=dyn)
    c = SinkCache(policy="quantize", bits=bits, window=0, group_size=32, sinks="none", model=m)
    with torch.no_grad():
        m(ids, past_key_values=c)
    dense = sum(layer.keys.nbytes + layer.values.nbytes for layer in dyn.layers)
    assert c.dense_bytes() == dense
    mem = c.memory_bytes()
    # fp32 model: codes are bits/32 of dense, fp32 scale+zero add 2*4 bytes per 32 elements for each of K and V.
    assert dense / mem >= min_ratio
    codes = sum(layer.k_codes.nbytes + layer.v_codes.nbytes for layer in c.layers)
    # 512 of the 520 tokens left the (empty) window in whole groups; each element takes bits/32 of its fp32 size.
    assert codes * 32 * 520 == dense * 512 * bits


def test_full_policy_bytes_equal_dynamic_cache(tiny):
    m = tiny("qwen2")
    ids = prompt(40)
    c = SinkCache(policy="full", model=m)
    with torch.no_grad():
        m(ids, past_key_values=c)
    assert c.memory_bytes() == c.dense_bytes() > 0
    st = c.stats()
    assert st["tokens_seen"] == st["tokens_held"] == 40 and st["compression_ratio"] == 1.0


def test_stats_fields(tiny):
    m = tiny("llama")
    c = SinkCache(policy="evict", budget=32, window=8, sinks="first", n_first=2, model=m)
    m.generate(prompt(50), past_key_values=c, max_new_tokens=5, do_sample=False)
    st = c.stats()
    assert st["tokens_seen"] == 54 and st["tokens_held"] == 32  # the last generated token is never fed back
    assert st["sinks_per_layer"] == [2.0, 2.0]
    assert st["memory_bytes"] < st["dense_bytes"]


def test_reuse_with_other_model_is_rejected(tiny):
    a, b = tiny("llama"), tiny("llama_mha")
    c = SinkCache(policy="quantize", bits=4)
    with torch.no_grad():
        a(prompt(10), past_key_values=c)
        with pytest.raises(ValueError, match="different model"):
            b(prompt(1), past_key_values=c)


def test_layer_count_mismatch_is_rejected(tiny):
    m = tiny("llama")
    cfg = copy.deepcopy(m.config)
    cfg.num_hidden_layers = 1
    c = SinkCache(config=cfg)
    with torch.no_grad(), pytest.raises(ValueError, match="built for 1 layers"):
        m(prompt(4), past_key_values=c)


def test_hook_released_with_cache(tiny):
    m = tiny("llama")
    before = len(m._forward_pre_hooks)
    c = SinkCache(model=m, sinks="first")
    assert len(m._forward_pre_hooks) == before + 1
    c.detach()
    assert len(m._forward_pre_hooks) == before
    c = SinkCache(model=m, sinks="first")
    del c
    gc.collect()
    with torch.no_grad():
        m(prompt(3))  # a dead cache's hook removes itself on the next forward
    assert len(m._forward_pre_hooks) == before


def test_deepcopy_continues_identically(tiny):
    m = tiny("llama")
    c = SinkCache(policy="quantize", bits=4, window=8, group_size=8, model=m)
    with torch.no_grad():
        m(prompt(40), past_key_values=c)
        d = copy.deepcopy(c)
        nxt = prompt(1, seed=5)
        a = m(nxt, past_key_values=c).logits
        b = m(nxt, past_key_values=d).logits
    assert torch.equal(a, b)


# ---- what the model already rules out is an error at construction, not a silent no-op ----


def test_window_beyond_the_models_context_is_an_error(tiny):
    model = tiny("llama")  # max_position_embeddings=4096
    with pytest.raises(ValueError, match=r"window=1000000000 exceeds the model's context \(max_position_embeddings=4096\)"):
        SinkCache("quantize", window=10**9, model=model)
    with pytest.raises(ValueError, match="window=5000 exceeds"):
        SinkCache("quantize", window=5000, config=model.config)
    SinkCache("quantize", window=4096, model=model)  # a window the model can fill is fine


def test_group_size_is_checked_against_the_heads_at_construction(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="group_size=7 does not divide head_dim"):
        SinkCache("quantize", group_size=7, model=model)
    with pytest.raises(ValueError, match="group_size=7 does not divide head_dim"):
        SinkCache("hybrid", budget=512, group_size=7, config=model.config)


def test_an_empty_prompt_is_named(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="the prompt is empty"), torch.no_grad():
        model(input_ids=torch.zeros(1, 0, dtype=torch.long), past_key_values=SinkCache(model=model), use_cache=True)


@pytest.mark.parametrize("kw", [dict(policy="quantize", bits=2, window=4, group_size=4), dict(policy="evict", budget=16, window=4)])
def test_a_batch_without_model_is_refused_not_silently_wrong(tiny, kw):
    """Without model= the cache cannot see left padding; a batch must fail loudly, and work with model=."""
    model = tiny("llama")
    ids = prompt(20, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match=r"a batch of 2 rows needs SinkCache\(model=model\)"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=SinkCache(**kw), use_cache=True)
    with torch.no_grad():  # one row without model=, and the batch with it, both run
        model(input_ids=ids[:1], past_key_values=SinkCache(**kw), use_cache=True)
        model(input_ids=ids, attention_mask=mask, past_key_values=SinkCache(**kw, model=model), use_cache=True)
        model(input_ids=ids, attention_mask=mask, past_key_values=SinkCache("full"), use_cache=True)  # nothing compressed
