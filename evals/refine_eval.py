"""Sinks that pay: int2 designs against no-sink KIVI and equal-byte controls, with intervals.

Protocol (fixed before any result): ``--texts`` chunks of ``--context`` + ``--scored`` + 1 tokens
cut from one split of the standard-library docstrings (:mod:`sinkcache.calibration`; the
calibration split is for choosing, the held-out split for reporting). Each config builds a
``SinkCache`` with ``model=`` (so hooks run as they do for users), prefills ``--context`` tokens,
then feeds the next ``--scored`` tokens ``--chunk`` at a time; every token of those chunks is
scored (teacher forcing). Rows are batched ``--batch`` at a time (equal lengths, no padding).

Each config's bytes are the KV it holds in the compressed (full-attention) layers after every
scored forward, averaged over them, counted two ways: as measured in the model dtype (``memory_bytes``) and as the same tensors would take
with 16-bit floating parts (codes and indices unchanged; the deployment case, and the one that
makes exact tokens cheapest, i.e. the harder accounting for refinement). What ran is read back
from the cache (``describe()``).

Configs are names: ``full``; ``<sinks>[-w<window>][-r<share>[-<score>]]`` with sinks ``none``,
``first`` or ``auto``, score ``attention`` (default), ``keynorm`` or ``random`` (the control: the
same share refined, chosen at random; a test-only ranking, not a library option). E.g.
``first-r0.1``, ``first-w48``, ``none-r0.1``, ``first-r0.1-random``.

    python evals/refine_eval.py smollm2-135m --split heldout --out evals/results/refine/smollm2-135m \\
        --configs full,none,first,first-r0.1,first-w48,first-r0.1-random

Resumable: each config's per-text results are a JSON file under ``--out``; existing ones are
reused. ``summary.md`` reports perplexity, the share of the none->full gap closed (bootstrap over
texts), bytes vs ``none``, and paired per-text differences of mean NLL against chosen baselines.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch


def parse_config(name: str, bits: int, window: int, group_size: int = 64) -> tuple[dict[str, Any] | None, str | None]:
    """``(SinkCache kwargs, refine score)``; ``(None, None)`` for ``full``. Raises on a bad name."""
    if name == "full":
        return None, None
    parts = name.split("-")
    if parts[0] not in ("none", "first", "auto"):
        raise ValueError(f"config {name!r}: sinks {parts[0]!r} is not one of none, first, auto")
    kw: dict[str, Any] = dict(policy="quantize", bits=bits, window=window, group_size=group_size, sinks=parts[0])
    score = None
    for p in parts[1:]:
        if p.startswith("w") and p[1:].isdigit():
            kw["window"] = int(p[1:])
        elif p in ("attention", "keynorm", "random") and "refine" in kw:
            score = p
        elif p.startswith("r") and p[1:].replace(".", "", 1).isdigit():
            kw["refine"] = float(p[1:])
            score = "attention"
        else:
            raise ValueError(f"config {name!r}: cannot read {p!r}")
    return kw, score


def build_cache(model, tokenizer, name: str, bits: int, window: int, group_size: int, seed: int):
    from transformers import DynamicCache

    from sinkcache import SinkCache
    from sinkcache.layers import QuantizedLayer
    from sinkcache.refine import Refinement

    kw, score = parse_config(name, bits, window, group_size)
    if kw is None:
        return DynamicCache()
    if score is not None:
        # "random" is ranked below; the library refines it by key norm (no hooks) until then.
        kw["refine"] = Refinement(kw["refine"], score="keynorm" if score == "random" else score)
    cache = SinkCache(**kw, model=model, tokenizer=tokenizer)
    if score == "random":
        gen = torch.Generator().manual_seed(seed)
        for layer in cache.layers:
            if isinstance(layer, QuantizedLayer):
                layer.__class__ = _random_layer_class()
                layer._gen = gen
    return cache


@functools.lru_cache(maxsize=1)
def _random_layer_class():
    from sinkcache.layers import QuantizedLayer

    class RandomRefineLayer(QuantizedLayer):
        """Control: the same share of each block refined, the tokens drawn at random."""

        _gen: torch.Generator

        def _block_salience(self, ck: torch.Tensor, n: int) -> torch.Tensor:
            return torch.rand(ck.shape[0], ck.shape[1], n, generator=self._gen).to(ck.device)

    return RandomRefineLayer


def held_bytes(cache) -> tuple[int, int]:
    """Bytes held now in the layers a ``SinkCache`` compresses (every full-attention layer; Gemma's
    sliding layers, which no config touches, are left out), pending window included:
    ``(in the model dtype, with 16-bit floating parts)``."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from sinkcache.layers import CompressingLayer

    real = b16 = 0
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer) or getattr(layer, "is_sliding", False):
            continue
        if isinstance(layer, CompressingLayer):
            tensors = [getattr(layer, n) for n in layer._batched]
        else:
            tensors = [layer.keys, layer.values] if getattr(layer, "is_initialized", False) else []
        for t in tensors:
            real += t.numel() * t.element_size()
            b16 += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return real, b16


def run_config(model, tokenizer, texts: torch.Tensor, name: str, args) -> dict:
    n_txt = texts.shape[0]
    nll = torch.zeros(n_txt, dtype=torch.float64)
    byte_real = byte16 = 0.0
    steps = 0
    built = None
    for b0 in range(0, n_txt, args.batch):
        ids = texts[b0 : b0 + args.batch]
        cache = build_cache(model, tokenizer, name, args.bits, args.window, args.group_size, seed=args.seed + b0)
        with torch.no_grad():
            model(ids[:, : args.context], past_key_values=cache, use_cache=True)
            for s in range(args.context, args.context + args.scored, args.chunk):
                e = min(s + args.chunk, args.context + args.scored)
                out = model(ids[:, s:e], past_key_values=cache, use_cache=True)
                lp = out.logits.float().log_softmax(-1)
                tgt = ids[:, s + 1 : e + 1]
                nll[b0 : b0 + ids.shape[0]] += -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1).double()
                if b0 == 0:
                    r, h = held_bytes(cache)
                    byte_real += r / ids.shape[0]
                    byte16 += h / ids.shape[0]
                    steps += 1
        if built is None and hasattr(cache, "describe"):
            built = cache.describe()
            built["sinks_per_layer"] = cache.stats()["sinks_per_layer"]
            # How refined tokens were really ranked: the random control swaps the layers' class.
            ranked = {type(layer).__name__ for layer in cache.layers}
            built["refine_ranking"] = (
                "random" if "RandomRefineLayer" in ranked else (built["refine"] or {}).get("score")
            )
    return {
        "config": name,
        "built": built,
        "mean_nll": (nll / args.scored).tolist(),
        "bytes_per_row": byte_real / steps,
        "bytes16_per_row": byte16 / steps,
    }


def gap_closed(none: torch.Tensor, full: torch.Tensor, x: torch.Tensor) -> float:
    pn, pf, px = (math.exp(float(t.mean())) for t in (none, full, x))
    return (pn - px) / (pn - pf)


def bootstrap_gap(none, full, x, iters: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Share of the none->full perplexity gap that ``x`` closes, with a 95% bootstrap over texts."""
    n = none.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (iters, n), generator=g)
    pn, pf, px = (t[idx].mean(-1).exp() for t in (none, full, x))
    s = ((pn - px) / (pn - pf)).sort().values
    return gap_closed(none, full, x), float(s[int(0.025 * iters)]), float(s[int(0.975 * iters) - 1])


def summarize(results: dict[str, dict], args) -> str:
    from sinkcache.compare.stats import paired_difference, verdict

    t = {k: torch.tensor(v["mean_nll"], dtype=torch.float64) for k, v in results.items()}
    n = next(iter(t.values())).numel()
    lines = [
        f"# Sinks that pay: {args.model}, int{args.bits}, window {args.window}, group {args.group_size}, {args.split} split",
        "",
        f"`{args.command}`",
        "",
        f"{n} texts x {args.scored} scored tokens after a {args.context}-token context, chunks of {args.chunk}. "
        "Perplexity = exp(mean NLL over all scored tokens). Gap closed = (ppl_none - ppl) / (ppl_none - ppl_full), "
        "95% bootstrap over texts (10,000 resamples). Bytes: KV held in the compressed (full-attention) layers after "
        "each scored forward, averaged, per row; "
        "`x none (16-bit)` counts floating parts at 2 bytes (codes/indices as stored).",
        "",
        "| config | built (sinks, window, refine) | ppl | gap closed [95% CI] | KiB/row (model dtype) | x none | x none (16-bit) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    have_gap = "none" in t and "full" in t
    for k, v in results.items():
        b = v["built"] or {}
        desc = "-" if not b else f"{b.get('sinks')}, {b.get('window')}, {b.get('refine') and b['refine']['share']}"
        if b.get("refine"):
            ranking = b.get("refine_ranking") or ("random" if k.endswith("-random") else b["refine"]["score"])
            desc += f" {ranking}"
        ppl = math.exp(float(t[k].mean()))
        gap = "-"
        if have_gap and k not in ("none", "full"):
            g, lo, hi = bootstrap_gap(t["none"], t["full"], t[k])
            gap = f"{g:.3f} [{lo:.3f}, {hi:.3f}]"
        xr = x16 = "-"
        if "none" in results and v["built"] is not None:
            xr = f"{v['bytes_per_row'] / results['none']['bytes_per_row']:.3f}"
            x16 = f"{v['bytes16_per_row'] / results['none']['bytes16_per_row']:.3f}"
        lines.append(f"| {k} | {desc} | {ppl:.3f} | {gap} | {v['bytes_per_row'] / 1024:.0f} | {xr} | {x16} |")
    pairs = [p.split(":") for p in args.pairs.split(",") if p] if args.pairs else []
    if pairs:
        lines += [
            "",
            "Paired per-text differences of mean NLL (nats/token, b - a; negative = b better), 95% bootstrap:",
            "",
            "| a | b | b - a | verdict |",
            "|---|---|---|---|",
        ]
        for a, b in pairs:
            if a in t and b in t:
                d = paired_difference(t[a].tolist(), t[b].tolist())
                lines.append(f"| {a} | {b} | {d} | {verdict(d, higher_is_better=False)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", required=True, help="comma-separated config names (see module doc)")
    p.add_argument("--split", choices=("calibration", "heldout"), default="heldout")
    p.add_argument("--texts", type=int, default=24)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--scored", type=int, default=512)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", default="", help="a:b,... paired differences to report (b - a)")
    args = p.parse_args(argv)
    args.command = "python evals/refine_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)

    from sinkcache.calibration import token_chunks
    from sinkcache.models import load_model

    names = [c for c in args.configs.split(",") if c]
    for c in names:
        parse_config(c, args.bits, args.window, args.group_size)  # fail before loading anything
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    chunks = token_chunks(tok, args.split, args.context + args.scored + 1, n=args.texts)
    if len(chunks) < args.texts:
        raise SystemExit(f"--texts {args.texts}: the {args.split} split has only {len(chunks)} chunks of that length")
    texts = torch.tensor(chunks)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for c in names:
        path = args.out / f"{c}.json"
        if not path.exists():
            t0 = time.time()
            r = run_config(model, tok, texts, c, args)
            r.update(split=args.split, texts=args.texts, context=args.context, scored=args.scored, chunk=args.chunk,
                     seconds=round(time.time() - t0, 1))
            path.write_text(json.dumps(r, indent=1) + "\n")
            print(f"{c}: ppl {math.exp(sum(r['mean_nll']) / len(r['mean_nll'])):.3f} ({r['seconds']} s)", flush=True)
        results[c] = json.loads(path.read_text())
    md = summarize(results, args)
    (args.out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
