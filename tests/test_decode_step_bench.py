"""``evals/decode_step_bench.py``: lockstep decoding times both caches on the same prompt and reads
their configuration back from the built objects (toy model; the real run is a committed result)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from evals_scripts import load_eval_script


def test_lockstep_times_every_step_of_both_caches_and_records_what_was_built(tiny):
    from sinkcache.bench import default_specs

    mod = load_eval_script("decode_step_bench")
    specs = {s.name: s for s in default_specs(budget=32)}
    model = tiny("llama", attn="sdpa")
    run = mod.lockstep(model, prompt(80), specs["int2"], specs["int2-refine-keynorm"], steps=4)
    assert len(run["a_s"]) == len(run["b_s"]) == 4 and all(t > 0 for t in run["a_s"] + run["b_s"])
    a, b = run["built"]
    assert (a["bits"], a["refine"], a["sinks"]) == (2, None, "first")
    assert b["refine"] == {"share": 0.14, "bits": 2, "score": "keynorm"}
    assert [len(t) for t in run["tokens"]] == [4, 4]  # what each cache decoded, step by step


def test_prompts_are_seeded_random_tokens_or_held_out_text(byte_tok):
    mod = load_eval_script("decode_step_bench")
    r = mod.prompt_ids("random", None, 300, 64)
    assert r.shape == (1, 64) and torch.equal(r, mod.prompt_ids("random", None, 300, 64))
    t = mod.prompt_ids("text", byte_tok, 300, 64)
    assert t.shape == (1, 64)
    text = byte_tok.decode(t[0].tolist())
    assert any(c in text for c in ".,:()") and not torch.equal(t, r)  # natural text, with punctuation
    with pytest.raises(SystemExit, match="allowed: random, text"):
        mod.prompt_ids("noise", byte_tok, 300, 64)


def test_bootstrap_interval_brackets_the_median():
    mod = load_eval_script("decode_step_bench")
    ratios = [1.0 + 0.01 * (i % 7) for i in range(60)]
    lo, hi = mod._ci(ratios)
    med = sorted(ratios)[30]
    assert lo <= med <= hi and hi - lo < 0.07
