"""Sink benchmark: perplexity of held-out text through a 2-bit quantizing SinkCache, per sink choice.

Protocol (chunked streaming): each sample is ``--length`` tokens of stdlib-docstring text
(:mod:`sinkcache.calibration`). It is fed ``--chunk`` tokens per forward through one cache; the
predictions made from the first chunk are not scored (nothing is compressed yet), every later
prediction is. Inside a forward the chunk's own tokens are exact; everything older has been
quantized (``--bits``, KIVI layout, ``--group-size``) except the ``--window`` newest tokens and the
tokens the sink selector keeps at full precision.

Sink choices (``--configs``):

=================  ============================================================================
full               no compression (reference)
none               plain KIVI, no sinks
first              the first token
punct              the first token + every punctuation/newline token (``sinks="punct"``)
auto               the first token + keys measured by ``AutoSinks`` (``--threshold``)
auto-local         ``AutoSinks`` scoring each forward's keys in that forward's softmax alone (no older
                   keys in the denominator, no uniform-share check: ``context=0, bank_size=0,
                   min_ratio=0``; the detector before issue 4's fix), ``--local-threshold``
random-matched     the first token + as many *random* tokens as ``auto`` kept, in the same layer,
                   kv head and block (so equal memory)
oracle-matched     as many tokens as ``auto`` kept per (layer, kv head), chosen as those that receive
                   the most attention in total from all later queries of the whole sample (measured
                   beforehand with full precision: an upper bound for attention-based selection)
punct-matched      the first token + as many random *punctuation* tokens as ``auto`` kept
first-window       the first token, window enlarged by auto's mean sinks per (layer, kv head):
                   the same memory spent on recency instead
profile            ``ProfileSinks`` with ``--profile`` (default: the shipped profile)
=================  ============================================================================

``random-matched``/``punct-matched``/``first-window``/``oracle-matched`` replay counts recorded
from the ``auto`` run on the same sample, so that one must be listed before them.

Calibrating the detector threshold (calibration split only)::

    python evals/sink_benchmark.py --model smollm2-135m --split calibration --samples 6 \\
        --configs none,first,auto,random-matched --thresholds 0.02,0.05,0.1,0.2,0.3

Evaluating (held-out split)::

    python evals/sink_benchmark.py --model smollm2-135m --split heldout --samples 8 --threshold 0.1

Timing of detection (prefill of ``--length`` tokens, medians of ``--repeats``)::

    python evals/sink_benchmark.py --model smollm2-135m --timing --repeats 5

Writes a JSON file (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from sinkcache import SinkCache
from sinkcache.analysis import attention_pass
from sinkcache.calibration import token_chunks
from sinkcache.sinks import AutoSinks, ProfileSinks, SinkSelector, load_profile, punctuation_token_ids
from sinkcache.sinks.auto import DEFAULT_THRESHOLD

ALL_CONFIGS = (
    "full", "none", "first", "punct", "auto", "auto-local", "random-matched", "punct-matched",
    "first-window", "profile", "oracle-matched",
)


# ---------------------------------------------------------------------------------------------
# selectors used only by the benchmark


class RecordingAutoSinks(AutoSinks):
    """``AutoSinks`` that records how many non-first sinks it marked per (layer, block, kv head)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts: dict[tuple[int, int, int], torch.Tensor] = {}

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        m = super().mark(layer_idx, cols, ctx, keys, attention)
        first = self.first_mask(cols, ctx, keys.shape[0]).to(m.device)
        extra = (m & ~first).expand(keys.shape[0], keys.shape[1], cols.numel()).sum(-1)
        self.counts[(layer_idx, int(cols[0]), int(cols[-1]))] = extra.cpu()
        return m


def oracle_scores(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per layer ``[kv_heads, T]``: attention each key receives in total from all later queries of
    ``ids`` (full-precision eager pass; query heads of a kv group averaged; the first token zeroed)."""
    scores: dict[int, torch.Tensor] = {}

    def on_layer(idx, module, weights, hidden):
        hq, t = weights.shape[1], weights.shape[-1]
        hk = module.k_proj.out_features // module.head_dim
        s = weights[0].view(hk, hq // hk, t, t).mean(1).sum(1)  # [Hk, T]
        s[:, 0] = 0.0
        scores[idx] = s

    attention_pass(model, ids, on_layer)
    return scores


class OracleSinks(SinkSelector):
    """First token + per (layer, kv head) the ``k`` keys with the highest oracle score, ``k`` being
    the total that a recorded run kept there."""

    name = "oracle-matched"

    def __init__(self, scores: dict[int, torch.Tensor], counts: dict) -> None:
        super().__init__(n_first=1, max_sinks=None)
        totals: dict[int, torch.Tensor] = {}
        for (layer, _, _), c in counts.items():
            totals[layer] = totals.get(layer, 0) + c[0]  # [Hk], batch row 0
        self.chosen: dict[int, torch.Tensor] = {}
        for layer, sc in scores.items():
            k = totals.get(layer)
            mask = torch.zeros_like(sc, dtype=torch.bool)
            if k is not None:
                for h in range(sc.shape[0]):
                    kk = int(k[h]) if k.numel() == sc.shape[0] else int(k.float().mean())
                    if kk:
                        mask[h, sc[h].topk(min(kk, sc.shape[1])).indices] = True
            self.chosen[layer] = mask

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        first = self.first_mask(cols, ctx, keys.shape[0]).to(keys.device)
        ch = self.chosen.get(layer_idx)
        if ch is None or int(cols.max()) >= ch.shape[1]:
            return first
        picked = ch[:, cols.cpu()].unsqueeze(0).to(keys.device)  # [1, Hk, C]
        if picked.shape[1] != keys.shape[1]:
            picked = picked.any(1, keepdim=True)
        return first | picked


class MatchedSinks(SinkSelector):
    """First token(s) + exactly the recorded number of other tokens per (layer, block, kv head),
    drawn at random from the block (``pool_ids=None``) or from its tokens with ids in ``pool_ids``."""

    needs_ids = True

    def __init__(self, counts: dict, pool_ids=None, seed: int = 0, name: str = "matched") -> None:
        super().__init__(n_first=1, max_sinks=None)
        self.counts = counts
        self.pool_ids = None if pool_ids is None else torch.tensor(sorted(pool_ids), dtype=torch.long)
        self.seed = seed
        self.name = name
        self.shortfall = 0  # sinks the pool could not supply

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        b, h, c = keys.shape[0], keys.shape[1], cols.numel()
        first = self.first_mask(cols, ctx, b).to(keys.device)
        want = self.counts.get((layer_idx, int(cols[0]), int(cols[-1])))
        out = first.expand(b, h, c).clone()
        if want is None:
            return out
        pad = ctx.pad_counts(b, cols.device)
        ids = ctx.ids_at(cols, b)
        for bi in range(b):
            ok = (cols >= pad[bi]) & ~first[bi, 0]
            if self.pool_ids is not None:
                if ids is None:
                    return out
                ok = ok & torch.isin(ids[bi], self.pool_ids)
            pool = torch.nonzero(ok).flatten()
            for hi in range(h):
                k = int(want[bi, hi])
                if k == 0:
                    continue
                g = torch.Generator().manual_seed(self.seed + zlib.crc32(f"{layer_idx}/{int(cols[0])}/{bi}/{hi}".encode()))
                take = pool[torch.randperm(pool.numel(), generator=g)[:k]]
                self.shortfall += max(0, k - take.numel())
                out[bi, hi, take] = True
        return out


# ---------------------------------------------------------------------------------------------
# evaluation


def stream_nll(model, ids: torch.Tensor, cache, chunk: int) -> tuple[float, int]:
    """Summed NLL and count of the predictions made after the first chunk, feeding ``chunk`` tokens per forward."""
    t = ids.shape[1]
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, t, chunk):
            end = min(start + chunk, t)
            out = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True)
            if start == 0:
                continue
            last = min(end, t - 1)  # position p predicts p + 1
            if last <= start:
                continue
            logits = out.logits[0, : last - start].float()
            target = ids[0, start + 1 : last + 1]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += last - start
    return nll, n


def make_cache(kind: str, model, tok, args, state: dict[str, Any]) -> SinkCache:
    q = dict(policy="quantize", bits=args.bits, window=args.window, group_size=args.group_size)
    if kind == "full":
        return SinkCache(policy="full", model=model)
    if kind == "none":
        return SinkCache(**q, sinks="none", model=model)
    if kind == "first":
        return SinkCache(**q, sinks="first", model=model)
    if kind == "punct":
        return SinkCache(**q, sinks="punct", tokenizer=tok, model=model)
    if kind == "auto":
        sel = RecordingAutoSinks(threshold=state["threshold"], obs_window=args.obs_window)
        state["auto_selector"] = sel
        return SinkCache(**q, sinks=sel, model=model)
    if kind == "auto-local":
        sel = RecordingAutoSinks(
            threshold=args.local_threshold, obs_window=args.obs_window, context=0, bank_size=0, min_ratio=0.0
        )
        sel.name = "auto-local"
        return SinkCache(**q, sinks=sel, model=model)
    if kind in ("random-matched", "punct-matched", "first-window"):
        rec = state.get("auto_selector")
        if rec is None:
            raise SystemExit(f"config {kind!r} needs 'auto' earlier in --configs")
        if kind == "first-window":
            extra = state["auto_mean_sinks"]
            return SinkCache(**dict(q, window=args.window + int(round(extra))), sinks="first", model=model)
        pool = state["punct_ids"] if kind == "punct-matched" else None
        sel = MatchedSinks(rec.counts, pool_ids=pool, seed=args.seed, name=kind)
        state[f"{kind}_selector"] = sel
        return SinkCache(**q, sinks=sel, model=model)
    if kind == "profile":
        return SinkCache(**q, sinks=ProfileSinks(state["profile"]), model=model)
    if kind == "oracle-matched":
        rec = state.get("auto_selector")
        if rec is None:
            raise SystemExit("config 'oracle-matched' needs 'auto' earlier in --configs")
        return SinkCache(**q, sinks=OracleSinks(oracle_scores(model, state["ids"]), rec.counts), model=model)
    raise SystemExit(f"unknown config {kind!r}; known: {', '.join(ALL_CONFIGS)}")


def _compressed_sinks(cache: SinkCache) -> float:
    """Mean sinks held per (layer, kv head) over the compressed layers."""
    st = cache.stats()
    vals = [v for v, layer in zip(st["sinks_per_layer"], cache.layers, strict=True) if not getattr(layer, "is_sliding", False)]
    return sum(vals) / len(vals) if vals else 0.0


def run_configs(model, tok, samples: list[list[int]], configs: list[str], args, threshold: float, state: dict) -> dict:
    state["threshold"] = threshold
    res: dict[str, dict[str, Any]] = {k: {"nll": 0.0, "n": 0, "memory": [], "dense": [], "sinks": [], "seconds": 0.0} for k in configs}
    for si, sample in enumerate(samples):
        ids = torch.tensor([sample])
        state["ids"] = ids
        for kind in configs:
            cache = make_cache(kind, model, tok, args, state)
            t0 = time.perf_counter()
            nll, n = stream_nll(model, ids, cache, args.chunk)
            r = res[kind]
            r["seconds"] += time.perf_counter() - t0
            r["nll"] += nll
            r["n"] += n
            r["memory"].append(cache.memory_bytes())
            r["dense"].append(cache.dense_bytes())
            r["sinks"].append(_compressed_sinks(cache) if kind != "full" else 0.0)
            if kind == "auto":
                state["auto_mean_sinks"] = max(0.0, r["sinks"][-1] - 1.0)
            cache.detach()
            if args.verbose:
                print(
                    f"  [{si + 1}/{len(samples)}] {kind:<15} ppl {math.exp(nll / max(n, 1)):8.3f}  "
                    f"mem {r['memory'][-1] / 2**20:6.2f} MiB  sinks/(layer,head) {r['sinks'][-1]:6.2f}  "
                    f"{time.perf_counter() - t0:5.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    out = {}
    for kind, r in res.items():
        out[kind] = {
            "ppl": round(math.exp(r["nll"] / max(r["n"], 1)), 4),
            "nll": round(r["nll"] / max(r["n"], 1), 5),
            "tokens_scored": r["n"],
            "memory_bytes": int(statistics.mean(r["memory"])),
            "dense_bytes": int(statistics.mean(r["dense"])),
            "sinks_per_layer_head": round(statistics.mean(r["sinks"]), 3),
            "seconds": round(r["seconds"], 1),
        }
        if kind in ("random-matched", "punct-matched"):
            out[kind]["shortfall"] = state[f"{kind}_selector"].shortfall
    return out


def table(rows: dict[str, dict[str, Any]], ref: str | None = "first") -> str:
    lines = [
        "| config | ppl | Δ vs first | memory (MiB) | vs none | sinks / (layer, kv head) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base_mem = rows.get("none", {}).get("memory_bytes")
    ref_ppl = rows.get(ref, {}).get("ppl") if ref else None
    for kind, r in rows.items():
        d = f"{r['ppl'] - ref_ppl:+.3f}" if ref_ppl is not None else ""
        rel = f"{r['memory_bytes'] / base_mem:.3f}x" if base_mem else ""
        lines.append(
            f"| {kind} | {r['ppl']:.3f} | {d} | {r['memory_bytes'] / 2**20:.3f} | {rel} | {r['sinks_per_layer_head']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# timing


def timing(model, tok, args, profile) -> dict[str, Any]:
    """Prefill time of one ``--length``-token prompt and time of ``--decode-steps`` single-token
    forwards after it, per sink choice; configs interleaved (A B C A B C ...), medians of ``--repeats``."""
    ids = torch.tensor([token_chunks(tok, "heldout", args.length + args.decode_steps, n=1)[0]])
    prompt, rest = ids[:, : args.length], ids[:, args.length :]
    q = dict(policy="quantize", bits=args.bits, window=args.window, group_size=args.group_size)
    punct = punctuation_token_ids(tok)
    makers = {
        "first": lambda: SinkCache(**q, sinks="first", model=model),
        "auto": lambda: SinkCache(
            **q, sinks=AutoSinks(threshold=args.threshold, obs_window=args.obs_window, punct_ids=punct), model=model
        ),
        "punct": lambda: SinkCache(**q, sinks="punct", tokenizer=tok, model=model),
        "profile": lambda: SinkCache(**q, sinks=ProfileSinks(profile), model=model),
    }
    pre: dict[str, list[float]] = {k: [] for k in makers}
    dec: dict[str, list[float]] = {k: [] for k in makers}
    with torch.no_grad():
        model(input_ids=prompt[:, :64])  # warm-up
        for _ in range(args.repeats):
            for k, mk in makers.items():  # interleaved, so load changes hit all configs alike
                cache = mk()
                t0 = time.perf_counter()
                model(input_ids=prompt, past_key_values=cache, use_cache=True)
                t1 = time.perf_counter()
                for i in range(rest.shape[1]):
                    model(input_ids=rest[:, i : i + 1], past_key_values=cache, use_cache=True)
                t2 = time.perf_counter()
                pre[k].append(t1 - t0)
                dec[k].append(t2 - t1)
                cache.detach()
    mp = {k: statistics.median(v) for k, v in pre.items()}
    md = {k: statistics.median(v) for k, v in dec.items()}
    return {
        "prompt_tokens": int(prompt.shape[1]),
        "decode_steps": int(rest.shape[1]),
        "threads": torch.get_num_threads(),
        "prefill_median_seconds": {k: round(v, 3) for k, v in mp.items()},
        "decode_median_seconds": {k: round(v, 3) for k, v in md.items()},
        "prefill_all_seconds": {k: [round(x, 3) for x in v] for k, v in pre.items()},
        "decode_all_seconds": {k: [round(x, 3) for x in v] for k, v in dec.items()},
        "prefill_slowdown_vs_first": {k: round(v / mp["first"], 3) for k, v in mp.items()},
        "decode_slowdown_vs_first": {k: round(v / md["first"], 3) for k, v in md.items()},
        # median over repeats of (config / first in the same repeat): less exposed to load drift
        "prefill_paired_ratio": {k: round(statistics.median(a / f for a, f in zip(v, pre["first"])), 3) for k, v in pre.items()},
        "decode_paired_ratio": {k: round(statistics.median(a / f for a, f in zip(v, dec["first"])), 3) for k, v in dec.items()},
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", default="heldout", choices=("calibration", "heldout"))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--skip-samples", type=int, default=0, help="start at this sample of the split")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--local-threshold", type=float, default=0.05, help="threshold of auto-local")
    p.add_argument("--thresholds", default=None, help="comma list: sweep auto (and matched configs) over these")
    p.add_argument("--obs-window", type=int, default=32)
    p.add_argument("--configs", default="full,none,first,punct,auto,random-matched,punct-matched,profile")
    p.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is; 1 is fastest on a shared box)")
    p.add_argument("--timing", action="store_true", help="measure detection cost instead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=32, help="timing: single-token forwards after the prompt")
    p.add_argument("--out", default=None)
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sinkcache.models import load_model

    model, tok = load_model(args.model, progress=False)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    profile = None
    if "profile" in configs or args.timing:
        try:
            profile = load_profile(args.profile or args.model)
        except ValueError as exc:
            if args.timing:
                raise
            print(f"note: no profile ({exc}); skipping 'profile'", file=sys.stderr)
            configs = [c for c in configs if c != "profile"]
    result: dict[str, Any] = {
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("verbose", "out")},
        "torch": torch.__version__,
    }
    if args.timing:
        result["timing"] = timing(model, tok, args, profile)
        print(json.dumps(result["timing"], indent=1))
    else:
        n_total = args.samples + args.skip_samples
        samples = token_chunks(tok, args.split, args.length, n=n_total)[args.skip_samples :]
        if len(samples) < args.samples:
            print(f"note: only {len(samples)} samples available", file=sys.stderr)
        state: dict[str, Any] = {"profile": profile}
        if "punct-matched" in configs:
            state["punct_ids"] = punctuation_token_ids(tok)
        result["samples"] = len(samples)
        if args.thresholds:
            sweep = {}
            fixed = [c for c in configs if c in ("full", "none", "first", "punct", "profile", "auto-local")]
            varying = [c for c in configs if c not in fixed]
            if fixed:
                sweep["fixed"] = run_configs(model, tok, samples, fixed, args, args.threshold, state)
                print(table(sweep["fixed"]), flush=True)
            for th in [float(x) for x in args.thresholds.split(",")]:
                sweep[str(th)] = run_configs(model, tok, samples, varying, args, th, state)
                rows = dict(sweep.get("fixed", {}))
                rows.update(sweep[str(th)])
                print(f"\nthreshold {th}\n" + table(rows), flush=True)
            result["sweep"] = sweep
        else:
            result["results"] = run_configs(model, tok, samples, configs, args, args.threshold, state)
            print(table(result["results"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
