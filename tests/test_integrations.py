"""accelerate device maps and bitsandbytes-quantized weights under every policy."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DynamicCache

from sinkcache import SinkCache

POLICIES = [
    dict(policy="full"),
    dict(policy="evict", budget=24, window=8, sinks="first", n_first=2),
    dict(policy="quantize", bits=2, window=4, group_size=8, sinks="auto"),
    dict(policy="hybrid", bits=4, budget=64, window=4, group_size=8, max_sinks=2, sinks="auto"),
]


def test_device_map_model_keeps_tensors_on_arrival_device(tiny, tmp_path):
    pytest.importorskip("accelerate")
    src = tiny("llama")
    src.save_pretrained(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32).eval()
    m.generation_config.pad_token_id = 0
    ids = prompt(40)
    ref = m.generate(ids, past_key_values=DynamicCache(config=m.config), max_new_tokens=6, do_sample=False)
    for kw in POLICIES:
        cache = SinkCache(model=m, **kw)
        out = m.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
        assert out.shape == ref.shape
        for layer, module in zip(cache.layers, m.model.layers, strict=True):
            dev = next(module.parameters()).device
            stored = getattr(layer, "keys", None) if kw["policy"] in ("full", "evict") else layer.win_k
            assert stored.device == dev
        if kw["policy"] == "full":
            assert torch.equal(out, ref)


@pytest.mark.real_model
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_weights_with_every_policy(bits):
    pytest.importorskip("bitsandbytes")
    from sinkcache.models import load_model

    cfg = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32
    )
    model, tok = load_model("smollm2-135m", quantization_config=cfg, progress=False)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inputs["input_ids"].shape[1]
    for kw in POLICIES:
        cache = SinkCache(model=model, tokenizer=tok, **kw)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, do_sample=False)
        text = tok.decode(out[0, n:], skip_special_tokens=True)
        assert cache.get_seq_length() == out.shape[1] - 1  # every token but the last generated one was fed
        if kw["policy"] in ("full", "quantize"):
            # The prompt fits in the budget/window here, so the answer must survive.
            assert "Paris" in text, (kw, text)
