"""Streaming perplexity far past the model's context: full cache vs bounded evicting caches.

Feeds held-out text (Python standard-library docstrings, produced offline) through the model in
chunks, carrying one cache, and records perplexity per 1k-token window, KV bytes and process RSS.
SmolLM2-135M was trained with 8,192 positions; the full cache keeps growing and its query-key
distances leave the trained range, while ``positions="shifted"`` eviction (StreamingLLM) keeps
every distance within the budget and memory flat.

Run:  python evals/stream_benchmark.py [--tokens 20480] [--budget 1024] [--out evals/results/streaming]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm
from transformers import DynamicCache

from sinkcache import SinkCache
from sinkcache.calibration import split_text
from sinkcache.models import load_model


def configs(budget: int) -> dict[str, dict | None]:
    half = budget // 2
    # The full cache runs last so its growing memory does not inflate the others' RSS readings.
    return {
        "evict true positions, first 4": dict(policy="evict", budget=budget, window=half, sinks="first", n_first=4),
        "evict shifted, no sinks": dict(policy="evict", budget=budget, window=half, sinks="none", positions="shifted"),
        "evict shifted, first 4 (StreamingLLM)": dict(
            policy="evict", budget=budget, window=half, sinks="first", n_first=4, positions="shifted"
        ),
        "full (DynamicCache)": None,
    }


def stream(model, ids: torch.Tensor, cache, chunk: int, window: int, desc: str) -> dict:
    """Teacher-forced NLL per ``window`` tokens, KV bytes and RSS at each window boundary."""
    proc = psutil.Process(os.getpid())
    nll_sum, n_tok, rows = 0.0, 0, []
    prev_logit = None
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[1], chunk), desc=desc, leave=False):
            piece = ids[:, start : start + chunk]
            pos = torch.arange(start, start + piece.shape[1]).view(1, -1)
            logits = model(piece, past_key_values=cache, position_ids=pos).logits.float()
            lp = torch.log_softmax(logits, dim=-1)
            # Next-token NLL inside the chunk, plus the first token predicted from the previous chunk.
            nll = -lp[0, :-1].gather(-1, piece[0, 1:].unsqueeze(-1)).sum().item()
            count = piece.shape[1] - 1
            if prev_logit is not None:
                nll += -prev_logit[piece[0, 0]].item()
                count += 1
            prev_logit = lp[0, -1]
            nll_sum += nll
            n_tok += count
            end = start + piece.shape[1]
            if end % window == 0 or end == ids.shape[1]:
                if isinstance(cache, SinkCache):
                    kv = cache.memory_bytes()
                else:
                    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                rows.append(
                    {
                        "tokens": end,
                        "ppl": math.exp(nll_sum / max(n_tok, 1)),
                        "kv_bytes": kv,
                        "rss_mb": proc.memory_info().rss / 2**20,
                    }
                )
                nll_sum, n_tok = 0.0, 0
    return {"windows": rows, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--window", type=int, default=1024, help="tokens per perplexity window")
    ap.add_argument("--out", default="evals/results/streaming")
    ap.add_argument("--only", nargs="*", help="run only these config names")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    ids = tok(split_text("heldout"), return_tensors="pt")["input_ids"][:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"held-out text has only {ids.shape[1]} tokens; asked for {args.tokens}")
    results = {}
    for name, kw in configs(args.budget).items():
        if args.only and name not in args.only:
            continue
        cache = DynamicCache(config=model.config) if kw is None else SinkCache(model=model, tokenizer=tok, **kw)
        results[name] = stream(model, ids, cache, args.chunk, args.window, name)
        last = results[name]["windows"][-1]
        print(f"{name:40s} final-window ppl {last['ppl']:9.2f}  KV {last['kv_bytes'] / 2**20:8.1f} MiB  "
              f"RSS {last['rss_mb']:7.0f} MiB  {results[name]['seconds']:.0f} s")
        del cache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "max_position_embeddings": model.config.max_position_embeddings,
        "tokens": args.tokens,
        "budget": args.budget,
        "chunk": args.chunk,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    names = list(results)
    lines = [
        f"# Streaming perplexity, {args.model}, {args.tokens} tokens (trained positions: "
        f"{model.config.max_position_embeddings}), budget {args.budget}",
        "",
        "Perplexity per 1k-token window / KV MiB at the end of the window.",
        "",
        "| tokens | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for i, row in enumerate(results[names[0]]["windows"]):
        cells = []
        for n in names:
            w = results[n]["windows"][i]
            cells.append(f"{w['ppl']:.2f} / {w['kv_bytes'] / 2**20:.1f}")
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS (MiB): " + ", ".join(f"{n}: {max(w['rss_mb'] for w in results[n]['windows']):.0f}" for n in names)]
    lines += ["", f"Machine: {meta['machine']}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
