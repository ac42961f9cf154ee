"""Where ``sinks="auto"`` decode time goes: hooks, bookkeeping, decode-time candidates.

Four int2 caches decode the same held-out text prompt in lockstep (a step of each, in turn), so
adjacent steps see the same load: ``sinks="first"`` (the baseline); ``auto`` with hooks installed
but the detector's work skipped (what the forward hooks and the ``q_proj`` catch cost); ``auto``
without a tokenizer's punctuation ids (prefill detection, the ring of recent keys and the
measurement rows, but no decode-time candidates); and ``auto`` as ``SinkCache(sinks="auto")``
builds it. Each row is the median over steps of (that cache's step / the ``first`` step just before
it) with a 95% bootstrap interval. Optionally a ``torch.profiler`` pass over the full detector
splits its time into tensor ops and the rest (Python), per step.

    python evals/detector_cost.py --steps 120 --profile --out evals/results/bench/auto/detector_cost.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step_bench import _ci, _step, prompt_ids, write_json  # noqa: E402


def _profile(model, cache, tok0: torch.Tensor, steps: int) -> dict:
    """Per decode step: the detector's whole time and its tensor ops' own time (profiler on)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from sinkcache.sinks.auto import AutoSinks

    orig = AutoSinks.on_forward

    def wrapped(self, *a):
        with record_function("DETECTOR"):
            return orig(self, *a)

    AutoSinks.on_forward = wrapped  # type: ignore[method-assign]
    try:
        t = tok0
        with torch.no_grad():
            for _ in range(5):
                t, _ = _step(model, cache, t)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    t, _ = _step(model, cache, t)
    finally:
        AutoSinks.on_forward = orig  # type: ignore[method-assign]
    ops: dict = defaultdict(lambda: [0.0, 0])

    def walk(e) -> None:
        for ch in e.cpu_children:
            ops[ch.name][0] += ch.self_cpu_time_total
            ops[ch.name][1] += 1
            walk(ch)

    total = 0.0
    for e in prof.events():
        if e.name == "DETECTOR":
            total += e.cpu_time_total
            walk(e)
    op_us = sum(v[0] for v in ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "steps": steps, "detector_ms_per_step": total / 1e3 / steps, "tensor_ops_ms_per_step": op_us / 1e3 / steps,
        "ops_per_step": sum(v[1] for v in ops.values()) / steps,
        "top_ops": {k: {"ms_per_step": v[0] / 1e3 / steps, "calls_per_step": v[1] / steps} for k, v in top},
        "note": "profiler on: its own per-op overhead inflates the non-op (Python) share",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from sinkcache import SinkCache
    from sinkcache.models import load_model
    from sinkcache.sinks.auto import AutoSinks
    from sinkcache.sinks.punct import punctuation_token_ids

    class HooksOnly(AutoSinks):
        """The detector's hooks installed, its work skipped."""

        def on_forward(self, idx, module, cache, hs, pe) -> None:
            return None

    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = prompt_ids("text", tok, model.config.vocab_size, a.context)
    punct = punctuation_token_ids(tok)
    kinds = {
        "first": lambda: SinkCache(policy="quantize", bits=2, sinks="first"),
        "hooks only": lambda: SinkCache(policy="quantize", bits=2, sinks=HooksOnly(punct_ids=punct), model=model, tokenizer=tok),
        "auto, no decode candidates": lambda: SinkCache(policy="quantize", bits=2, sinks=AutoSinks(punct_ids=None), model=model),
        "auto": lambda: SinkCache(policy="quantize", bits=2, sinks="auto", model=model, tokenizer=tok),
    }
    load_before = os.getloadavg()
    caches, toks = {}, {}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with torch.no_grad():
        for k, make in kinds.items():
            caches[k] = make()
            toks[k] = model(input_ids=ids, past_key_values=caches[k], use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(a.steps):
            for k in kinds:
                toks[k], dt = _step(model, caches[k], toks[k])
                times[k].append(dt)
    rows = {}
    for k in list(kinds)[1:]:
        r = [b / x for x, b in zip(times["first"][1:], times[k][1:], strict=True)]
        lo, hi = _ci(r)
        rows[k] = {"over_first_median": statistics.median(r), "ci95": [lo, hi], "n_step_pairs": len(r),
                   "steady_ms": 1e3 * statistics.median(times[k][1:]), "built": caches[k].stats()}
        print(f"{k:>28}: {rows[k]['over_first_median']:.3f} [{lo:.3f}, {hi:.3f}] x first")
    res = {"command": " ".join(["python", "evals/detector_cost.py", *sys.argv[1:]]), "model": "smollm2-135m", "prompt": "text",
           "context": a.context, "steps": a.steps, "threads": 1, "first_steady_ms": 1e3 * statistics.median(times["first"][1:]),
           "rows": rows, "load_avg_before": load_before, "torch": torch.__version__}
    for c in caches.values():
        if hasattr(c, "detach"):
            c.detach()
    if a.profile:
        cache = SinkCache(policy="quantize", bits=2, sinks="auto", model=model, tokenizer=tok)
        with torch.no_grad():
            t0 = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        res["profile"] = _profile(model, cache, t0, 20)
        cache.detach()
        p = res["profile"]
        print(f"profiled: detector {p['detector_ms_per_step']:.1f} ms/step, of which tensor ops {p['tensor_ops_ms_per_step']:.1f} "
              f"({p['ops_per_step']:.0f} ops/step)")
    res["load_avg_after"] = os.getloadavg()
    write_json(a.out, res)


if __name__ == "__main__":
    main()
