"""One short GPU check: SinkCache on CUDA (bf16) with a randomly initialised model of a real size.

No weights are needed: the model is built from a Llama-3.1-8B-shaped config (32 layers, 32 query
heads, 8 kv heads, head_dim 128) with random weights, which is enough for what is checked:

1. **equality**: greedy tokens of ``SinkCache(policy="full")``, of ``quantize`` whose exact window
   holds everything and of ``evict`` whose budget holds everything equal ``DynamicCache``'s;
2. **decode ratios**: steady decode ms/token (first step apart, ``torch.cuda.synchronize`` around
   every step) of int4 / int2 / evict against ``DynamicCache``, interleaved A B A B, per context;
3. **bytes**: KV bytes each cache holds vs the bf16 ``DynamicCache`` (read back from the caches).

    python evals/gpu_check.py --out evals/results/gpu/h200.json          # on a GPU (a few minutes)
    python evals/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json   # the CPU smoke test CI runs

Everything it records (device name, dtype, torch/transformers versions, the built caches'
``describe()``) is read back from the objects that ran.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
)
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
)
CACHES = {
    "int4": dict(policy="quantize", bits=4),
    "int2": dict(policy="quantize", bits=2),
    "evict": dict(policy="evict", budget=1024, score="keynorm"),
}


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def make_cache(name: str, model, total: int):
    from transformers import DynamicCache

    from sinkcache import SinkCache

    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "full":
        return SinkCache(policy="full", model=model)
    if name == "quantize-holds-all":
        return SinkCache(policy="quantize", bits=2, window=total, model=model)
    if name == "evict-holds-all":
        return SinkCache(policy="evict", budget=total, score="keynorm", model=model)
    return SinkCache(model=model, **CACHES[name])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode(model, cache, ids: torch.Tensor, n: int, device: str) -> tuple[list[int], list[float]]:
    """Prefill ``ids`` and greedy-decode ``n`` tokens; tokens and per-step seconds (synchronised)."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    toks, steps = [int(tok)], []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        toks.append(int(tok))
    return toks, steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tiny", action="store_true", help="a 4-layer toy model (the CPU smoke test)")
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {args.device} but CUDA is not available here (use --device cpu --tiny)")
    dtype = getattr(torch, args.dtype)
    contexts = [int(c) for c in args.contexts.split(",")]
    model = build_model(TINY if args.tiny else LLAMA_8B, args.device, dtype)
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    result: dict = {
        "device": str(param.device),
        "device_name": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(param.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model_shape": {k: getattr(model.config, k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")},
        "equality": {},
        "decode": [],
        "command": "python evals/gpu_check.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    with torch.inference_mode():
        # 1. equality with DynamicCache where the cache holds everything exactly
        ids = torch.randint(0, vocab, (1, 256), generator=g).to(param.device)
        ref, _ = decode(model, make_cache("dynamic", model, 0), ids, 16, args.device)
        for name in ("full", "quantize-holds-all", "evict-holds-all"):
            cache = make_cache(name, model, 256 + 17)
            toks, _ = decode(model, cache, ids, 16, args.device)
            result["equality"][name] = {"equal": toks == ref, "built": dict(cache.describe())}
        # 2./3. decode ratios and bytes, baseline interleaved (A B A B) per context
        for ctx in contexts:
            ids = torch.randint(0, vocab, (1, ctx), generator=g).to(param.device)
            for name in CACHES:
                base_ms, ms, row = [], [], {"context": ctx, "cache": name}
                for _ in range(args.reps):
                    dyn = make_cache("dynamic", model, 0)
                    _, s = decode(model, dyn, ids, args.decode_tokens, args.device)
                    base_ms.append(1e3 * statistics.median(s[1:]))
                    dense = sum(t.numel() * t.element_size() for layer in dyn.layers for t in (layer.keys, layer.values))
                    del dyn
                    cache = make_cache(name, model, 0)
                    _, s = decode(model, cache, ids, args.decode_tokens, args.device)
                    ms.append(1e3 * statistics.median(s[1:]))
                    row.update(first_step_ms=1e3 * s[0], kv_bytes=int(cache.memory_bytes()), dense_bytes=dense, built=dict(cache.describe()))
                    del cache
                row.update(ms_per_token=statistics.median(ms), baseline_ms_per_token=statistics.median(base_ms))
                row["decode_x"] = row["baseline_ms_per_token"] / row["ms_per_token"]  # > 1: faster than DynamicCache
                row["kv_x"] = row["dense_bytes"] / row["kv_bytes"]
                result["decode"].append(row)
                print(f"ctx {ctx:6d} {name:6s} {row['ms_per_token']:7.2f} ms/token vs {row['baseline_ms_per_token']:7.2f} "
                      f"(x{row['decode_x']:.2f})  KV {row['kv_x']:.2f}x smaller", flush=True)
    result["all_equal"] = all(v["equal"] for v in result["equality"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"equality with DynamicCache: {result['equality'] and {k: v['equal'] for k, v in result['equality'].items()}}")
    print(f"wrote {args.out}")
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
