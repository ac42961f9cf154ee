"""Every entry point builds exactly the cache it names, and records what it built.

One test per way in: ``SinkCache`` itself, ``SinkCacheLM`` (Python kwargs and lm-eval's model_args
string), ``run_eval`` / ``sinkcache eval``, ``sinkcache compare``'s cells, ``sinkcache bench``'s
specs. Each asserts the built policy object and sink selector (read back from the cache), not the
options that were passed. These pin the bugs where ``sinks="none"`` silently became ``"first"``,
``n_first=0`` became 1, unknown model arguments were ignored and a profile's ``n_first`` was lost.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import _build
from test_evals import _byte_tokenizer

from sinkcache import SinkCache
from sinkcache.compare.cell import build_lm, lm_options
from sinkcache.compare.lms import fit_budget
from sinkcache.compare.plan import Cell, plan, run_key
from sinkcache.evaluation import SinkCacheLM, cache_options, merge_configs
from sinkcache.policies import EvictPolicy, FullPolicy, HybridPolicy, QuantizePolicy
from sinkcache.sinks import FirstSinks, NoSinks, ProfileSinks, load_profile

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return _build("llama", vocab_size=len(tok))


@pytest.fixture(scope="module")
def ckpt(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _lm(model, tok, **kw) -> SinkCacheLM:
    return SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu", **kw)


def _held(cache: SinkCache):
    return type(cache.policy), type(cache.sink_selector), cache.sink_selector.n_first


# ------------------------------------------------------------------------------------ SinkCache


def test_sinkcache_none_means_no_sinks_and_n_first_defaults():
    assert _held(SinkCache("quantize", bits=2, sinks="none")) == (QuantizePolicy, NoSinks, 0)
    assert _held(SinkCache("quantize", bits=2)) == (QuantizePolicy, FirstSinks, 1)
    assert _held(SinkCache("quantize", bits=2, sinks="first", n_first=0)) == (QuantizePolicy, FirstSinks, 0)
    d = SinkCache("quantize", bits=2, window=32, group_size=32, sinks="none").describe()
    assert (d["policy"], d["bits"], d["window"], d["group_size"], d["sinks"], d["sink_selector"]) == (
        "quantize", 2, 32, 32, "none", "NoSinks",
    )
    assert SinkCache("evict", budget=64).stats()["config"]["budget"] == 64


def test_sinkcache_rejects_sinks_with_none():
    with pytest.raises(ValueError, match="sinks='none' keeps no sinks"):
        SinkCache("quantize", sinks="none", n_first=4)
    with pytest.raises(ValueError, match="sinks='none' keeps no sinks"):
        SinkCache("evict", budget=64, sinks="none", max_sinks=2)


def test_profile_keeps_its_own_n_first():
    prof = copy.deepcopy(load_profile("smollm2-135m"))
    prof["n_first"] = 3
    c = SinkCache("quantize", bits=2, profile=prof)
    assert isinstance(c.sink_selector, ProfileSinks) and c.sink_selector.n_first == 3
    assert SinkCache("quantize", bits=2, profile=prof, n_first=2).sink_selector.n_first == 2


# ------------------------------------------------------------------------------------ SinkCacheLM


@pytest.mark.parametrize(
    "kw, expect",
    [
        (dict(policy="quantize", bits=2, sinks="none"), (QuantizePolicy, NoSinks, 0)),
        (dict(policy="quantize", bits=2, sinks=None), (QuantizePolicy, NoSinks, 0)),  # lm-eval's parse of "none"
        (dict(policy="quantize", bits=2), (QuantizePolicy, FirstSinks, 1)),
        (dict(policy="quantize", bits=2, sinks="first", n_first=0), (QuantizePolicy, FirstSinks, 0)),
        (dict(policy="evict", budget=64, sinks="first", n_first=4), (EvictPolicy, FirstSinks, 4)),
        (dict(policy="hybrid", bits=2, budget=512, window=16, group_size=16, sinks="none"), (HybridPolicy, NoSinks, 0)),
        (dict(policy="full", sinks="auto"), (FullPolicy, NoSinks, 0)),  # nothing compressed: built without sinks
    ],
)
def test_sinkcachelm_kwargs_build_what_they_name(model, tok, kw, expect):
    lm = _lm(model, tok, **kw)
    cache = lm.make_cache()
    try:
        assert _held(cache) == expect
    finally:
        cache.detach()
    assert lm.built_cache["sink_selector"] == expect[1].__name__  # recorded from the cache, not the request


def test_model_args_string_builds_what_it_names(ckpt):
    lm = SinkCacheLM.create_from_arg_string(f"pretrained={ckpt},policy=quantize,bits=2,sinks=none", {"device": "cpu"})
    cache = lm.make_cache()
    assert _held(cache) == (QuantizePolicy, NoSinks, 0) and cache.policy.bits == 2
    cache.detach()
    lm = SinkCacheLM.create_from_arg_string(f"pretrained={ckpt},policy=evict,budget=64,positions=shifted", {"device": "cpu"})
    cache = lm.make_cache()
    assert cache.policy.positions == "shifted"
    cache.detach()


@pytest.mark.parametrize("args, match", [("bit=2", "did you mean 'bits'"), ("sink=auto", "did you mean 'sinks'"), ("sinks=nope", "sinks='nope'")])
def test_model_args_typos_raise(ckpt, args, match):
    with pytest.raises(ValueError, match=match):
        SinkCacheLM.create_from_arg_string(f"pretrained={ckpt},policy=quantize,{args}", {"device": "cpu"})


def test_cache_options_translation():
    assert cache_options(sinks=None)["sinks"] == "none"
    assert cache_options(sinks="NONE")["sinks"] == "none"
    assert cache_options(n_first=0)["n_first"] == 0
    assert cache_options(n_first=None)["n_first"] is None
    assert cache_options(profile="p.json")["sinks"] == "profile"
    with pytest.raises(ValueError, match="policy=None"):
        cache_options(policy=None)
    with pytest.raises(ValueError, match="cannot be combined"):
        cache_options(sinks="auto", profile="p.json")


def test_refine_translation_through_lm_eval_and_cli(ckpt, model, tok):
    from sinkcache.cli import _cache_kwargs, build_parser
    from sinkcache.refine import Refinement

    assert cache_options(refine=None)["refine"] is None
    assert cache_options(refine="0")["refine"] is None  # off, as 0 means everywhere else
    assert cache_options(refine="0.1")["refine"] == 0.1
    with pytest.raises(ValueError, match="refine='lots' must be a number"):
        cache_options(refine="lots")
    with pytest.raises(ValueError, match="refine share=1.5"):
        _lm(model, tok, policy="quantize", bits=2, refine=1.5)
    with pytest.raises(ValueError, match="does not use refine"):
        _lm(model, tok, policy="evict", budget=64, refine=0.1)
    lm = SinkCacheLM.create_from_arg_string(f"pretrained={ckpt},policy=quantize,bits=2,refine=0.1", {"device": "cpu"})
    cache = lm.make_cache()
    try:
        assert cache.policy.refine == Refinement(0.1, bits=2, score="attention")
        assert cache._queries is not None  # attention-ranked: the query hooks are attached
    finally:
        cache.detach()
    assert lm.built_cache["refine"] == {"share": 0.1, "bits": 2, "score": "attention"}
    args = build_parser().parse_args(["generate", "m", "hi", "--policy", "quantize", "--bits", "2", "--refine", "0.25"])
    assert _cache_kwargs(args)["refine"] == 0.25
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "m", "hi", "--refine", "2"])


def test_merge_configs_shows_per_request_ranges():
    m = merge_configs([{"policy": "evict", "budget": 10}, {"policy": "evict", "budget": 30}])
    assert m["policy"] == "evict" and m["budget"] == {"min": 10, "max": 30, "mean": 20, "n": 2}


# ------------------------------------------------------------------------------------ run_eval / eval CLI


def test_sinkcache_eval_sinks_none_records_no_sinks(ckpt, tmp_path, capsys):
    from sinkcache.cli import main

    out = tmp_path / "r.json"
    argv = ["eval", str(ckpt), "--tasks", "sinkcache_kv_retrieval", "--policy", "quantize", "--bits", "2"]
    argv += ["--window", "0", "--group-size", "16", "--sinks", "none", "--limit", "1", "--threads", "1", "--output", str(out)]
    assert main(argv) == 0
    cache = json.loads(out.read_text())["config"]["cache"]
    assert (cache["sinks"], cache["sink_selector"], cache["n_first"], cache["bits"], cache["window"]) == ("none", "NoSinks", 0, 2, 0)
    assert "sinks=none" in capsys.readouterr().out  # the KV memory line names the built cache


# ------------------------------------------------------------------------------------ compare


@pytest.mark.parametrize(
    "cell, expect",
    [
        (Cell("kivi", bits=2), (QuantizePolicy, NoSinks, 0)),
        (Cell("sink-quant", bits=2), (QuantizePolicy, "AutoSinks", 1)),
        (Cell("recent-evict", budget=25.0), (EvictPolicy, NoSinks, 0)),
        (Cell("streamingllm", budget=25.0), (EvictPolicy, FirstSinks, 4)),
        (Cell("sink-evict", budget=25.0), (EvictPolicy, "AutoSinks", 1)),
        (Cell("sink-hybrid", bits=4, budget=50.0), (HybridPolicy, "AutoSinks", 1)),
        (Cell("full"), (FullPolicy, NoSinks, 0)),
        (Cell("sink-quant-refine", bits=2), (QuantizePolicy, FirstSinks, 1)),
        (Cell("sink-quant-auto-refine", bits=2), (QuantizePolicy, "AutoSinks", 1)),
    ],
)
def test_compare_cells_build_what_they_name(model, tok, cell, expect):
    lm = build_lm(cell, "tiny", model=model, tokenizer=tok)
    lm._n_ctx = 400
    cache = lm.make_cache()
    try:
        pol, sel, nf = _held(cache)
        assert pol is expect[0] and nf == expect[2]
        assert sel.__name__ == (expect[1] if isinstance(expect[1], str) else expect[1].__name__)
        if cell.budget is not None:
            assert cache.policy.budget == pytest.approx(cell.budget / 100 * 400, abs=1) or cell.policy == "sink-hybrid"
        refine = getattr(cache.policy, "refine", None)
        assert (refine.share if refine is not None else None) == (0.14 if "refine" in cell.policy else None)
    finally:
        cache.detach()


def test_fit_budget_keeps_zero_and_policy_defaults():
    base = dict(policy="evict", bits=None, budget=None, window=None, group_size=None, max_sinks=None)
    fitted = fit_budget(dict(base, sinks="first", n_first=0), 0.5, 100, "rest")
    assert (fitted["budget"], fitted["window"]) == (50, 50)  # n_first=0 reserves nothing
    hyb = fit_budget(dict(base, policy="hybrid", bits=2, sinks="none", n_first=None), 0.01, 100, "default")
    assert hyb["budget"] >= HybridPolicy.window + 2 * HybridPolicy.group_size - 1  # default window 128, not 0
    SinkCache(**hyb)  # and the fitted budget is valid for the policy's defaults


def test_fit_budget_keeps_a_cells_own_window():
    base = dict(policy="evict", bits=None, budget=None, group_size=None, max_sinks=None, sinks="auto", n_first=1)
    fitted = fit_budget(dict(base, window=32), 0.25, 400, "default")
    assert (fitted["budget"], fitted["window"]) == (100, 32)
    small = fit_budget(dict(base, window=32), 0.01, 400, "default")
    assert small["budget"] == 32 + 2 + 1 and small["window"] == 32  # raised to hold the window, not clamped below it
    assert fit_budget(dict(base, window=None), 0.25, 400, "default")["window"] is None  # the policy's default


def _built_at_400(cell: Cell, model, tok) -> dict:
    """``describe()`` of the cache ``cell`` builds for a 400-token request."""
    lm = build_lm(cell, "tiny", model=model, tokenizer=tok)
    lm._n_ctx = 400
    cache = lm.make_cache()
    try:
        return cache.describe()
    finally:
        cache.detach()


def test_tova_w32_cell_builds_a_32_token_window(model, tok):
    d = _built_at_400(Cell("sink-evict-tova-w32", budget=25.0), model, tok)
    assert (d["policy"], d["score"], d["window"], d["budget"], d["sinks"]) == ("evict", "tova", 32, 100, "auto")
    # the default window, min(256, budget // 2)
    assert _built_at_400(Cell("sink-evict-tova", budget=25.0), model, tok)["window"] == 50


def test_tova_pooled_cell_builds_the_pooled_scorer(model, tok):
    d = _built_at_400(Cell("sink-evict-tova-pooled", budget=25.0), model, tok)
    assert (d["score"], d["scorer"], d["sinks"], d["window"]) == ("tova-pooled", "PooledTOVAScorer()", "auto", 50)


def test_tova_pooled_w32_cell_is_the_default_eviction_with_a_32_token_window(model, tok):
    d = _built_at_400(Cell("sink-evict-tova-pooled-w32", budget=25.0), model, tok)
    assert (d["score"], d["scorer"], d["sinks"], d["window"], d["budget"]) == ("tova-pooled", "PooledTOVAScorer()", "auto", 32, 100)


@pytest.mark.parametrize(("policy", "score", "scorer"), [
    ("sink-evict-vatp-w32", "vatp", "VATPScorer()"),
    ("sink-evict-tova-span-w32", "tova-span", "SpanTOVAScorer(kernel=5)"),
])
def test_candidate_scorer_cells_change_only_the_scorer_of_the_w32_cell(model, tok, policy, score, scorer):
    d = _built_at_400(Cell(policy, budget=25.0), model, tok)
    assert (d["score"], d["scorer"], d["sinks"], d["window"], d["budget"]) == (score, scorer, "auto", 32, 100)


def test_vatp_shrink_cell_is_the_vatp_w32_cell_with_an_eighth_of_the_budget_as_window(model, tok):
    w32 = _built_at_400(Cell("sink-evict-vatp-w32", budget=25.0), model, tok)
    d = _built_at_400(Cell("sink-evict-vatp-wshrink", budget=25.0), model, tok)
    assert (d["score"], d["scorer"], d["sinks"], d["budget"]) == (w32["score"], w32["scorer"], w32["sinks"], w32["budget"])
    assert d["window"] == 12  # min(32, 100 // 8)
    assert _built_at_400(Cell("sink-evict-vatp-wshrink", budget=12.5), model, tok)["window"] == 6  # 50 // 8


def test_nosink_tova_pooled_cell_is_the_default_eviction_without_sinks(model, tok):
    """The sink ablation of the default eviction: same scorer, same window and budget, no sinks."""
    ours = _built_at_400(Cell("sink-evict-tova-pooled", budget=25.0), model, tok)
    d = _built_at_400(Cell("nosink-evict-tova-pooled", budget=25.0), model, tok)
    assert (d["score"], d["sinks"], d["sink_selector"]) == ("tova-pooled", "none", "NoSinks")
    assert (d["window"], d["budget"]) == (ours["window"], 100)


def test_sink_quant_first_cell_builds_first_token_sinks(model, tok):
    d = _built_at_400(Cell("sink-quant-first", bits=2), model, tok)
    assert (d["policy"], d["bits"], d["sinks"], d["sink_selector"], d["n_first"]) == ("quantize", 2, "first", "FirstSinks", 1)


def test_compare_budgets_below_one_percent_raise():
    with pytest.raises(ValueError, match="write 50"):
        plan(["sink-evict"], [0.5])


def test_run_key_changes_with_options_and_code(monkeypatch):
    c = Cell("kivi", bits=2)
    assert run_key("m", 5, 0, c, code="a") != run_key("m", 5, 0, c, code="b")
    plan_mod = sys.modules["sinkcache.compare.plan"]  # the package re-exports a function named plan

    monkeypatch.setattr(plan_mod, "QUANT_WINDOW", 999)
    k1 = run_key("m", 5, 0, c, code="a")
    monkeypatch.undo()
    assert k1 != run_key("m", 5, 0, c, code="a")
    assert lm_options(c)["sinks"] == "none"


# ------------------------------------------------------------------------------------ bench


def test_bench_rows_are_labelled_from_the_built_cache(model):
    from sinkcache.bench import CacheSpec, built_config, built_label, default_specs

    specs = {s.name: s for s in default_specs(budget=64)}
    for name, sel in (("int4", "FirstSinks"), ("int4-nosink", "NoSinks"), ("evict-nosink", "NoSinks"), ("evict-auto", "AutoSinks")):
        cfg = built_config(specs[name].build(model))
        assert cfg["sink_selector"] == sel
        assert ("no sinks" in built_label(cfg)) == (sel == "NoSinks")
    # A refined cache and a plain one must not share a label (a row once read "int2, sinks first" for both).
    plain, refined = (built_label(built_config(specs[n].build(model))) for n in ("int2", "int2-refine"))
    assert "refine" not in plain and plain != refined
    assert "refine 0.14 (+2 bits, attention)" in refined
    cfg = built_config(specs["evict"].build(model))
    assert f"score {cfg['score']}" in built_label(cfg)
    cfg = built_config(CacheSpec("q", "q", "quanto", dict(nbits=2)).build(model))
    assert cfg["nbits"] == 2 and built_label(cfg).endswith("int2")
    assert torch.is_tensor(torch.zeros(1))  # keep torch imported for the fixtures' models
