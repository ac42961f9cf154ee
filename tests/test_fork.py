"""Prefill once, fork many: a forked cache is the cache that ran the forward itself."""

from __future__ import annotations

import pytest
import torch
from conftest import _build
from helpers import generate
from test_evals import _byte_tokenizer, _gen_requests, _ll_requests, _roll_requests

from sinkcache import SinkCache
from sinkcache.compare.lms import FractionLM
from sinkcache.evaluation import SinkCacheLM
from sinkcache.fork import SharedPrefill, prefill_needs
from sinkcache.fork_lm import ForkLM
from sinkcache.sinks import AutoSinks

pytestmark = pytest.mark.usefixtures("one_thread")

# Hard settings on the tiny model so that every member really compresses (and so differs).
MEMBERS = {
    "full": dict(policy="full"),
    "kivi2": dict(policy="quantize", bits=2, window=4, group_size=16, sinks="none"),
    "sinkquant2": dict(policy="quantize", bits=2, window=4, group_size=16, sinks="auto"),
    "first4": dict(policy="quantize", bits=4, window=4, group_size=16, sinks="first"),
    # refinement ranks blocks by the attention of queries caught in the fork's own forwards
    "refine2": dict(policy="quantize", bits=2, window=4, group_size=16, sinks="first", refine=0.25),
    "evict_auto": dict(policy="evict", budget=24, window=8, sinks="auto", max_sinks=4, score="keynorm"),
    "streaming": dict(policy="evict", budget=20, window=16, sinks="first", n_first=4),
    "evict_tova": dict(policy="evict", budget=24, window=8, sinks="auto", max_sinks=4, score="tova"),
    "evict_h2o": dict(policy="evict", budget=24, window=8, sinks="first", score="h2o"),
    "hybrid": dict(policy="hybrid", bits=4, budget=80, window=4, group_size=16, sinks="auto", max_sinks=2),
}


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return _build("llama", vocab_size=len(tok))


def _members(model, tok, batch_size=1, **extra):
    return {n: SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=batch_size, **kw, **extra) for n, kw in MEMBERS.items()}


def _alone(model, tok, fn, batch_size=1):
    return {n: fn(m) for n, m in _members(model, tok, batch_size).items()}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_forked_loglikelihoods_equal_each_policy_alone(model, tok, batch_size):
    reqs = _ll_requests()
    alone = _alone(model, tok, lambda lm: lm.loglikelihood(reqs, disable_tqdm=True), batch_size)
    fork = ForkLM(_members(model, tok, batch_size))
    forked = fork.run_all(lambda lm: lm.loglikelihood(reqs, disable_tqdm=True))
    assert set(forked) == set(MEMBERS)
    for name in MEMBERS:
        assert forked[name] == alone[name], name  # exact: same floats, same greedy flags
    # one prefill per prompt batch served every member; members really differ
    assert fork.timing["prefills"] >= 1
    assert len({tuple(s for s, _ in v) for v in forked.values()}) == len(MEMBERS)


def test_forked_generation_equals_each_policy_alone(model, tok):
    reqs = _gen_requests()
    alone = _alone(model, tok, lambda lm: lm.generate_until(reqs, disable_tqdm=True))
    fork = ForkLM(_members(model, tok))
    forked = fork.run_all(lambda lm: lm.generate_until(reqs, disable_tqdm=True))
    for name in MEMBERS:
        assert forked[name] == alone[name], name
    assert fork.timing["prefills"] == len(reqs)  # recorded once; replays run no model


def test_forked_streaming_perplexity_and_memory_equal_each_policy_alone(model, tok):
    reqs = _roll_requests()
    members = _members(model, tok)
    alone_lms = _members(model, tok)
    alone = {n: lm.loglikelihood_rolling(reqs, disable_tqdm=True) for n, lm in alone_lms.items()}
    fork = ForkLM(members)
    forked = fork.run_all(lambda lm: (lm.loglikelihood_rolling(reqs, disable_tqdm=True), lm.kv_memory))
    for name in MEMBERS:
        assert forked[name][0] == alone[name], name
        # the memory a member reports is its own, and the same as alone
        assert forked[name][1]["mean_memory_bytes"] == alone_lms[name].kv_memory["mean_memory_bytes"], name
        assert forked[name][1]["cache"] == alone_lms[name].kv_memory["cache"], name


def test_fraction_members_fork_with_per_request_budgets(model, tok):
    reqs = _ll_requests()
    kw = dict(policy="evict", sinks="auto", budget_frac=0.25)
    alone = FractionLM(pretrained=model, tokenizer=tok, device="cpu", **kw)
    expect = alone.loglikelihood(reqs, disable_tqdm=True)
    fork = ForkLM({"a": FractionLM(pretrained=model, tokenizer=tok, device="cpu", **kw), "full": SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu")})
    got = fork.run_all(lambda lm: lm.loglikelihood(reqs, disable_tqdm=True))
    assert got["a"] == expect
    assert fork.members["a"].kv_memory["cache"]["budget"] == alone.kv_memory["cache"]["budget"]


def test_replay_of_an_unseen_request_raises(model, tok):
    fork = ForkLM(_members(model, tok))
    reqs = _ll_requests()

    def ev(lm):
        return lm.loglikelihood(reqs if not lm.replaying else _ll_requests(seed=9), disable_tqdm=True)

    with pytest.raises(RuntimeError, match="no recorded answer"):
        fork.run_all(ev)


def test_members_must_share_model_and_detector(model, tok):
    other = _build("llama", vocab_size=len(tok))
    a = SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu", policy="quantize", bits=2)
    b = SinkCacheLM(pretrained=other, tokenizer=tok, device="cpu", policy="quantize", bits=2)
    with pytest.raises(ValueError, match="share one"):
        ForkLM({"a": a, "b": b})
    c = SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu", policy="quantize", bits=2, sinks="auto", n_first=1)
    d = SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu", policy="quantize", bits=2, sinks="auto", n_first=2)
    with pytest.raises(ValueError, match="detectors differ"):
        ForkLM({"c": c, "d": d})


# ---- the mechanism, on plain generate() ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="quantize", bits=2, window=4, group_size=16, sinks="auto"),
        dict(policy="quantize", bits=2, window=4, group_size=16, sinks="auto", refine=0.25),
        dict(policy="evict", budget=20, window=8, sinks="auto", max_sinks=4, score="keynorm"),
        dict(policy="evict", budget=20, window=8, sinks="punct", max_sinks=4),
        dict(policy="evict", budget=20, window=8, sinks="auto", max_sinks=4, score="tova"),
        dict(policy="evict", budget=20, window=8, sinks="first", score="snapkv"),
        dict(policy="evict", budget=20, window=8, sinks="none", score="h2o"),
        # the value weight is taken on arrival: a fork must hold the same weights as a cache that ran alone
        dict(policy="evict", budget=20, window=8, sinks="first", score="vatp"),
        dict(policy="hybrid", bits=2, budget=80, window=4, group_size=16, sinks="auto", max_sinks=2),
        dict(policy="full"),
    ],
)
def test_fork_into_then_generate_equals_running_alone(model, tok, options):
    torch.manual_seed(1)
    ids = torch.randint(3, len(tok), (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :16] = 0  # a left-padded row (a whole group: hybrid evicts whole groups)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)

    def prefill(cache):
        with torch.no_grad():
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], past_key_values=cache, use_cache=True)

    alone = SinkCache(**options, model=model, tokenizer=tok)
    prefill(alone)
    expect = generate(model, ids, alone, 12, mask=mask)

    shared = SharedPrefill(model, detector=AutoSinks(n_first=1, punct_ids=_punct(tok)), score_queries=(1, 32, None), refine_queries=True)
    prefill(shared.cache)
    fork = shared.fork_into(SinkCache(**options, model=model, tokenizer=tok))
    shared.close()
    got = generate(model, ids, fork, 12, mask=mask)
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        assert torch.equal(a, b)
    assert fork.stats()["memory_bytes"] == alone.stats()["memory_bytes"]


def test_fork_refuses_attention_refinement_it_kept_no_queries_for(model, tok):
    ids = torch.randint(3, len(tok), (1, 40))
    opts = dict(policy="quantize", bits=2, window=4, group_size=16, sinks="first", refine=0.25)
    assert prefill_needs([SinkCache(**opts, model=model)])[2] is True
    assert prefill_needs([SinkCache(**{**opts, "refine": None}, model=model)])[2] is False
    shared = SharedPrefill(model)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=shared.cache, use_cache=True)
    with pytest.raises(ValueError, match="refine_queries=True"):
        shared.fork_into(SinkCache(**opts, model=model))
    shared.close()


def test_fork_refuses_an_attention_scorer_it_did_not_record(model, tok):
    ids = torch.randint(3, len(tok), (1, 30))
    shared = SharedPrefill(model, score_queries=(1,))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=shared.cache, use_cache=True)
    with pytest.raises(ValueError, match="reads all queries, but the recorded forward measured \\[1\\]"):
        shared.fork_into(SinkCache("evict", budget=20, window=8, score="h2o", model=model))
    shared.close()


def _punct(tok):
    from sinkcache.sinks import punctuation_token_ids

    return punctuation_token_ids(tok)


def test_fork_into_refuses_a_used_cache_and_an_empty_recording(model, tok):
    shared = SharedPrefill(model)
    with pytest.raises(ValueError, match="nothing recorded"):
        shared.fork_into(SinkCache("quantize", model=model))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 50, (1, 20)), past_key_values=shared.cache, use_cache=True)
    used = SinkCache("quantize", model=model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 50, (1, 5)), past_key_values=used, use_cache=True)
    with pytest.raises(ValueError, match="fresh cache"):
        shared.fork_into(used)
    with pytest.raises(ValueError, match="detector"):
        shared.fork_into(SinkCache("quantize", sinks="auto", model=model, tokenizer=tok))
    shared.close()


@pytest.mark.parametrize("policy", ["quantize", "evict"])
def test_fork_carries_the_detectors_measurements(policy):
    """On a model with a planted mid-prompt sink, the fork finds it exactly as the cache alone does
    (without the recorded measurements it would keep only the first token)."""
    from planted import NORMAL, SINK, planted_model

    m = planted_model(layers=2)
    ids = torch.full((1, 60), NORMAL)
    ids[0, 20] = SINK
    opts = dict(policy="quantize", bits=2, window=4, group_size=16, sinks="auto") if policy == "quantize" else dict(
        policy="evict", budget=16, window=4, sinks="auto", max_sinks=4, score="keynorm"
    )

    def prefill(cache):
        with torch.no_grad():
            m(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)

    alone = SinkCache(**opts, model=m)
    prefill(alone)
    expect = generate(m, ids, alone, 6)
    shared = SharedPrefill(m, detector=AutoSinks(n_first=1))
    prefill(shared.cache)
    fork = shared.fork_into(SinkCache(**opts, model=m))
    shared.close()
    got = generate(m, ids, fork, 6)
    assert min(alone.stats()["sinks_per_layer"]) >= 2  # the planted sink was found, besides the first token
    assert fork.stats()["sinks_per_layer"] == alone.stats()["sinks_per_layer"]
    for a, b in zip(got.logits, expect.logits, strict=True):
        assert torch.equal(a, b)


def test_run_eval_policies_equal_separate_runs(model, tok, tmp_path):
    """``sinkcache eval --policies a,b`` (run_eval(policies=...)) scores like one run per policy."""
    from sinkcache.evaluation import run_eval

    common = dict(model=model, tokenizer=tok, limit=2, progress=False, bits=2, budget=64, group_size=16, window=8, sinks="auto")
    tasks = ["sinkcache_kv_retrieval", "sinkcache_facts_mc"]
    both = run_eval("tiny", tasks, policies=["quantize", "evict", "full"], **common)
    assert set(both["policies"]) == {"quantize", "evict", "full"}
    alone_q = run_eval("tiny", tasks, policy="quantize", **{k: v for k, v in common.items() if k != "budget"})
    alone_e = run_eval("tiny", tasks, policy="evict", **{k: v for k, v in common.items() if k not in ("bits", "group_size")})
    for name, alone in (("quantize", alone_q), ("evict", alone_e)):
        got = both["policies"][name]
        assert got["scores"] == alone["scores"], name
        assert got["config"]["cache"] == alone["config"]["cache"], name
        assert got["memory"]["mean_memory_bytes"] == alone["memory"]["mean_memory_bytes"], name
    assert both["policies"]["full"]["config"]["cache"]["policy"] == "full"
