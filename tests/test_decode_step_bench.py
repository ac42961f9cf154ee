"""``evals/decode_step_bench.py``: lockstep decoding times both caches on the same prompt and reads
their configuration back from the built objects (toy model; the real run is a committed result)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import prompt

EVALS = Path(__file__).resolve().parents[1] / "evals"


def _load():
    spec = importlib.util.spec_from_file_location("decode_step_bench", EVALS / "decode_step_bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lockstep_times_every_step_of_both_caches_and_records_what_was_built(tiny):
    from sinkcache.bench import default_specs

    mod = _load()
    specs = {s.name: s for s in default_specs(budget=32)}
    model = tiny("llama", attn="sdpa")
    run = mod.lockstep(model, prompt(80), specs["int2"], specs["int2-refine-keynorm"], steps=4)
    assert len(run["a_s"]) == len(run["b_s"]) == 4 and all(t > 0 for t in run["a_s"] + run["b_s"])
    a, b = run["built"]
    assert (a["bits"], a["refine"], a["sinks"]) == (2, None, "first")
    assert b["refine"] == {"share": 0.14, "bits": 2, "score": "keynorm"}


def test_bootstrap_interval_brackets_the_median():
    mod = _load()
    ratios = [1.0 + 0.01 * (i % 7) for i in range(60)]
    lo, hi = mod._ci(ratios)
    med = sorted(ratios)[30]
    assert lo <= med <= hi and hi - lo < 0.07
