"""4-bit weights (bitsandbytes) plus a 2-bit sink-aware KV cache, against the fp32 baseline.

Run:  python examples/weights_and_cache_compressed.py [--model smollm2-135m] [--max-new-tokens 24]
Shows: bitsandbytes 4-bit weight loading on CPU (transformers 5.23) combined with SinkCache, and
the total memory (weights + KV) of both setups. Needs `pip install bitsandbytes`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BitsAndBytesConfig, DynamicCache

from sinkcache import SinkCache
from sinkcache.models import load_model


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def kv_bytes(cache) -> int:
    if isinstance(cache, SinkCache):
        return cache.memory_bytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run(model, tok, cache, max_new_tokens: int) -> str:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    base, tok = load_model(args.model, dtype="float32")
    dyn = DynamicCache(config=base.config)
    base_answer = run(base, tok, dyn, args.max_new_tokens)
    base_total = weight_bytes(base) + kv_bytes(dyn)
    del base

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model, tok = load_model(args.model, dtype="float32", quantization_config=bnb)
    cache = SinkCache(policy="quantize", bits=2, window=16, group_size=32, model=model, tokenizer=tok)
    answer = run(model, tok, cache, args.max_new_tokens)
    total = weight_bytes(model) + kv_bytes(cache)

    print(f"fp32 weights + DynamicCache : {base_total / 2**20:8.1f} MiB  -> {base_answer!r}")
    print(f"bnb 4-bit + 2-bit SinkCache : {total / 2**20:8.1f} MiB  -> {answer!r}")
    print(f"KV: {kv_bytes(dyn)} -> {kv_bytes(cache)} bytes; total memory ratio {base_total / total:.2f}x")


if __name__ == "__main__":
    main()
