"""What an attention scorer costs per decode step, against the key-norm scorer (issue 15's cost row).

Real model (default smollm2-135m), one torch thread, a ``--context``-token prompt of seeded random
tokens, ``policy="evict"`` at ``--budget`` tokens with the default sinks; then ``--steps`` greedy
decode steps per cache. The first decode step (which evicts the prompt down to the budget) is
reported apart; steady steps are the median over the rest. Scorers are timed in turn within each
repeat (keynorm, tova, snapkv, h2o, keynorm, ...), so load changes hit all of them alike; ratios
are medians over repeats of (scorer / keynorm) in the same repeat.

    python evals/scorer_bench.py --out evals/results/bench/scorers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def run(model, ids: torch.Tensor, score: str, budget: int, steps: int) -> dict:
    from sinkcache import SinkCache

    cache = SinkCache("evict", budget=budget, score=score, model=model)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    cfg = cache.describe()
    cache.detach()
    return {"first_step_s": times[0], "steady_step_s": statistics.median(times[1:]), "score": cfg["score"], "budget": cfg["budget"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--steps", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scores", default="keynorm,tova,snapkv,h2o")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from sinkcache.models import load_model

    model, _tok = load_model(a.model)
    model.eval()
    ids = torch.randint(10, model.config.vocab_size - 10, (1, a.context), generator=torch.Generator().manual_seed(0))
    scores = a.scores.split(",")
    rows: dict[str, list[dict]] = {s: [] for s in scores}
    for _ in range(a.repeats):
        for s in scores:
            rows[s].append(run(model, ids, s, a.budget, a.steps))
    base = rows[scores[0]]
    out = {"model": a.model, "context": a.context, "budget": a.budget, "steps": a.steps, "repeats": a.repeats,
           "threads": 1, "load_avg_at_end": os.getloadavg(), "scores": {}}
    print(f"{a.model}, {a.context}-token prompt, evict budget {a.budget}, {a.steps} steps x {a.repeats} repeats")
    print(f"{'score':8} {'steady ms':>10} {'x keynorm':>10} {'first step ms':>14} {'x keynorm':>10}")
    for s in scores:
        steady = statistics.median(r["steady_step_s"] for r in rows[s])
        ratio = statistics.median(r["steady_step_s"] / b["steady_step_s"] for r, b in zip(rows[s], base))
        first = statistics.median(r["first_step_s"] for r in rows[s])
        fratio = statistics.median(r["first_step_s"] / b["first_step_s"] for r, b in zip(rows[s], base))
        out["scores"][s] = {"steady_step_ms": 1e3 * steady, "steady_vs_keynorm": ratio, "first_step_ms": 1e3 * first,
                            "first_vs_keynorm": fratio, "built": {"score": rows[s][0]["score"], "budget": rows[s][0]["budget"]}}
        print(f"{s:8} {1e3 * steady:10.1f} {ratio:10.3f} {1e3 * first:14.1f} {fratio:10.3f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
