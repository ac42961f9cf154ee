"""The ``sinks="auto"`` detector of a past commit (A) against the working tree's (B), in one process.

Comparing two code versions by their ``auto``/``first`` ratios from separate runs mixes in the
run-to-run drift of a shared machine (those ratios moved by +-0.02 between runs of the same code).
Here both detectors decode the same prompt in lockstep (a step of A, a step of B, ...) with the same
cache settings, so each adjacent pair of steps sees the same load and the ratio B/A isolates the
detector's code. The base commit's ``sinkcache/sinks/auto.py`` and ``sinkcache/attention.py`` are
loaded from git as private modules (the rest of the package is shared); the greedy tokens of both
must agree, which is checked and recorded.

    python evals/detector_ab.py --base HEAD~1 --cache int2 --repeats 2 --out evals/results/bench/auto/ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step_bench import _ci, _step, prompt_ids, write_json  # noqa: E402

POLICIES = {"int2": dict(policy="quantize", bits=2), "evict": dict(policy="evict", budget=1024)}


def _load_old_detector(rev: str):
    """``AutoSinks`` as it was at ``rev`` (with that commit's ``attention.py``)."""
    root = Path(__file__).resolve().parent.parent
    show = lambda p: subprocess.run(["git", "show", f"{rev}:{p}"], cwd=root, check=True, capture_output=True, text=True).stdout  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="sinkcache-ab-"))
    (tmp / "attention.py").write_text(show("sinkcache/attention.py"))
    (tmp / "auto.py").write_text(show("sinkcache/sinks/auto.py").replace("from ..attention import", "from .._ab_attention import"))
    mod = None
    # registered as modules of the installed package, so the old detector's other relative imports
    # (its base class, first-token and punctuation helpers) are today's
    for name, file in (("sinkcache._ab_attention", "attention.py"), ("sinkcache.sinks._ab_auto", "auto.py")):
        spec = importlib.util.spec_from_file_location(name, tmp / file)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    assert mod is not None
    return mod.AutoSinks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision of detector A")
    ap.add_argument("--cache", default="int2", choices=sorted(POLICIES))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from sinkcache import SinkCache
    from sinkcache.models import load_model
    from sinkcache.sinks.auto import AutoSinks
    from sinkcache.sinks.punct import punctuation_token_ids

    old_cls = _load_old_detector(a.base)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = prompt_ids("text", tok, model.config.vocab_size, a.context)
    punct = punctuation_token_ids(tok)
    policy = POLICIES[a.cache]
    cap = 16 if policy["policy"] == "evict" else None  # what SinkCache's default cap gives at this budget
    load_before = os.getloadavg()
    ratios: list[float] = []
    ms: list[list[float]] = [[], []]
    same = True
    built = []
    for _ in range(a.repeats):
        caches, toks, dec = [], [], [[], []]
        with torch.no_grad():
            for cls in (old_cls, AutoSinks):
                c = SinkCache(**policy, sinks=cls(punct_ids=punct, max_sinks=cap), model=model, tokenizer=tok)
                out = model(input_ids=ids, past_key_values=c, use_cache=True)
                caches.append(c)
                toks.append(out.logits[:, -1:].argmax(-1))
            ts: list[list[float]] = [[], []]
            for _ in range(a.steps):
                for i in (0, 1):
                    dec[i].append(int(toks[i]))
                    toks[i], dt = _step(model, caches[i], toks[i])
                    ts[i].append(dt)
        same &= dec[0] == dec[1]
        ratios += [b / x for x, b in zip(ts[0][1:], ts[1][1:], strict=True)]
        ms[0] += ts[0][1:]
        ms[1] += ts[1][1:]
        built = [c.stats() for c in caches]
        for c in caches:
            c.detach()
    lo, hi = _ci(ratios)
    med = statistics.median(ratios)
    res = {
        "command": " ".join(["python", "evals/detector_ab.py", *sys.argv[1:]]), "base": a.base, "head": head,
        "cache": a.cache, "context": a.context, "steps": a.steps, "repeats": a.repeats, "threads": 1, "prompt": "text",
        "new_over_old_median": med, "new_over_old_ci95": [lo, hi], "n_step_pairs": len(ratios),
        "steady_ms_old": 1e3 * statistics.median(ms[0]), "steady_ms_new": 1e3 * statistics.median(ms[1]),
        "same_greedy_tokens": same, "built_old": built[0], "built_new": built[1],
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "torch": torch.__version__,
    }
    print(f"{a.cache}: new/old step {med:.3f} [{lo:.3f}, {hi:.3f}] over {len(ratios)} step pairs; same tokens: {same}")
    write_json(a.out, res)


if __name__ == "__main__":
    main()
