"""What one cache's decode step costs against another's, interleaved step by step.

For a pair ``A:B`` of ``sinkcache bench`` cache names (e.g. ``int2:int2-refine``), both caches
prefill the same ``--context``-token prompt (``--prompt random``: seeded random tokens;
``--prompt text``: held-out standard-library docstrings, natural text whose greedy continuation
contains punctuation, so ``sinks="auto"`` scores decode-time candidates), then decode greedily in
lockstep: a step of A, a step of B, a step of A, ... Adjacent steps see the same machine load, so
the ratio of each adjacent pair (B / A) cancels most of what a shared 2-core machine adds; the
report is the median of those ratios with a 95% bootstrap interval over steps, and the first
decode step (where a compressing cache quantizes the whole prompt, one forward late) is reported
apart. Each repeat starts from a fresh prefill; the configuration of both caches is read back
from the built objects (``describe()``).

    python evals/decode_step_bench.py --pairs int2:int2-refine,int4:int4-refine --context 2048 \\
        --steps 128 --repeats 2 --out evals/results/bench/refine_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def _step(model, cache, tok: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model(input_ids=tok, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    return nxt, time.perf_counter() - t0


def lockstep(model, ids: torch.Tensor, spec_a, spec_b, steps: int, tokenizer=None) -> dict:
    """Prefill both caches, then ``steps`` decode steps alternating A, B; per-step seconds and the
    tokens each decoded. ``tokenizer`` is passed to the caches as ``sinkcache bench`` does: with it,
    ``sinks="auto"`` treats generated punctuation as decode-time sink candidates."""
    from sinkcache.bench import built_config

    caches, toks = [], []
    with torch.no_grad():
        for spec in (spec_a, spec_b):
            cache = spec.build(model, tokenizer)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            caches.append(cache)
            toks.append(out.logits[:, -1:].argmax(-1))
        times: list[list[float]] = [[], []]
        decoded: list[list[int]] = [[], []]
        for _ in range(steps):
            for i in (0, 1):
                decoded[i].append(int(toks[i]))
                toks[i], dt = _step(model, caches[i], toks[i])
                times[i].append(dt)
    built = [built_config(c) for c in caches]
    for c in caches:
        if hasattr(c, "detach"):
            c.detach()
    return {"a_s": times[0], "b_s": times[1], "built": built, "tokens": decoded}


def prompt_ids(kind: str, tok, vocab_size: int, context: int) -> torch.Tensor:
    """``[1, context]`` prompt ids: seeded random tokens, or held-out docstring text."""
    if kind == "random":
        return torch.randint(10, vocab_size - 10, (1, context), generator=torch.Generator().manual_seed(0))
    if kind == "text":
        from sinkcache.calibration import token_chunks

        return torch.tensor([token_chunks(tok, "heldout", context, n=1)[0]])
    raise SystemExit(f"--prompt {kind!r}: allowed: random, text")


def _ci(ratios: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def write_json(path: str | None, obj: dict) -> None:
    """Write a result file (creating its folder) and say so; nothing when ``path`` is ``None``."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
        print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", default="int2:int2-refine,int4:int4-refine", help="A:B,... (sinkcache bench names)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=int, default=1024, help="tokens per layer for evict/hybrid specs")
    ap.add_argument("--prompt", default="random", choices=("random", "text"), help="random tokens or held-out docstring text")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from sinkcache.bench import default_specs
    from sinkcache.models import load_model

    specs = {s.name: s for s in default_specs(budget=a.budget)}
    pairs = [tuple(p.split(":")) for p in a.pairs.split(",")]
    for p in pairs:
        bad = [n for n in p if n not in specs]
        if len(p) != 2 or bad:
            raise SystemExit(f"--pairs {':'.join(p)!r}: need A:B of known caches; unknown {bad}; allowed: {', '.join(specs)}")
    from sinkcache.sinks.punct import punctuation_token_ids

    model, tok = load_model(a.model)
    model.eval()
    ids = prompt_ids(a.prompt, tok, model.config.vocab_size, a.context)
    punct = set(punctuation_token_ids(tok))
    load_before = os.getloadavg()
    out: dict = {"model": a.model, "context": a.context, "prompt": a.prompt, "steps": a.steps, "repeats": a.repeats, "threads": 1,
                 "torch": torch.__version__, "load_avg_before": load_before, "pairs": {},
                 "command": " ".join(["python", "evals/decode_step_bench.py", *sys.argv[1:]])}
    print(f"{a.model}, {a.context}-token {a.prompt} prompt, {a.steps} lockstep decode steps x {a.repeats} repeats, 1 thread")
    print(f"{'A':>12} {'B':>14} {'A ms':>7} {'B ms':>7} {'B/A median':>11} {'95% CI':>16} {'first B/A':>10}")
    for name_a, name_b in pairs:
        runs = [lockstep(model, ids, specs[name_a], specs[name_b], a.steps, tokenizer=tok) for _ in range(a.repeats)]
        ratios = [b / x for r in runs for x, b in zip(r["a_s"][1:], r["b_s"][1:])]
        first = statistics.median(r["b_s"][0] / r["a_s"][0] for r in runs)
        lo, hi = _ci(ratios)
        ms_a = 1e3 * statistics.median(t for r in runs for t in r["a_s"][1:])
        ms_b = 1e3 * statistics.median(t for r in runs for t in r["b_s"][1:])
        med = statistics.median(ratios)
        out["pairs"][f"{name_a}:{name_b}"] = {
            "a": name_a, "b": name_b, "steady_ms_a": ms_a, "steady_ms_b": ms_b, "b_over_a_median": med,
            "b_over_a_ci95": [lo, hi], "n_step_pairs": len(ratios), "first_step_b_over_a": first,
            "built_a": runs[0]["built"][0], "built_b": runs[0]["built"][1],
            # how many decoded tokens were punctuation (decode-time sink candidates for sinks="auto")
            "punct_tokens_b": sum(t in punct for r in runs for t in r["tokens"][1]),
            "tokens_b": sum(len(r["tokens"][1]) for r in runs),
            "text_b": tok.decode(runs[0]["tokens"][1]),
        }
        print(f"{name_a:>12} {name_b:>14} {ms_a:7.1f} {ms_b:7.1f} {med:11.3f} [{lo:.3f}, {hi:.3f}] {first:10.2f}")
    out["load_avg_after"] = os.getloadavg()
    write_json(a.out, out)


if __name__ == "__main__":
    main()
