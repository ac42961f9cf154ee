"""Cheaper quantized caches by design: what larger key groups and a smaller exact window buy in
KV bytes, and what they cost in bits per byte.

For each bit width the default layout (``group_size=64``, ``window=128``) is the baseline; each
candidate changes only the key group size and/or the exact window (sinks stay ``first``, the
default). Two measurements per config:

* **bytes** at a 4,096-token prompt + 16 decoded tokens, 16-bit (bfloat16) keys/values with the
  model's KV shapes (layers, kv heads, head_dim read from its config), read back from the built
  cache's ``memory_bytes()``; reported as "x smaller than a 16-bit DynamicCache";
* **accuracy** through the lm-eval entry point: the offline streaming-perplexity task
  (``sinkcache_docstring_ppl``, 30 documents fixed before any result), per-document bits per byte,
  each candidate against its bit width's default as a paired bootstrap 95% interval.

    python evals/kv_bytes_eval.py smollm2-135m --out evals/results/kv_bytes/smollm2-135m

Resumable: a config whose JSON exists is not re-run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Same task and per-document bits per byte as the sink ablation (this script's folder is on sys.path).
from sink_ablation_eval import TASK, per_doc_bpb

#: (name, bits, group_size, window); the first of each bit width is its baseline (the defaults).
CONFIGS = (
    ("int4", 4, 64, 128),
    ("int4-g128-w32", 4, 128, 32),
    ("int4-g128-w0", 4, 128, 0),
    ("int2", 2, 64, 128),
    ("int2-g128-w32", 2, 128, 32),
    ("int2-g128-w0", 2, 128, 0),
)


def bytes_at(model_config, bits: int, group: int, window: int, context: int = 4096, decode: int = 16) -> dict:
    """Bytes a ``SinkCache`` holds vs a 16-bit dense cache, built with the model's KV shapes (random bf16 keys/values)."""
    import torch

    from sinkcache import SinkCache

    layers = model_config.num_hidden_layers
    heads = model_config.num_key_value_heads
    dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    cache = SinkCache("quantize", bits=bits, group_size=group, window=window, sinks="first")
    g = torch.Generator().manual_seed(0)
    for t in [context] + [1] * decode:
        for layer in range(layers):
            k = torch.randn(1, heads, t, dim, generator=g).to(torch.bfloat16)
            cache.update(k, torch.randn(1, heads, t, dim, generator=g).to(torch.bfloat16), layer)
    held = int(cache.memory_bytes())
    dense = 2 * layers * heads * (context + decode) * dim * 2
    return {"bytes": held, "dense16": dense, "x16": dense / held, "built": dict(cache.describe())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="documents (default: all 30)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from sinkcache.compare.stats import paired_difference, verdict
    from sinkcache.evaluation import run_eval
    from sinkcache.models import load_model

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(args.model, progress=False)
    reports, sizes = {}, {}
    for name, bits, group, window in CONFIGS:
        path = args.out / f"{name}.json"
        if not path.exists():
            run_eval(args.model, [TASK], limit=args.limit, output=path, log_samples=True, progress=False,
                     policy="quantize", bits=bits, group_size=group, window=window, sinks="first")
        reports[name] = json.loads(path.read_text())
        sizes[name] = bytes_at(model.config, bits, group, window)

    docs = {name: per_doc_bpb(r) for name, r in reports.items()}
    lines = [
        f"# Cheaper quantized layouts: {args.model}",
        "",
        f"`python evals/kv_bytes_eval.py {args.model} --out {args.out}`. Bytes: 4,096-token prompt + 16 tokens, "
        "16-bit keys/values with the model's KV shapes, read back from `memory_bytes()`. Accuracy: task "
        f"`{TASK}`, {len(next(iter(docs.values())))} documents, bits per byte (lower is better); difference vs the "
        "bit width's default layout: per-document paired bootstrap, 95% interval, 10,000 resamples.",
        "",
        "| config (built: bits, group, window) | x smaller than 16-bit (4k) | bits/byte | vs default | verdict |",
        "|---|---:|---:|---|---|",
    ]
    summary = {}
    for name, bits, _group, _window in CONFIGS:
        base = f"int{bits}"
        built = reports[name]["config"]["cache"]
        diff = paired_difference(docs[base], docs[name]) if name != base else None
        row = {
            "built": built,
            "bytes_4k": sizes[name],
            "bits_per_byte": reports[name]["scores"][TASK]["bits_per_byte,none"],
            "vs_default": diff.to_dict() if diff else None,
            "verdict": verdict(diff, higher_is_better=False) if diff else None,
        }
        summary[name] = row
        lines.append(
            f"| {name} ({built.get('bits')}, {built.get('group_size')}, {built.get('window')}) | "
            f"{sizes[name]['x16']:.2f} | {row['bits_per_byte']:.4f} | {diff if diff else '-'} | {row['verdict'] or '-'} |"
        )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
