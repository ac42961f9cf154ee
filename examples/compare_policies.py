"""Compare a few cache policies on one long prompt: KV bytes and agreement with the full cache.

Run:  python examples/compare_policies.py [--model smollm2-135m] [--max-new-tokens 32] [--repeat 6]
Shows: the same greedy generation under several SinkCache policies, side by side.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap

from sinkcache import SinkCache
from sinkcache.models import load_model

POLICIES = {
    "full": dict(policy="full"),
    "streamingllm (evict, first 4)": dict(policy="evict", budget=256, window=128, sinks="first", n_first=4),
    "evict + auto sinks": dict(policy="evict", budget=256, window=128, sinks="auto"),
    "kivi 2-bit (no sinks)": dict(policy="quantize", bits=2, window=32, sinks="none"),
    "kivi 2-bit + auto sinks": dict(policy="quantize", bits=2, window=32, sinks="auto"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=6, help="paragraphs of context (about 100 tokens each)")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    # Offline, deterministic context: the docstring of a standard-library module.
    context = textwrap.dedent(inspect.getdoc(textwrap) or "") * 1
    context = "\n\n".join([context] * max(1, args.repeat // 2))
    question = "In one sentence, what is this module for?"
    msgs = [{"role": "user", "content": f"{context}\n\n{question}"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n_prompt = inputs["input_ids"].shape[1]
    print(f"prompt: {n_prompt} tokens")

    ref = None
    print(f"{'policy':32s} {'KV bytes':>10s} {'ratio':>6s} {'agree':>6s}  answer")
    for name, kw in POLICIES.items():
        cache = SinkCache(model=model, tokenizer=tok, **kw)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
        gen = out[0, n_prompt:]
        if ref is None:
            ref, ref_bytes = gen, cache.memory_bytes()
        n = min(len(gen), len(ref))
        agree = float((gen[:n] == ref[:n]).float().mean()) if n else 1.0
        mem = cache.memory_bytes()
        text = tok.decode(gen, skip_special_tokens=True).replace("\n", " ")[:60]
        print(f"{name:32s} {mem:10d} {ref_bytes / mem:6.2f} {agree:6.2f}  {text}")


if __name__ == "__main__":
    main()
