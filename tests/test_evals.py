"""lm-eval integration (sinkcache.evaluation) and the offline task suite (evals/).

Most tests use a tiny random Llama with a byte-level tokenizer built in memory (no download);
``real_model`` tests use smollm2-135m through ``sinkcache.models.load_model``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import _build
from lm_eval.api.instance import Instance

from sinkcache.evaluation import SinkCacheLM, default_tasks_dir, format_report, run_eval, task_manager

REPO = Path(__file__).resolve().parent.parent
GEN_PATH = REPO / "evals" / "data" / "generate.py"


# --------------------------------------------------------------------------------------- fixtures


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return _build("llama", vocab_size=len(tok))


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("sinkcache_evals_generate_test", GEN_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _lm(model, tok, **kw) -> SinkCacheLM:
    return SinkCacheLM(pretrained=model, tokenizer=tok, device="cpu", **kw)


ASCII = [chr(c) for c in range(0x21, 0x7F)]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefgh ,.") for _ in range(n))


def _distinct(rng: random.Random, n: int) -> str:
    """``n`` distinct byte tokens. Layer-0 key norms depend only on the token id (RoPE keeps norms),
    so repeated tokens tie exactly under key-norm eviction; distinct ones avoid ties."""
    return "".join(rng.sample(ASCII, n))


# Context lengths: 90/74/58 and 93/77 agree modulo 16, so quantizing policies batch them too.
def _ll_requests(lengths=(90, 74, 58, 93, 77, 40), seed=0) -> list[Instance]:
    rng = random.Random(seed)
    reqs = []
    for i, n in enumerate(lengths):
        ctx = _distinct(rng, n)
        for j, cont in enumerate((" abc", " de", " fgh ab")):
            r = Instance("loglikelihood", doc={}, arguments=(ctx, cont), idx=j, metadata=("t", i, 1))
            r.task_name = "t"
            reqs.append(r)
    return reqs


def _gen_requests(lengths=(90, 74, 58, 93, 41), seed=1) -> list[Instance]:
    rng = random.Random(seed)
    reqs = []
    for i, n in enumerate(lengths):
        r = Instance(
            "generate_until",
            doc={},
            arguments=(_distinct(rng, n), {"until": ["zz"], "max_gen_toks": 10, "do_sample": False}),
            idx=0,
            metadata=("t", i, 1),
        )
        r.task_name = "t"
        reqs.append(r)
    return reqs


def _roll_requests(seed=2) -> list[Instance]:
    rng = random.Random(seed)
    reqs = []
    for i, n in enumerate((300, 451)):
        r = Instance("loglikelihood_rolling", doc={}, arguments=(_text(rng, n),), idx=0, metadata=("t", i, 1))
        r.task_name = "t"
        reqs.append(r)
    return reqs


def _scores(lm, reqs) -> torch.Tensor:
    return torch.tensor([s for s, _ in lm.loglikelihood(reqs, disable_tqdm=True)], dtype=torch.float64)


HARD = {
    "quantize": dict(policy="quantize", bits=2, window=0, group_size=16, sinks="none"),
    "evict": dict(policy="evict", budget=16, window=4, sinks="first"),
}
ROOMY = {
    "evict": dict(policy="evict", budget=4096, window=0, sinks="first"),
    "quantize": dict(policy="quantize", bits=2, window=4096, group_size=16),
    "hybrid": dict(policy="hybrid", bits=4, budget=8192, window=4096, group_size=16, sinks="auto", max_sinks=4),
}


# --------------------------------------------------------------------------------------- registration


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("sinkcache") is SinkCacheLM
    # Registering ours must not hide lm-eval's lazily registered built-ins.
    assert get_model("hf").__name__ == "HFLM"


def test_bad_cache_args_fail_before_loading(monkeypatch):
    import sinkcache.models

    def boom(*a, **k):
        raise AssertionError("must not load a model with bad cache args")

    monkeypatch.setattr(sinkcache.models, "load_model", boom)
    with pytest.raises(ValueError, match="budget"):
        SinkCacheLM(pretrained="smollm2-135m", policy="evict")
    with pytest.raises(ValueError, match="bits"):
        SinkCacheLM(pretrained="smollm2-135m", policy="quantize", bits=3)
    with pytest.raises(ValueError, match="does not use"):
        SinkCacheLM(pretrained="smollm2-135m", policy="full", bits=2)


# --------------------------------------------------------------------------------------- loglikelihood


def test_full_policy_equals_plain_hflm(model, tok):
    from lm_eval.models.huggingface import HFLM

    reqs = _ll_requests()
    ref = HFLM(pretrained=model, tokenizer=tok, device="cpu")
    want = torch.tensor([s for s, _ in ref.loglikelihood(reqs, disable_tqdm=True)], dtype=torch.float64)
    got = _scores(_lm(model, tok, policy="full"), reqs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(HARD))
def test_hard_compression_changes_scores(model, tok, name):
    reqs = _ll_requests()
    full = _scores(_lm(model, tok, policy="full"), reqs)
    lm = _lm(model, tok, **HARD[name])
    comp = _scores(lm, reqs)
    # The continuation is scored against the compressed context, so scores must move.
    assert (comp - full).abs().max() > 1e-3
    mem = lm.kv_memory
    assert mem["requests"] == len(reqs)
    assert mem["mean_memory_bytes"] < 0.5 * mem["mean_dense_bytes"]
    want = {"none": "NoSinks", "first": "FirstSinks"}[HARD[name]["sinks"]]
    assert lm.built_cache["sink_selector"] == want  # the selector that ran, read back from the cache


def test_no_sinks_is_not_first_token_sinks(model, tok):
    """The bug this pins: sinks="none" ran with a first-token sink, so both gave the same scores."""
    reqs = _ll_requests()
    none = _lm(model, tok, **HARD["quantize"])
    first = _lm(model, tok, **{**HARD["quantize"], "sinks": "first"})
    a, b = _scores(none, reqs), _scores(first, reqs)
    assert (a - b).abs().max() > 1e-3
    assert (none.built_cache["sink_selector"], first.built_cache["sink_selector"]) == ("NoSinks", "FirstSinks")
    # one exact token per layer costs bytes: the two caches are not the same size either
    assert none.kv_memory["mean_memory_bytes"] < first.kv_memory["mean_memory_bytes"]


@pytest.mark.parametrize("name", sorted(ROOMY))
def test_budget_holding_everything_equals_full(model, tok, name):
    reqs = _ll_requests()
    full = _scores(_lm(model, tok, policy="full"), reqs)
    torch.testing.assert_close(_scores(_lm(model, tok, **ROOMY[name]), reqs), full, atol=1e-4, rtol=0)


BATCH_POLICIES = {
    "full": dict(policy="full"),
    "evict": dict(policy="evict", budget=32, window=8, sinks="first"),
    "evict_auto": dict(policy="evict", budget=32, window=8, sinks="auto"),
    "quantize": dict(policy="quantize", bits=2, window=0, group_size=16, sinks="first"),
    "quantize_auto": dict(policy="quantize", bits=4, window=8, group_size=16, sinks="auto"),
    "hybrid": dict(policy="hybrid", bits=2, window=8, group_size=16, budget=80, sinks="first"),
}


@pytest.mark.parametrize("name", sorted(BATCH_POLICIES))
def test_left_padded_batch_equals_batch_one(model, tok, name):
    reqs = _ll_requests()
    one = _lm(model, tok, batch_size=1, **BATCH_POLICIES[name])
    many = _lm(model, tok, batch_size=4, **BATCH_POLICIES[name])
    rows = []
    orig = many._prefill

    def spy(cache, ids, mask):
        rows.append(ids.shape[0])
        return orig(cache, ids, mask)

    many._prefill = spy
    a, b = one.loglikelihood(reqs, disable_tqdm=True), many.loglikelihood(reqs, disable_tqdm=True)
    assert max(rows) > 1, "no batch was formed; the test would prove nothing"
    torch.testing.assert_close(
        torch.tensor([s for s, _ in b]), torch.tensor([s for s, _ in a]), atol=1e-3, rtol=0
    )
    assert [g for _, g in a] == [g for _, g in b]


def test_evict_batch_with_repeated_tokens(model, tok):
    rng = random.Random(3)
    reqs = []
    for i, n in enumerate((120, 97, 150, 64)):
        r = Instance("loglikelihood", doc={}, arguments=(_text(rng, n), " abc"), idx=0, metadata=("t", i, 1))
        r.task_name = "t"
        reqs.append(r)
    kw = BATCH_POLICIES["evict"]
    a = _scores(_lm(model, tok, batch_size=1, **kw), reqs)
    b = _scores(_lm(model, tok, batch_size=4, **kw), reqs)
    torch.testing.assert_close(b, a, atol=1e-3, rtol=0)


def test_context_shared_by_continuations_is_prefilled_once(model, tok):
    lm = _lm(model, tok, policy="quantize", bits=4, window=0, group_size=16)
    calls = []
    orig = lm._prefill
    lm._prefill = lambda c, i, m: (calls.append(i.shape), orig(c, i, m))[1]
    reqs = _ll_requests(lengths=(80, 60))
    lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(calls) == 2  # 2 contexts x 3 continuations: one prefill per context


# --------------------------------------------------------------------------------------- generation


def test_full_policy_generation_equals_plain_hflm(model, tok):
    from lm_eval.models.huggingface import HFLM

    reqs = _gen_requests()
    want = HFLM(pretrained=model, tokenizer=tok, device="cpu").generate_until(reqs, disable_tqdm=True)
    assert _lm(model, tok, policy="full").generate_until(reqs, disable_tqdm=True) == want


@pytest.mark.parametrize("name", ["full", "evict", "quantize", "hybrid"])
def test_generation_batch_equals_batch_one(model, tok, name):
    reqs = _gen_requests()
    kw = BATCH_POLICIES[name]
    a = _lm(model, tok, batch_size=1, **kw).generate_until(reqs, disable_tqdm=True)
    lm = _lm(model, tok, batch_size=3, **kw)
    b = lm.generate_until(reqs, disable_tqdm=True)
    assert a == b
    assert lm.kv_memory["requests"] == len(reqs)


def test_generation_sees_compressed_context(model, tok):
    reqs = _gen_requests()
    full = _lm(model, tok, policy="full").generate_until(reqs, disable_tqdm=True)
    lm = _lm(model, tok, **HARD["evict"])
    assert lm.generate_until(reqs, disable_tqdm=True) != full
    assert lm.kv_memory["ratio_vs_full"] < 0.5


# --------------------------------------------------------------------------------------- perplexity


def test_streaming_perplexity(model, tok):
    from lm_eval.models.huggingface import HFLM

    reqs = _roll_requests()
    want = torch.tensor(
        HFLM(pretrained=model, tokenizer=tok, device="cpu").loglikelihood_rolling(reqs, disable_tqdm=True)
    )
    for chunk in (128, 37):
        got = torch.tensor(
            _lm(model, tok, policy="full", chunk_size=chunk).loglikelihood_rolling(reqs, disable_tqdm=True)
        )
        torch.testing.assert_close(got, want, atol=5e-3, rtol=1e-5)
    lm = _lm(model, tok, chunk_size=32, **HARD["evict"])
    comp = torch.tensor(lm.loglikelihood_rolling(reqs, disable_tqdm=True))
    assert (comp - want).abs().max() > 1e-2
    assert lm.kv_memory["per_task"]["t"]["requests"] == len(reqs)
    assert lm.kv_memory["ratio_vs_full"] < 0.5


def test_streaming_perplexity_reports_what_scored_tokens_attend(model, tok):
    reqs = _roll_requests()
    full = _lm(model, tok, chunk_size=32, policy="full")
    full.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert full.kv_memory["per_task"]["t"]["attended_ratio_vs_full"] == pytest.approx(1.0)
    lm = _lm(model, tok, chunk_size=32, **HARD["evict"])
    lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    m = lm.kv_memory["per_task"]["t"]
    # a chunk's own 32 exact tokens plus the 16 held: a scored token sees more than the budget,
    # far less than the full context
    assert m["ratio_vs_full"] < m["attended_ratio_vs_full"] < 0.5
    assert m["attended_peak_bytes"] >= m["attended_mean_bytes"]


# --------------------------------------------------------------------------------------- data + tasks


def test_generators_are_deterministic(gen):
    for name in gen.TASKS:
        a = gen.dumps(gen.generate(name))
        assert a == gen.dumps(gen.generate(name)), name
        assert a != gen.dumps(gen.generate(name, seed=gen.TASKS[name].seed + 1)), name
        records = [json.loads(line) for line in a.decode().splitlines()]
        assert len(records) == gen.TASKS[name].n


def test_committed_data_matches_generators(gen):
    stale = gen.check()
    # Docstrings come from the running Python's stdlib: only comparable on the same version.
    doc = json.loads(gen.path_for("docstring_ppl").read_text().splitlines()[0])
    if doc["python"] != ".".join(map(str, sys.version_info[:2])):
        stale = [s for s in stale if s != "docstring_ppl"]
    assert stale == [], f"regenerate with: python evals/data/generate.py ({stale})"


def test_generator_writes_missing_files(gen, tmp_path):
    path = gen.ensure("kv_retrieval", tmp_path)
    assert path.read_bytes() == gen.dumps(gen.generate("kv_retrieval"))


def test_needle_tasks_put_the_answer_in_the_context(gen):
    for name in ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking"):
        for r in gen.generate(name, n=10):
            assert r["answer"] in r["input"], name
    for r in gen.generate("facts_mc", n=10):
        assert all(c in r["input"] for c in r["choices"])
        assert len(set(r["choices"])) == 4


def test_yaml_tasks_load_offline_from_any_cwd(gen, monkeypatch, tmp_path):
    from lm_eval.tasks import get_task_dict

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative data paths would break here
    tm = task_manager(include_defaults=False)  # the built-in index only costs time here
    assert default_tasks_dir() == REPO / "evals" / "tasks"
    tasks = get_task_dict(["sinkcache_suite"], tm)
    ((group, members),) = tasks.items()
    assert group.group_name == "sinkcache_suite"
    got = {name: task for name, task in members.items()}
    assert set(got) == {f"sinkcache_{n}" for n in gen.TASKS}
    for name, task in got.items():
        docs = list(task.test_docs())
        assert len(docs) == gen.TASKS[name.removeprefix("sinkcache_")].n
        task.build_all_requests(limit=1, rank=0, world_size=1)
        assert task.instances


# --------------------------------------------------------------------------------------- end to end


def test_run_eval_and_cli_with_a_local_checkpoint(model, tok, tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    out = tmp_path / "res.json"
    res = run_eval(
        str(ckpt),
        ["sinkcache_kv_retrieval", "sinkcache_facts_mc", "sinkcache_docstring_ppl"],
        policy="quantize",
        bits=2,
        window=0,
        group_size=16,
        limit=1,
        output=out,
        progress=False,
    )
    assert json.loads(out.read_text())["scores"] == res["scores"]
    assert set(res["scores"]) == {"sinkcache_kv_retrieval", "sinkcache_facts_mc", "sinkcache_docstring_ppl"}
    assert "acc,none" in res["scores"]["sinkcache_facts_mc"]
    assert "bits_per_byte,none" in res["scores"]["sinkcache_docstring_ppl"]
    assert res["config"]["cache"]["bits"] == 2
    assert res["versions"]["lm_eval"]
    mem = res["memory"]
    assert mem["requests"] == 1 + 1 * 4 + 1 and 0 < mem["ratio_vs_full"] < 0.5
    assert set(mem["per_task"]) == set(res["scores"])
    report = format_report(res)
    assert "sinkcache_facts_mc" in report and "KV memory" in report

    # `sinkcache eval`: the same through sinkcache's own command line.
    from sinkcache.cli import main as sinkcache_main

    out2 = tmp_path / "cli.json"
    argv = ["eval", str(ckpt), "--tasks", "sinkcache_kv_retrieval", "--policy", "evict", "--budget", "64"]
    argv += ["--window", "16", "--sinks", "first", "--limit", "1", "--threads", "1", "--output", str(out2)]
    assert sinkcache_main(argv) == 0
    printed = capsys.readouterr().out
    assert "sinkcache_kv_retrieval" in printed and "KV memory (policy=evict, " in printed
    assert "budget=64" in printed and "sinks=first" in printed and "n_first=1" in printed
    built = json.loads(out2.read_text())["config"]["cache"]  # read back from the built cache
    assert (built["policy_class"], built["budget"], built["window"]) == ("EvictPolicy", 64, 16)
    assert (built["sink_selector"], built["n_first"]) == ("FirstSinks", 1)
    cli = json.loads(out2.read_text())
    assert cli["config"]["cache"]["budget"] == 64 and cli["config"]["limit"] == 1
    assert set(cli["scores"]) == {"sinkcache_kv_retrieval"} and cli["memory"]["ratio_vs_full"] < 1
    assert sinkcache_main(["eval", str(ckpt), "--policy", "evict", "--limit", "1"]) == 2  # no budget: one-line error
    assert "budget" in capsys.readouterr().err

    # The lm_eval command line through the wrapper (registers the model, adds --include_path).
    from sinkcache.evaluation import main

    main(
        [
            "--model", "sinkcache",
            "--model_args", f"pretrained={ckpt},policy=evict,budget=64,window=16,sinks=first",
            "--tasks", "sinkcache_kv_retrieval",
            "--limit", "1",
            "--device", "cpu",
            "--output_path", str(tmp_path / "lm_eval_out"),
        ]
    )  # fmt: skip
    assert "sinkcache_kv_retrieval" in capsys.readouterr().out
    (written,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    lm_res = json.loads(written.read_text())
    score = lm_res["results"]["sinkcache_kv_retrieval"]["exact_match,first_number"]
    assert score == cli["scores"]["sinkcache_kv_retrieval"]["exact_match,first_number"]  # same cache, same answer
    via_cli = lm_res["config"]["sinkcache"]["cache"]  # what the model_args string really built
    assert (via_cli["policy_class"], via_cli["budget"], via_cli["window"]) == ("EvictPolicy", 64, 16)
    assert via_cli["sink_selector"] == "FirstSinks"


@pytest.mark.real_model
def test_real_model_passkey_smoke():
    from sinkcache.models import load_model

    m, t = load_model("smollm2-135m", progress=False)  # loaded once, shared by both runs
    kw = dict(limit=2, progress=False, model=m, tokenizer=t, device="cpu")
    full = run_eval("smollm2-135m", ["sinkcache_passkey"], **kw)
    comp = run_eval("smollm2-135m", ["sinkcache_passkey"], policy="quantize", bits=2, **kw)
    assert full["scores"]["sinkcache_passkey"]["exact_match,first_number"] == 1.0  # 512/1024-token needles
    assert comp["memory"]["mean_memory_bytes"] < full["memory"]["mean_memory_bytes"]
    assert full["memory"]["ratio_vs_full"] == pytest.approx(1.0)


def test_torch_env_report_runs_once_per_process(monkeypatch):
    # lm-eval records torch's environment report on every simple_evaluate (it shells out to pip:
    # seconds each); a compare shard evaluates once per policy, so it must be computed once.
    import torch.utils.collect_env as collect_env

    from sinkcache.evaluation import _env_report_once

    calls = []
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: calls.append(1) or "env")
    _env_report_once()
    _env_report_once()  # wrapping twice would still be once per process, but must not nest
    assert [collect_env.get_pretty_env_info() for _ in range(3)] == ["env"] * 3
    assert calls == [1]
    assert not hasattr(collect_env.get_pretty_env_info.__wrapped__, "cache_info")
