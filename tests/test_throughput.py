"""``sinkcache.throughput``: the batch each cache fits in a KV budget, and what it decodes (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prompt

from sinkcache.bench import CacheSpec, kv_bytes
from sinkcache.throughput import batch_windows, fixed_memory_throughput, to_markdown, write

SPECS = [
    CacheSpec("dynamic", "DynamicCache", "dynamic"),
    CacheSpec("int2", "int2", "sinkcache", dict(policy="quantize", bits=2, window=8, group_size=16, sinks="none")),
    CacheSpec("evict", "evict 24", "sinkcache", dict(policy="evict", budget=24, window=8, sinks="first")),
]


def test_batch_windows_are_distinct_windows_of_the_text():
    ids = torch.arange(100).view(1, 100)
    w = batch_windows(ids, 4, 40)
    assert w.shape == (4, 40) and len({tuple(r.tolist()) for r in w}) == 4
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 40)) for r in w)
    with pytest.raises(ValueError, match="context 200 exceeds the 100"):
        batch_windows(ids, 2, 200)


def test_fixed_memory_batches_follow_measured_bytes(tiny, tmp_path):
    model = tiny("llama", attn="sdpa")
    ids = prompt(120)
    cfg = model.config
    dense_per_seq = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (64 + 4) * cfg.head_dim * 4
    budget = 3 * dense_per_seq + 10  # DynamicCache fits exactly three sequences
    rows = fixed_memory_throughput(model, ids, SPECS, kv_budget_bytes=budget, context=64, decode_tokens=4, max_batch=64, log=None)
    by = {r.cache: r for r in rows}
    assert by["dynamic"].per_sequence_bytes == dense_per_seq and by["dynamic"].batch == 3
    for r in rows:
        # the batch is what the probed bytes allow, and the cache really held <= budget at that batch
        assert r.batch == min(budget // r.per_sequence_bytes, 64) and r.fits and 0 < r.kv_bytes <= budget
        assert r.kv_bytes == pytest.approx(r.batch * r.per_sequence_bytes, rel=0.02)
        assert r.tokens_per_s > 0 and len(r.step_s) == 3 and r.built
    assert by["int2"].batch >= 2 * by["dynamic"].batch and by["evict"].batch > by["dynamic"].batch
    assert by["dynamic"].x == 1.0 and by["int2"].built["bits"] == 2 and by["int2"].built["sinks"] == "none"
    meta = {
        "model": "tiny", "dtype": "float32", "device": "cpu", "kv_budget_mib": budget / 2**20, "context": 64,
        "decode_tokens": 4, "max_batch": 64, "command": "test", "seconds": 1.0, "load_before": [0], "load_after": [0],
        "machine": {"machine": "x", "cpus": 2, "torch": torch.__version__, "threads": 1},
    }
    paths = write(rows, meta, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"][1]["batch"] == by["int2"].batch
    assert "| quantize, int2, no sinks |" in to_markdown(rows, meta) and paths["png"].stat().st_size > 1000


def test_max_batch_cap_is_recorded(tiny):
    model = tiny("llama", attn="sdpa")
    rows = fixed_memory_throughput(model, prompt(80), SPECS[:2], kv_budget_bytes=2**30, context=32, decode_tokens=2, max_batch=2, log=None)
    assert all(r.batch == 2 and r.capped for r in rows)


def test_bad_throughput_arguments():
    with pytest.raises(ValueError, match="first spec must be the DynamicCache"):
        fixed_memory_throughput(None, prompt(10), SPECS[1:], kv_budget_bytes=1, context=4)
    with pytest.raises(ValueError, match="decode_tokens=1 >= 2"):
        fixed_memory_throughput(None, prompt(10), SPECS, kv_budget_bytes=1, context=4, decode_tokens=1)


def test_a_cache_the_options_reject_fails_before_anything_is_measured(tiny, monkeypatch):
    """A spec whose options its cache rejects (here a hybrid budget too small for its sink) fails up
    front, naming the cache, before the specs listed before it are measured."""
    import sinkcache.throughput as tp

    model = tiny("llama", attn="sdpa")
    bad = CacheSpec("hybrid-small", "hybrid", "sinkcache", dict(policy="hybrid", bits=2, budget=20, window=8, group_size=16))
    runs: list[str] = []
    real = tp._run
    monkeypatch.setattr(tp, "_run", lambda m, spec, *a: runs.append(spec.name) or real(m, spec, *a))
    with pytest.raises(ValueError, match="cache 'hybrid-small': budget=20"):
        fixed_memory_throughput(model, prompt(80), [*SPECS, bad], kv_budget_bytes=2**20, context=32, decode_tokens=2, log=None)
    assert runs == []


def test_bench_refuses_a_device_it_cannot_use():
    # bench shares compare's/eval's --device check (sinkcache.placement): no silent CPU fallback
    from sinkcache.bench import bench

    with pytest.raises(ValueError, match="'tpu9'"):
        bench("smollm2-135m", device="tpu9", out_dir="/tmp/never")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            bench("smollm2-135m", device="cuda", out_dir="/tmp/never")


def test_kv_bytes_of_a_batched_cache_scales_with_batch(tiny):
    model = tiny("llama", attn="sdpa")
    one, two = (SPECS[1].build(model), SPECS[1].build(model))
    with torch.inference_mode():
        model(input_ids=prompt(40), past_key_values=one, use_cache=True)
        model(input_ids=prompt(40).repeat(2, 1), past_key_values=two, use_cache=True)
    assert kv_bytes(two) == 2 * kv_bytes(one)
