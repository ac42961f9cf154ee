"""``evals/refine_eval.py`` and ``evals/sink_analysis_eval.py``: config names build what they say,
bytes and intervals are computed from what ran (toy model; the real runs are committed results)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import prompt

EVALS = Path(__file__).resolve().parents[1] / "evals"


def _load(name: str):
    sys.path.insert(0, str(EVALS))
    try:
        spec = importlib.util.spec_from_file_location(name, EVALS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EVALS))


@pytest.fixture(scope="module")
def ev():
    return _load("refine_eval")


def test_config_names_translate(ev):
    assert ev.parse_config("full", 2, 32) == (None, None)
    kw, score = ev.parse_config("first-w48", 2, 32)
    assert (kw["sinks"], kw["window"], kw["bits"], "refine" in kw, score) == ("first", 48, 2, False, None)
    kw, score = ev.parse_config("none-r0.1", 4, 32)
    assert (kw["sinks"], kw["refine"], kw["bits"], score) == ("none", 0.1, 4, "attention")
    assert ev.parse_config("first-r0.2-random", 2, 32)[1] == "random"
    for bad in ("firts", "first-x3", "first-random"):
        with pytest.raises(ValueError, match="config"):
            ev.parse_config(bad, 2, 32)


def test_run_config_on_a_toy_model_reads_back_what_ran(ev, tiny):
    model = tiny("llama")
    texts = prompt(57, batch=2)
    args = argparse.Namespace(context=40, scored=16, chunk=8, batch=2, bits=2, window=8, group_size=16, seed=0)
    runs = {c: ev.run_config(model, None, texts, c, args) for c in ("full", "none", "first-r0.25", "first-r0.25-random")}
    assert runs["full"]["built"] is None
    assert runs["none"]["built"]["sinks"] == "none" and runs["none"]["built"]["refine"] is None
    assert runs["first-r0.25"]["built"]["refine"] == {"share": 0.25, "bits": 2, "score": "attention"}
    assert runs["first-r0.25-random"]["built"]["refine"]["score"] == "keynorm"  # re-ranked at random by the script
    assert runs["first-r0.25-random"]["built"]["refine_ranking"] == "random"
    assert runs["first-r0.25"]["built"]["refine_ranking"] == "attention"
    # Equal refinement share: equal bytes; both hold more than no-sink KIVI and less than full.
    r, rr, n, f = (runs[c]["bytes_per_row"] for c in ("first-r0.25", "first-r0.25-random", "none", "full"))
    assert r == rr and n < r < f
    assert runs["first-r0.25"]["bytes16_per_row"] < r  # fp32 parts counted at 2 bytes
    for v in runs.values():
        assert len(v["mean_nll"]) == 2 and all(math.isfinite(x) for x in v["mean_nll"])
    assert runs["none"]["mean_nll"] != runs["full"]["mean_nll"]


def test_gap_closed_and_its_interval(ev):
    none = torch.tensor([2.0, 2.2, 2.1, 2.3])
    full = none - 0.5
    half = torch.log((none.exp() + full.exp()) / 2)  # per text halfway in perplexity
    g, lo, hi = ev.bootstrap_gap(none, full, none)
    assert g == 0.0 and lo == hi == 0.0
    g, lo, hi = ev.bootstrap_gap(none, full, full)
    assert g == pytest.approx(1.0) and lo == pytest.approx(1.0)
    g, lo, hi = ev.bootstrap_gap(none, full, half)
    assert 0.4 < lo <= g <= hi < 0.6


def test_analysis_per_text_scalars():
    an = _load("sink_analysis_eval")
    tag = {"pc_share": 0.4, "pc_cos": 0.5, "mean_cos": 0.6}
    non = {"pc_share": 0.3, "pc_cos": 0.2, "mean_cos": 0.1}
    summary = {
        "heads": 10, "sink_heads": 4,
        "attention_share": {"first": 0.3, "punctuation_sinks": 0.01, "newline_sinks": 0.02, "other_sinks": 0.1},
        "classes": {"punctuation": {"count": 20, "sink_any": 5}, "newline": {"count": 0, "sink_any": 0}},
        "tag": {"sink_heads": tag, "non_sink_heads": non, "random_cos": 0.03},
    }
    row = an.per_text(summary)
    assert row["sink heads (share of heads)"] == 0.4
    assert row["punctuation tokens that are a sink in >= 1 head (share)"] == 0.25
    assert row["newline tokens that are a sink in >= 1 head (share)"] is None  # no newlines: no share
    assert row["contrast mean_cos"] == pytest.approx(0.5)
    assert row["attention on the first token"] == 0.3
