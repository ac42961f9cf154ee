"""Quickstart: generate with the default SinkCache (sink-aware 4-bit quantization).

Run:  python examples/quickstart.py [--model smollm2-135m] [--max-new-tokens 48]
Shows: loading a built-in model offline, passing SinkCache to generate(), reading cache.stats().
"""

from __future__ import annotations

import argparse
import json

from sinkcache import SinkCache
from sinkcache.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    cache = SinkCache(model=model, tokenizer=tok)  # policy="quantize", bits=4, sinks="first"
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    stats = cache.stats()
    stats.pop("sinks_per_layer")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
