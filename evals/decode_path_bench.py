"""Micro-benchmark of the decode path: what one decode step costs the cache, without the model.

SmolLM2-135M shapes (30 layers, 3 KV heads, head_dim 64, 9 query heads), random keys/values, a
``--context``-token history. Per step and cache: the 30 ``update`` calls alone, and ``update`` +
SDPA over what ``update`` returned (what a decode step adds on top of the weights). Each
implementation and cache is timed in turn, step by step (A B C A B C ...), medians reported.

``--compare-with DIR``: also time a second copy of the package, importable from ``DIR`` as
``sinkcache_old`` (e.g. a copy of ``sinkcache/`` from an earlier commit, renamed), in the same
process and interleaved with the current one. The design note in docs/performance.md was written
from this script's output.

    python evals/decode_path_bench.py --context 4096 --out evals/results/bench/decode_path.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

B, H, D, QH, LAYERS = 1, 3, 64, 9, 30


def make_caches(pkg, context: int, budget: int) -> dict:
    from transformers import DynamicCache

    specs = {
        "dynamic": lambda: DynamicCache(),
        "int4": lambda: pkg.SinkCache("quantize", bits=4, sinks="first"),
        "int2": lambda: pkg.SinkCache("quantize", bits=2, sinks="first"),
        f"evict{budget}": lambda: pkg.SinkCache("evict", budget=budget, sinks="first"),
    }
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, mk in specs.items():
        c = mk()
        for layer in range(LAYERS):
            c.update(torch.randn(B, H, context, D, generator=g), torch.randn(B, H, context, D, generator=g), layer)
        for layer in range(LAYERS):  # one decode step: runs the compression pending from the prompt
            c.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), layer)
        out[name] = c
    return out


def step(cache, attend: bool) -> float:
    q = torch.randn(B, QH, 1, D)
    new = [(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)) for _ in range(LAYERS)]
    t0 = time.perf_counter()
    for layer, (k1, v1) in enumerate(new):
        k, v = cache.update(k1, v1, layer)
        if attend:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return time.perf_counter() - t0


def attention_designs(context: int, bits: int, reps: int) -> list[dict]:
    """One layer's decode attention over a quantized history, three ways, against DynamicCache's cat + SDPA.

    * ``dequant + SDPA`` (what QuantizedLayer does): dequantise the whole body into one buffer, one SDPA call;
    * ``blockwise``: dequantise 512/1024-token blocks into a small reused buffer (stays in cache), exact
      softmax over all scores, then values block by block: what a custom attention function would do;
    * ``on codes``: never dequantise: scores = (q * key scale) . codes + q . key zero per group, output =
      (p * value scale) @ codes + sum(p * value zero). Fewest passes, but a different rounding order.
    """
    from sinkcache.quant import (
        QuantizedKeys,
        QuantizedValues,
        dequantize_keys,
        dequantize_values,
        quantize_keys,
        quantize_values,
        unpack,
    )

    g, t, rep = 64, context, QH // H
    gen = torch.Generator().manual_seed(0)
    k, v, q = torch.randn(B, H, t, D, generator=gen), torch.randn(B, H, t, D, generator=gen), torch.randn(B, QH, 1, D, generator=gen)
    qk, qv = quantize_keys(k, bits, g), quantize_values(v, bits, D)
    scale = D**-0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def dynamic():
        return sdpa(q, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2), enable_gqa=True)

    def dequant():
        kk, vv = torch.empty(B, H, t, D), torch.empty(B, H, t, D)
        dequantize_keys(qk, bits, g, kk)
        dequantize_values(qv, bits, D, vv)
        return sdpa(q, kk, vv, enable_gqa=True)

    def blockwise(blk: int):
        qq = q.view(B, H, rep, D)
        scores = torch.empty(B, H, rep, t)
        kb, vb = torch.empty(B, H, blk, D), torch.empty(B, H, blk, D)
        for s0 in range(0, t, blk):
            gs = slice(s0 // g, (s0 + blk) // g)
            dequantize_keys(QuantizedKeys(qk.codes[:, :, s0 : s0 + blk], qk.scale[:, :, gs], qk.zero[:, :, gs]), bits, g, kb)
            torch.matmul(qq, kb.transpose(-1, -2), out=scores[..., s0 : s0 + blk])
        p = torch.softmax(scores * scale, -1)
        out = torch.zeros(B, H, rep, D)
        for s0 in range(0, t, blk):
            ts = slice(s0, s0 + blk)
            dequantize_values(QuantizedValues(qv.codes[:, :, ts], qv.scale[:, :, ts], qv.zero[:, :, ts]), bits, D, vb)
            out.add_(torch.matmul(p[..., ts], vb))
        return out.view(B, QH, 1, D)

    def on_codes():
        qq, ng = q.view(B, H, rep, D), t // g
        ck = unpack(qk.codes, bits).to(torch.float32).view(B, H, ng, g, D)
        s = torch.matmul(qq.unsqueeze(2) * qk.scale.unsqueeze(3), ck.transpose(-1, -2))
        s = s + (qq.unsqueeze(2) * qk.zero.unsqueeze(3)).sum(-1, keepdim=True)
        p = torch.softmax(s.permute(0, 1, 3, 2, 4).reshape(B, H, rep, t) * scale, -1)
        out = torch.matmul(p * qv.scale.view(B, H, 1, t), unpack(qv.codes, bits).to(torch.float32))
        return (out + (p * qv.zero.view(B, H, 1, t)).sum(-1, keepdim=True)).view(B, QH, 1, D)

    fns = {
        "DynamicCache: cat + SDPA": dynamic,
        "dequant + SDPA (chosen)": dequant,
        "blockwise 1024, custom attention": lambda: blockwise(1024),
        "blockwise 512, custom attention": lambda: blockwise(512),
        "attention on codes (no dequant)": on_codes,
    }
    ref = dequant()
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.inference_mode():
        for _ in range(reps):
            for n, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
    return [
        dict(design=n, ms_per_layer=1e3 * statistics.median(times[n]), max_abs_diff_vs_chosen=float((fns[n]() - ref).abs().max()))
        for n in fns
    ]


def scaling(contexts: list[int], budget: int, steps: int) -> list[dict]:
    """Cache + attention ms per decode step at each context: DynamicCache vs evict vs int4/int2, interleaved."""
    import sinkcache

    rows = []
    for ctx in contexts:
        caches = make_caches(sinkcache, ctx, budget)
        times: dict[str, list[float]] = {n: [] for n in caches}
        with torch.inference_mode():
            for _ in range(steps):
                for n, c in caches.items():
                    times[n].append(step(c, attend=True))
        rows += [dict(context=ctx, cache=n, update_sdpa_ms=1e3 * statistics.median(t)) for n, t in times.items()]
        del caches
    return rows


def plot_scaling(rows: list[dict], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["cache"] for r in rows):
        pts = sorted((r["context"], r["update_sdpa_ms"]) for r in rows if r["cache"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axvline(budget, color="grey", linestyle=":", label=f"eviction budget ({budget})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens held before the step)")
    ax.set_ylabel("cache update + SDPA, ms per decode step (30 layers)")
    ax.set_title("Decode cost that depends on context (model weights excluded)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-with", default=None, help="directory holding an older copy as package sinkcache_old")
    ap.add_argument("--design-reps", type=int, default=80, help="repetitions of the attention-design comparison")
    ap.add_argument("--scaling", default="512,1024,2048,4096,8192,16384", help="contexts of the scaling sweep ('' to skip)")
    ap.add_argument("--out", default=None, help="write the JSON here (and a .md next to it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import sinkcache

    pkgs = {"current": sinkcache}
    if args.compare_with:
        sys.path.insert(0, args.compare_with)
        pkgs["before"] = importlib.import_module("sinkcache_old")
    load0 = os.getloadavg()
    caches = {(p, n): c for p, pkg in pkgs.items() for n, c in make_caches(pkg, args.context, args.budget).items()}
    times: dict = {(key, attend): [] for key in caches for attend in (False, True)}
    with torch.inference_mode():
        for _ in range(args.steps):
            for key, cache in caches.items():
                for attend in (False, True):
                    times[(key, attend)].append(step(cache, attend))
    rows = []
    for (pkg, name), _ in caches.items():
        rows.append(
            dict(
                impl=pkg,
                cache=name,
                update_ms=1e3 * statistics.median(times[((pkg, name), False)]),
                update_sdpa_ms=1e3 * statistics.median(times[((pkg, name), True)]),
            )
        )
    designs = attention_designs(args.context, 4, args.design_reps)
    scale_rows = scaling([int(c) for c in args.scaling.split(",") if c], args.budget, args.steps)
    meta = dict(
        context=args.context, layers=LAYERS, kv_heads=H, head_dim=D, steps=args.steps, threads=args.threads,
        torch=torch.__version__, cpus=os.cpu_count(), load_before=[round(x, 2) for x in load0],
        load_after=[round(x, 2) for x in os.getloadavg()],
    )
    lines = [
        f"Decode-path cost per step, {LAYERS} layers x [{B}, {H}, {args.context}, {D}] history, fp32, "
        f"{args.threads} thread(s), {args.steps} steps (median); shared machine, load {meta['load_before']} -> "
        f"{meta['load_after']}",
        "",
        "| implementation | cache | update ms/step | update + SDPA ms/step |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['impl']} | {r['cache']} | {r['update_ms']:.1f} | {r['update_sdpa_ms']:.1f} |" for r in rows]
    lines += [
        "",
        f"One layer's int4 decode attention over {args.context} quantized tokens (9 query heads, GQA 3), "
        f"{args.design_reps} interleaved reps, median:",
        "",
        "| design | ms / layer | max abs diff vs chosen |",
        "|---|---:|---:|",
    ]
    lines += [f"| {d['design']} | {d['ms_per_layer']:.3f} | {d['max_abs_diff_vs_chosen']:.1e} |" for d in designs]
    if scale_rows:
        names = list(dict.fromkeys(r["cache"] for r in scale_rows))
        lines += [
            "",
            "Scaling: cache update + SDPA, ms per decode step (30 layers), interleaved per context, median:",
            "",
            "| context | " + " | ".join(names) + " |",
            "|---:|" + "---:|" * len(names),
        ]
        for ctx in dict.fromkeys(r["context"] for r in scale_rows):
            vals = {r["cache"]: r["update_sdpa_ms"] for r in scale_rows if r["context"] == ctx}
            lines.append(f"| {ctx} | " + " | ".join(f"{vals[n]:.1f}" for n in names) + " |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows, "attention_designs": designs, "scaling": scale_rows}, indent=1))
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        if scale_rows:
            plot_scaling(scale_rows, args.budget, out.with_name("decode_path_scaling.png"))


if __name__ == "__main__":
    main()
