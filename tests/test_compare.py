"""``sinkcache compare``: sweep plan, memory matching, peers' adapters, resume and results writing.

Uses the tiny random Llama and byte tokenizer of ``test_evals`` (no download). The kvpress protocol
is tested with a fake worker; the real worker (kvpress virtualenv: ``$SINKCACHE_KVPRESS_PYTHON``,
default: the venv ``make peers`` creates, ``~/.cache/sinkcache/venvs/kvpress``) runs with ``SINKCACHE_TEST_KVPRESS=1``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import _build
from lm_eval.api.instance import Instance
from test_evals import _byte_tokenizer, _distinct

from sinkcache.compare import lms as lms_mod
from sinkcache.compare.cell import run_cell, summarize
from sinkcache.compare.lms import (
    FractionLM,
    KVPressLM,
    PeerQuantCache,
    QuantizedPeerLM,
    fit_budget,
    tensor_bytes,
)
from sinkcache.compare.plan import PPL_TASK, SUITE_TASKS, Cell, parse_list, plan, run_key
from sinkcache.compare.report import write_results
from sinkcache.compare.runner import interleave, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return _build("llama", vocab_size=len(tok))


def _ll(n_ctx: int, seed: int = 0) -> list[Instance]:
    rng = random.Random(seed)
    ctx = _distinct(rng, min(n_ctx, 90)) * (n_ctx // 90 + 1)
    ctx = ctx[:n_ctx]
    out = []
    for j, cont in enumerate((" abc", " de")):
        r = Instance("loglikelihood", doc={}, arguments=(ctx, cont), idx=j, metadata=("t", 0, 1))
        r.task_name = "t"
        out.append(r)
    return out


def _gen(n_ctx: int, seed: int = 1) -> list[Instance]:
    rng = random.Random(seed)
    r = Instance(
        "generate_until",
        doc={},
        arguments=(_distinct(rng, 90)[: n_ctx], {"until": ["zz"], "max_gen_toks": 6, "do_sample": False}),
        idx=0,
        metadata=("t", 0, 1),
    )
    r.task_name = "t"
    return [r]


# ------------------------------------------------------------------------------------------- plan


def test_plan_sweeps_budgets_for_evictors_and_bits_for_quantizers():
    cells = plan(["full", "sink-evict", "kivi", "sink-hybrid", "kvpress-snapkv"], [50, 25], [4, 2], [4])
    ids = [c.cell_id for c in cells]
    assert ids == [
        "full",
        "sink-evict_b50",
        "sink-evict_b25",
        "kivi_4bit",
        "kivi_2bit",
        "sink-hybrid_4bit_b50",
        "sink-hybrid_4bit_b25",
        "kvpress-snapkv_b50",
        "kvpress-snapkv_b25",
    ]
    # kvpress compresses at prefill only: no streaming perplexity
    assert PPL_TASK not in cells[-1].tasks and PPL_TASK in cells[0].tasks
    assert cells[1].setting == "50% tokens" and cells[3].setting == "int4"
    assert Cell.from_dict(cells[5].to_dict()) == cells[5]


@pytest.mark.parametrize(
    "kwargs",
    [dict(policies=["nope"]), dict(budgets=[0]), dict(budgets=[150]), dict(bits=[3]), dict(tasks=["gsm8k"])],
)
def test_plan_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        plan(**kwargs)


def test_parse_list_and_run_key():
    assert parse_list("50%, 25,12.5", float) == [50.0, 25.0, 12.5]
    c = Cell("sink-evict", budget=25.0)
    assert run_key("m", 5, 0, c) == run_key("m", 5, 0, c)
    assert run_key("m", 5, 0, c) != run_key("m", 6, 0, c)
    assert run_key("m", 5, 0, c) != run_key("m", 5, 0, Cell("sink-evict", budget=12.5))


def test_interleave_covers_every_policy_first():
    cells = plan(["sink-evict", "kivi", "full"], [50, 25, 12.5], [4, 2])
    order = [c.cell_id for c in interleave(cells)]
    assert order[:3] == ["sink-evict_b50", "kivi_4bit", "full"]
    assert sorted(order) == sorted(c.cell_id for c in cells)


# ------------------------------------------------------------------------------------ memory matching


def test_fit_budget_is_a_fraction_of_the_request():
    base = dict(policy="evict", bits=None, budget=None, window=None, group_size=None, sinks="auto", n_first=1, max_sinks=None)
    assert fit_budget(base, 0.25, 400, "default")["budget"] == 100
    assert fit_budget(base, 0.125, 401, "default")["budget"] == 51  # ceil
    rest = fit_budget(dict(base, sinks="none"), 0.5, 300, "rest")
    assert (rest["budget"], rest["window"]) == (150, 150)  # pure recent window
    first = fit_budget(dict(base, sinks="first", n_first=4), 0.5, 300, "rest")
    assert (first["budget"], first["window"]) == (150, 146)  # StreamingLLM: 4 sinks + window


@pytest.mark.parametrize(("n_tokens", "frac", "budget", "window"), [
    (512, 0.125, 64, 8),  # the 512-token prompt at 12.5%: 8 recent tokens, not 32
    (1024, 0.125, 128, 16),
    (2048, 0.125, 256, 32),  # from a 256-token budget on, the -w32 cells' window
    (4096, 0.25, 1024, 32),
    (40, 0.125, 5, 1),  # never 0
])
def test_fit_budget_shrink_window_is_an_eighth_of_the_budget_up_to_32(n_tokens, frac, budget, window):
    base = dict(policy="evict", bits=None, budget=None, window=None, group_size=None, sinks="auto", n_first=1, max_sinks=None)
    got = fit_budget(base, frac, n_tokens, "shrink")
    assert (got["budget"], got["window"]) == (budget, window)


def test_fit_budget_refuses_an_unknown_window_mode():
    with pytest.raises(ValueError, match="window_mode='half'; allowed: default, rest, shrink"):
        fit_budget(dict(policy="evict", sinks="auto"), 0.25, 400, "half")


@pytest.mark.parametrize("frac", [0.5, 0.25])
@pytest.mark.parametrize("sinks", ["auto", "none"])
def test_fraction_lm_holds_the_fraction_of_each_request(model, tok, frac, sinks):
    lm = FractionLM(pretrained=model, tokenizer=tok, device="cpu", policy="evict", sinks=sinks, budget_frac=frac)
    for n in (200, 400):
        lm.kv_log.reset()
        lm.loglikelihood(_ll(n), disable_tqdm=True)
        mem = lm.kv_memory
        # measured after scoring the continuation (a few tokens more than the budget's context)
        assert mem["ratio_vs_full"] == pytest.approx(frac, abs=0.03)
    built = lm.kv_memory["cache"]
    assert built["sink_selector"] == {"auto": "AutoSinks", "none": "NoSinks"}[sinks]


def test_fraction_lm_no_sinks_differs_from_auto(model, tok):
    """``recent-evict``'s baseline once ran with a sink: its scores must differ from sink-aware ones."""
    kw = dict(pretrained=model, tokenizer=tok, device="cpu", policy="evict", budget_frac=0.25)
    none = FractionLM(sinks="none", **kw)
    auto = FractionLM(sinks="auto", **kw)
    a = torch.tensor([s for s, _ in none.loglikelihood(_ll(400), disable_tqdm=True)])
    b = torch.tensor([s for s, _ in auto.loglikelihood(_ll(400), disable_tqdm=True)])
    assert (a - b).abs().max() > 1e-3
    assert none.kv_memory["cache"]["sink_selector"] == "NoSinks"
    assert auto.kv_memory["cache"]["sink_selector"] != "NoSinks"


def test_fraction_lm_budget_one_equals_full(model, tok):
    full = FractionLM(pretrained=model, tokenizer=tok, device="cpu", policy="full")
    ev = FractionLM(pretrained=model, tokenizer=tok, device="cpu", policy="evict", sinks="none", budget_frac=1.0, window_mode="rest")
    a = [s for s, _ in full.loglikelihood(_ll(150), disable_tqdm=True)]
    b = [s for s, _ in ev.loglikelihood(_ll(150), disable_tqdm=True)]
    assert a == pytest.approx(b, abs=1e-4)
    assert full.generate_until(_gen(80), disable_tqdm=True) == ev.generate_until(_gen(80), disable_tqdm=True)


def test_fraction_lm_rejects_bad_fraction(model, tok):
    with pytest.raises(ValueError, match="budget_frac"):
        FractionLM(pretrained=model, tokenizer=tok, device="cpu", policy="evict", budget_frac=1.5)


# ------------------------------------------------------------------------------------ quantized peer


def test_peer_quant_cache_measures_packed_tensors(model):
    ids = torch.randint(3, 200, (1, 200))
    c = PeerQuantCache("quanto", model.config, 2)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=c, use_cache=True)
    dense = c.dense_bytes()
    assert dense == 2 * 2 * 2 * 32 * 200 * 4  # K+V x layers x kv heads x head_dim x tokens x fp32
    # 2-bit codes + per-group scale/shift: far below fp32, above the bare 2/32 of the codes
    assert 2 / 32 < c.memory_bytes() / dense < 0.25
    q = c.layers[0]._quantized_keys
    assert tensor_bytes(q) < q.dequantize().numel() * 4 / 4


def test_quantized_peer_lm_scores_like_a_lossy_full_cache(model, tok):
    full = FractionLM(pretrained=model, tokenizer=tok, device="cpu", policy="full")
    q4 = QuantizedPeerLM(pretrained=model, tokenizer=tok, device="cpu", backend="quanto", nbits=4)
    a = torch.tensor([s for s, _ in full.loglikelihood(_ll(200), disable_tqdm=True)])
    b = torch.tensor([s for s, _ in q4.loglikelihood(_ll(200), disable_tqdm=True)])
    assert not torch.equal(a, b)  # quantized context
    assert torch.allclose(a, b, rtol=0.2, atol=2.0)
    assert 0.1 < q4.kv_memory["ratio_vs_full"] < 0.3
    # Generation runs against the quantized cache: text of the requested length, and int4 keeps
    # greedy decoding on the tiny model close enough to full that at least the first token agrees.
    g_full = full.generate_until(_gen(80), disable_tqdm=True)[0]
    g_q4 = q4.generate_until(_gen(80), disable_tqdm=True)[0]
    assert isinstance(g_q4, str) and 0 < len(g_q4) <= 6
    assert g_q4[:1] == g_full[:1]
    assert q4.kv_memory["per_task"]["t"]["requests"] == 1 + 2


# ------------------------------------------------------------------------------------ kvpress peer


FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys
    print(json.dumps({"ready": True, "versions": {"kvpress": "fake"}}), flush=True)
    seen = open(os.environ["FAKE_WORKER_LOG"], "w")
    for line in sys.stdin:
        req = json.loads(line)
        seen.write(line); seen.flush()
        if req["op"] == "exit":
            print(json.dumps({"peak_rss_bytes": 123}), flush=True); break
        n = len(req["ctx"])
        if req["op"] == "score":
            out = {"results": [[-float(len(t)), True] for t in req["targets"]],
                   "memory": [n] * len(req["conts"]), "dense": [2 * n] * len(req["conts"])}
        else:
            out = {"tokens": [req["stop_ids"][0]], "memory": [n], "dense": [4 * n], "echo_max_new": req["max_new"]}
        print(json.dumps(out), flush=True)
    """
)


def test_kvpress_lm_protocol_with_a_fake_worker(model, tok, tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setenv("SINKCACHE_KVPRESS_PYTHON", sys.executable)
    monkeypatch.setattr(lms_mod, "worker_script", lambda: script)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_WORKER_LOG", str(log))
    lm = KVPressLM(pretrained=model, tokenizer=tok, device="cpu", press="knorm", ratio=0.5, checkpoint=str(tmp_path))
    try:
        res = lm.loglikelihood(_ll(100), disable_tqdm=True)
        assert [r[0] for r in res] == [-4.0, -3.0]  # " abc" and " de" as byte tokens
        gen_req = _gen(60)
        gen = lm.generate_until(gen_req, disable_tqdm=True)
        assert gen == [""]  # the worker answered EOS at once
        score, generate = [json.loads(line) for line in log.read_text().splitlines()]
        # The worker sees the main environment's token ids: the context minus its last token is
        # prefilled (compressed), the last one is fed as the first decode step.
        ll_ctx = tok(_ll(100)[0].args[0], add_special_tokens=False)["input_ids"]
        assert score["op"] == "score" and score["ctx"] + [score["conts"][0][0]] == ll_ctx
        assert score["targets"] == [tok(c, add_special_tokens=False)["input_ids"] for c in (" abc", " de")]
        gen_ctx = tok(gen_req[0].args[0], add_special_tokens=False)["input_ids"]
        assert generate["ctx"] + [generate["last"]] == gen_ctx
        assert generate["max_new"] == 6 and generate["stop_ids"]
        mem = lm.kv_memory
        assert mem["requests"] == 3
        assert mem["per_task"]["t"]["mean_memory_bytes"] > 0
    finally:
        assert lm.close() == 123
    assert lm.peer == {"package": "kvpress", "press": "knorm", "compression_ratio": 0.5}


def test_missing_kvpress_venv_says_how_to_make_it(model, tok, monkeypatch, tmp_path):
    monkeypatch.delenv("SINKCACHE_KVPRESS_PYTHON", raising=False)
    assert lms_mod.kvpress_python() == lms_mod.KVPRESS_VENV / "bin" / "python"
    monkeypatch.setenv("SINKCACHE_KVPRESS_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(FileNotFoundError, match="run `make peers`"):
        KVPressLM(pretrained=model, tokenizer=tok, device="cpu", press="knorm", ratio=0.5, checkpoint=str(tmp_path))


def _kvpress_python() -> Path:
    return lms_mod.kvpress_python()


@pytest.mark.skipif(
    not _kvpress_python().exists() or os.environ.get("SINKCACHE_TEST_KVPRESS") != "1",
    reason="needs the kvpress virtualenv and SINKCACHE_TEST_KVPRESS=1 (starts two workers: ~10-60 s)",
)
def test_kvpress_worker_without_compression_equals_full_cache(model, tok, tmp_path):
    ckpt = tmp_path / "tiny"
    model.save_pretrained(ckpt)
    full = FractionLM(pretrained=model, tokenizer=tok, device="cpu", policy="full")
    a = [s for s, _ in full.loglikelihood(_ll(120), disable_tqdm=True)]
    g_full = full.generate_until(_gen(80), disable_tqdm=True)
    lm = KVPressLM(pretrained=model, tokenizer=tok, device="cpu", press="knorm", ratio=0.0, checkpoint=str(ckpt))
    try:
        b = [s for s, _ in lm.loglikelihood(_ll(120), disable_tqdm=True)]
        assert lm.generate_until(_gen(80), disable_tqdm=True) == g_full
    finally:
        lm.close()
    assert a == pytest.approx(b, abs=1e-3)
    lm2 = KVPressLM(pretrained=model, tokenizer=tok, device="cpu", press="knorm", ratio=0.5, checkpoint=str(ckpt))
    try:
        lm2.loglikelihood(_ll(200), disable_tqdm=True)
        assert lm2.kv_memory["ratio_vs_full"] == pytest.approx(0.5, abs=0.03)
    finally:
        lm2.close()


# ------------------------------------------------------------------------------------ cells, sweep, results


def test_run_cell_on_two_tasks(model, tok):
    cell = Cell("sink-evict", budget=25.0, tasks=("sinkcache_kv_retrieval", PPL_TASK))
    rec = run_cell(cell, "tiny", limit=1, model=model, tokenizer=tok)
    s = rec["summary"]
    assert set(s["per_task"]) == {"sinkcache_kv_retrieval"}
    assert s["bits_per_byte"] is not None and s["bits_per_byte"] > 0
    assert s["kv_ratio"] == pytest.approx(0.25, abs=0.03)
    assert rec["time_s"]["wall"] > 0 and rec["peak_rss_bytes"] > 0
    assert rec["memory"]["per_task"].keys() == {"sinkcache_kv_retrieval", PPL_TASK}


def test_summarize_averages_accuracy_tasks():
    cell = Cell("full", tasks=SUITE_TASKS)
    scores = {"sinkcache_passkey": {"exact_match,first_number": 1.0}, "sinkcache_facts_mc": {"acc,none": 0.5}, PPL_TASK: {"bits_per_byte,none": 1.2}}
    s = summarize(cell, scores, {"ratio_vs_full": 1.0})
    assert s["suite_score"] == pytest.approx(0.75)
    assert s["bits_per_byte"] == 1.2 and s["per_task"]["sinkcache_niah_multikey"] is None


def _fake_record(spec: dict, score: float) -> dict:
    cell = Cell.from_dict(spec["cell"])
    ratio = (cell.budget or 100) / 100 * (1 if cell.bits is None else cell.bits / 32)
    summary = {"per_task": {t: score for t in ("sinkcache_passkey",)}, "suite_score": score, "bits_per_byte": 1.0 + (1 - ratio),
               "kv_ratio": ratio, "mean_kv_bytes": 1000 * ratio, "mean_full_kv_bytes": 1000.0}
    return {"key": spec["key"], "cell": spec["cell"], "cell_id": cell.cell_id, "group": cell.group, "setting": cell.setting,
            "summary": summary, "scores": {}, "memory": {}, "time_s": {"wall": 1.0}, "peak_rss_bytes": 2**20,
            "model": spec.get("model"), "limit": spec.get("limit"), "code": spec.get("code"),
            "docs": {"sinkcache_passkey": {str(i): float(i % 2) for i in range(spec.get("limit") or 1)}}}


def _fake_part(cell_id: str, shard: int, shards: int, limit: int) -> dict:
    docs = {"sinkcache_passkey": {str(i): float((i + len(cell_id)) % 2) for i in range(shard, limit, shards)}}
    return {"docs": docs, "lm_eval_scores": {}, "n_samples": {}, "cache_requested": {},
            "kv": {"records": [["sinkcache_passkey", "generate_until", 10.0, 40.0]], "configs": [{"policy": cell_id}], "attended": []}}


def _fake_runner(specs: list[dict]):
    """A process runner that writes fork-shard parts and peer records without a model."""

    def runner(spec_path: Path, out_path: Path, log_path: Path) -> int:
        spec = json.loads(spec_path.read_text())
        specs.append(spec)
        if "cells" in spec:
            ids = [Cell.from_dict(c).cell_id for c in spec["cells"]]
            out_path.write_text(json.dumps({
                "keys": spec["keys"], "parts": {i: _fake_part(i, spec["shard"], spec["shards"], spec["limit"]) for i in ids},
                "timing": {"wall_s": 5.0, "shared_prefill_s": 1.0, "prefills": 3, "member_s": dict.fromkeys(ids, 1.0)},
                "peak_rss_bytes": 1, "num_threads": 1, "versions": {},
            }))
        else:
            out_path.write_text(json.dumps(_fake_record(spec, 0.5)))
        return 0

    return runner


def test_sweep_resumes_and_writes_results(tmp_path):
    calls: list[str] = []

    def runner(spec_path: Path, out_path: Path, log_path: Path) -> int:
        spec = json.loads(spec_path.read_text())
        calls.append(spec["cell"]["policy"] + str(spec["cell"]["budget"] or spec["cell"]["bits"]))
        if spec["cell"]["policy"] == "kivi" and spec["cell"]["bits"] == 2 and len([c for c in calls if c == "kivi2"]) == 1:
            return 1  # first attempt of this cell fails
        out_path.write_text(json.dumps(_fake_record(spec, 0.5)))
        return 0

    cells = plan(["full", "sink-evict", "kivi"], [50, 25], [4, 2])
    res = run_sweep("tiny", cells, tmp_path, limit=1, runner=runner, progress=False, fork=False)
    assert len(calls) == 5 and len(res["done"]) == 4 and [f["cell_id"] for f in res["failed"]] == ["kivi_2bit"]
    res2 = run_sweep("tiny", cells, tmp_path, limit=1, runner=runner, progress=False, fork=False)
    assert calls[5:] == ["kivi2"] and res2["skipped"] == 4 and len(res2["done"]) == 5 and not res2["failed"]
    res3 = run_sweep("tiny", cells, tmp_path, limit=2, runner=runner, progress=False, fork=False)  # other limit: redo all
    assert res3["skipped"] == 0 and len(calls) == 11
    write_results(tmp_path, "tiny", res3["done"], {"limit": 2, "seed": 0, "planned": 5, "command": "sinkcache compare tiny"})
    md = (tmp_path / "results.md").read_text()
    cells_table = md.split("## Paired differences")[0]  # the per-cell table names policies, not cell ids
    assert "| ours | sink-evict | 50% tokens | 50.0 |" in cells_table and "kivi_2bit" not in cells_table
    assert "| baseline | kivi | int2 | 6.2 |" in cells_table and "| kivi_2bit | full | reference |" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert [c["cell_id"] for c in data["cells"]] == [c.cell_id for c in interleave(cells)]
    png = tmp_path / "accuracy_vs_kv_memory.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_two_document_shards_give_the_single_process_record(model, tok):
    """Documents dealt over 2 processes (here: 2 calls) merge into exactly one process's scores."""
    from sinkcache.compare.cell import record_from_parts, run_fork_shard

    tasks = ("sinkcache_kv_retrieval", "sinkcache_facts_mc", PPL_TASK)
    cells = [Cell("full", tasks=tasks), Cell("kivi", bits=2, tasks=tasks), Cell("sink-evict", budget=25.0, tasks=tasks)]
    one = run_fork_shard(cells, "tiny", limit=4, model=model, tokenizer=tok)
    two = [run_fork_shard(cells, "tiny", limit=4, shard=k, shards=2, model=model, tokenizer=tok) for k in (0, 1)]
    for c in cells:
        a = record_from_parts(c, [one["parts"][c.cell_id]])
        b = record_from_parts(c, [t["parts"][c.cell_id] for t in two])
        assert a["docs"] == b["docs"] and a["scores"] == b["scores"], c.cell_id
        assert a["n_docs"] == {"sinkcache_kv_retrieval": 4, "sinkcache_facts_mc": 4, PPL_TASK: 4}
        assert a["memory"]["mean_memory_bytes"] == pytest.approx(b["memory"]["mean_memory_bytes"])
        assert a["cache"] == b["cache"]
        # the scores computed from documents are lm-eval's own aggregates
        for task, metrics in a["scores"].items():
            for m, v in metrics.items():
                assert v == pytest.approx(a["lm_eval_scores"][task][m]), (task, m)
    assert set(two[0]["parts"]["full"]["docs"]["sinkcache_kv_retrieval"]) == {"0", "2"}


def test_sweep_forks_in_package_cells_and_runs_peers_alone(tmp_path):
    specs: list[dict] = []
    runner = _fake_runner(specs)

    cells = plan(["full", "kivi", "sink-quant", "hf-quanto"], [50], [2], tasks=["sinkcache_passkey"])
    res = run_sweep("tiny", cells, tmp_path, limit=6, jobs=2, runner=runner, progress=False)
    forks = [s for s in specs if "cells" in s]
    assert [(s["shard"], s["shards"]) for s in forks] == [(0, 2), (1, 2)]
    assert sorted(Cell.from_dict(c).cell_id for c in forks[0]["cells"]) == ["full", "kivi_2bit", "sink-quant_2bit"]
    assert [s["cell"]["policy"] for s in specs if "cell" in s] == ["hf-quanto"]  # peers keep their own runs
    assert len(res["done"]) == 4 and not res["failed"]
    kivi = json.loads((tmp_path / "cells" / "kivi_2bit.json").read_text())
    assert kivi["n_docs"] == {"sinkcache_passkey": 6} and kivi["fork"]["shards"] == 2 and kivi["fork"]["members"] == 3
    assert kivi["key"] == run_key("tiny", 6, 0, Cell("kivi", bits=2, tasks=("sinkcache_passkey",)))
    n = len(specs)
    res2 = run_sweep("tiny", cells, tmp_path, limit=6, jobs=2, runner=runner, progress=False)
    assert len(specs) == n and res2["skipped"] == 4  # everything reused


def test_fork_shards_split_the_group_into_resumable_pieces(tmp_path):
    specs: list[dict] = []
    cells = plan(["full", "kivi"], [50], [2], tasks=["sinkcache_passkey"])
    run_sweep("tiny", cells, tmp_path, limit=6, jobs=1, fork_shards=3, runner=_fake_runner(specs), progress=False)
    assert [(s["shard"], s["shards"]) for s in specs] == [(0, 3), (1, 3), (2, 3)]
    kivi = json.loads((tmp_path / "cells" / "kivi_2bit.json").read_text())
    assert kivi["n_docs"] == {"sinkcache_passkey": 6} and kivi["fork"]["shard_wall_s"] == [5.0] * 3 and kivi["fork"]["jobs"] == 1
    # an interrupted grid: two pieces finished, no cell written yet -> only the missing piece runs
    (tmp_path / "parts" / "fork_2of3.json").unlink()
    for c in cells:
        (tmp_path / "cells" / f"{c.cell_id}.json").unlink()
    specs.clear()
    res = run_sweep("tiny", cells, tmp_path, limit=6, jobs=1, fork_shards=3, runner=_fake_runner(specs), progress=False)
    assert [s["shard"] for s in specs] == [1] and len(res["done"]) == 2
    with pytest.raises(ValueError, match="fork_shards=0"):
        run_sweep("tiny", cells, tmp_path / "x", limit=6, fork_shards=0, runner=_fake_runner([]), progress=False)


def test_a_single_in_package_cell_is_dealt_over_shards_only_when_asked(tmp_path):
    cells = plan(["sink-quant"], [50], [2], tasks=["sinkcache_passkey"])
    specs: list[dict] = []
    run_sweep("tiny", cells, tmp_path / "one", limit=6, jobs=1, runner=_fake_runner(specs), progress=False)
    assert [s["cell"]["policy"] for s in specs] == ["sink-quant"] and not any("cells" in s for s in specs)
    specs.clear()
    run_sweep("tiny", cells, tmp_path / "two", limit=6, jobs=2, fork_shards=2, runner=_fake_runner(specs), progress=False)
    assert [(s["shard"], s["shards"], len(s["cells"])) for s in specs] == [(0, 2, 1), (1, 2, 1)]
    rec = json.loads((tmp_path / "two" / "cells" / "sink-quant_2bit.json").read_text())
    assert rec["n_docs"] == {"sinkcache_passkey": 6} and rec["fork"]["members"] == 1 and rec["fork"]["shards"] == 2


def test_report_covers_every_finished_cell_and_keeps_each_command(tmp_path):
    from sinkcache.compare import run_compare

    specs: list[dict] = []
    common = dict(bits=[2], tasks=["sinkcache_passkey"], out_dir=tmp_path, runner=_fake_runner(specs), progress=False)
    run_compare("tiny", policies=["full", "kivi", "sink-quant"], budgets=[50], limit=6, command="ours at 6", **common)
    run_compare("tiny", policies=["hf-quanto"], budgets=[50], limit=4, command="peers at 4", **common)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [c["cell_id"] for c in data["cells"]] == ["full", "sink-quant_2bit", "kivi_2bit", "hf-quanto_2bit"]
    assert [r["command"] for r in data["meta"]["runs"]] == ["ours at 6", "peers at 4"]
    assert [r["limit"] for r in data["meta"]["runs"]] == [6, 4]
    md = (tmp_path / "results.md").read_text()
    assert "* `ours at 6`" in md and "* `peers at 4`" in md and "Documents per task: 6 (3 cells), 4 (1 cell)" in md
    peer = [d for d in data["analysis"]["comparisons"] if d["other"] == "hf-quanto_2bit"]
    assert len(peer) == 1  # the peer from the second sweep is paired with ours from the first
    # --report-only: nothing runs, the same cells are reported, the command history is unchanged
    n = len(specs)
    res = run_compare("tiny", policies=["full"], budgets=[50], limit=6, command="report", report_only=True, **common)
    assert len(specs) == n and res["reported"] == 4
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r["command"] for r in again["meta"]["runs"]] == ["ours at 6", "peers at 4"]
    # --import: another sweep's folder adds its cells and its command
    other_dir = tmp_path.parent / (tmp_path.name + "_other")
    run_compare("tiny", policies=["hf-hqq"], budgets=[50], limit=4, command="hqq elsewhere",
                **(common | {"out_dir": other_dir}))
    res = run_compare("tiny", policies=["full"], budgets=[50], limit=6, report_only=True, import_dirs=[other_dir], **common)
    assert res["reported"] == 5
    imported = json.loads((tmp_path / "results.json").read_text())
    assert [r["command"] for r in imported["meta"]["runs"]] == ["ours at 6", "peers at 4", "hqq elsewhere"]
    with pytest.raises(ValueError, match="no finished cells of tiny"):
        run_compare("tiny", policies=["full"], budgets=[50], limit=6, report_only=True, import_dirs=[tmp_path / "nothing"], **common)
    # a cell of another model in the same directory is not reported
    other = dict(data["cells"][0], model="other", cell_id="kivi_4bit")
    (tmp_path / "cells" / "kivi_4bit.json").write_text(json.dumps(other))
    assert run_compare("tiny", policies=["full"], budgets=[50], limit=6, report_only=True, **common)["reported"] == 5


def test_cli_dry_run_lists_cells(capsys):
    from sinkcache.cli import main

    assert main(["compare", "tiny", "--policies", "sink-evict,hf-quanto", "--budgets", "50,25", "--bits", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert [line.split("\t")[0] for line in out if line] == ["sink-evict_b50", "sink-evict_b25", "hf-quanto_2bit"]
    assert main(["compare", "tiny", "--policies", "bogus", "--dry-run"]) == 2


def test_peer_quant_cache_keeps_sliding_layers_of_gemma3(tiny):
    model = tiny("gemma3")
    ids = torch.randint(3, 100, (1, 40))
    c = PeerQuantCache("quanto", model.config, 4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = model(input_ids=ids, past_key_values=c, use_cache=True).logits
        step = model(input_ids=ids[:, :1], past_key_values=c, use_cache=True).logits
    assert torch.allclose(ref, out, atol=1e-5)  # the prompt itself is attended exactly
    assert torch.isfinite(step).all()
    kinds = [type(layer).__name__ for layer in c.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "QuantoQuantizedLayer"] * 2
    assert 0 < c.memory_bytes() < c.dense_bytes()
