"""Multi-turn chat that reuses one evicting SinkCache: memory stays flat as the chat grows.

Run:  python examples/streaming_chat.py [--model smollm2-135m] [--turns 5] [--budget 96]
Shows: one cache carried across generate() calls (each call feeds only the new turn), with
eviction keeping sinks + the recent window within a fixed budget.
"""

from __future__ import annotations

import argparse

from sinkcache import SinkCache
from sinkcache.models import load_model

QUESTIONS = [
    "Name three primary colors.",
    "Which of them is the color of the sky?",
    "Give one fruit of that color.",
    "What did I ask you first?",
    "Summarize our chat in one sentence.",
    "Thank you. Say goodbye.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    cache = SinkCache(policy="evict", budget=args.budget, window=args.budget // 2, sinks="first", n_first=4, model=model)
    messages: list[dict] = []
    ids = None
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        # generate() feeds only the ids the cache has not seen; positions continue from get_seq_length().
        out = model.generate(**ids, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
        reply = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        st = cache.stats()
        print(f"[turn {turn + 1}] user: {messages[-2]['content']}")
        print(f"           bot: {reply.strip()[:100]}")
        print(f"           tokens seen {st['tokens_seen']:5d}  held {st['tokens_held']:4d}  KV {st['memory_bytes']:8d} bytes")


if __name__ == "__main__":
    main()
