"""``sinkcache bench`` and the fast decode-path helpers it motivated (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prompt
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkcache.bench import (
    CacheSpec,
    format_rows,
    kv_bytes,
    run_bench,
    summarize,
    tensor_bytes,
    write_results,
)
from sinkcache.cli import build_parser
from sinkcache.layers import _keep_order, _take
from sinkcache.quant import (
    QuantizedKeys,
    QuantizedValues,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
    unpack,
)


def _reference_keep(prio: torch.Tensor, n: int) -> torch.Tensor:
    return prio.argsort(dim=-1, descending=True, stable=True)[..., :n].sort(dim=-1).values


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 40), drop=st.integers(1, 3), levels=st.integers(1, 4), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_keep_order_matches_stable_argsort(t, drop, levels, nan, seed):
    # Few distinct levels make many ties: the fast one-drop path must break them like the stable sort.
    g = torch.Generator().manual_seed(seed)
    prio = torch.randint(0, levels, (2, 3, t), generator=g).float()
    if nan:
        prio[0, 1, torch.randint(0, t, (1,), generator=g)] = float("nan")
    n = max(t - drop, 1)
    assert torch.equal(_keep_order(prio, n), _reference_keep(prio, n))


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 2, 9), (3, 1, 4, 2, 2)])
def test_take_equals_gather(shape):
    t = torch.randn(*shape)
    idx = torch.stack([torch.randperm(shape[2])[:4].sort().values for _ in range(shape[0] * shape[1])]).view(shape[0], shape[1], 4)
    ref = t.gather(2, idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:]))
    assert torch.equal(_take(t, idx), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("vgroup", [16, 8])
def test_fast_dequantize_is_one_fused_rounding(dtype, bits, vgroup):
    """The fast dequantisers equal zero + codes * scale computed in one addcmul (one rounding)."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 32, 16, generator=g) * 4).to(dtype)
    qk, qv = quantize_keys(x, bits, 8), quantize_values(x, bits, vgroup)
    ck = unpack(qk.codes, bits).to(dtype).view(2, 3, 4, 8, 16)
    ref_k = torch.addcmul(qk.zero.unsqueeze(3), ck, qk.scale.unsqueeze(3)).view_as(x)
    cv = unpack(qv.codes, bits).to(dtype).view(2, 3, 32, 16 // vgroup, vgroup)
    ref_v = torch.addcmul(qv.zero.unsqueeze(-1), cv, qv.scale.unsqueeze(-1)).view_as(x)
    out = torch.full((2, 3, 40, 16), float("nan"), dtype=dtype)
    # Into a view of a larger buffer, as QuantizedLayer does.
    assert torch.equal(dequantize_keys(QuantizedKeys(qk.codes, qk.scale, qk.zero), bits, 8, out[:, :, 3:35]), ref_k)
    assert torch.equal(dequantize_values(QuantizedValues(qv.codes, qv.scale, qv.zero), bits, vgroup, out[:, :, 5:37]), ref_v)


def test_tensor_bytes_walks_quanto_tensors():
    from optimum.quanto import MaxOptimizer, qint4, quantize_weight

    t = torch.randn(1, 2, 128, 64)
    scale, shift = MaxOptimizer()(t, qint4, 0, 64)
    q = quantize_weight(t, qint4, 0, scale, shift, 64)
    # 4-bit codes are half a byte per element; scale and shift are float32 per group.
    assert tensor_bytes(q) == t.numel() // 2 + scale.numel() * 4 + shift.numel() * 4
    assert tensor_bytes(torch.zeros(3, dtype=torch.float16)) == 6 and tensor_bytes(None) == 0


SPECS = [
    CacheSpec("dynamic", "DynamicCache", "dynamic"),
    CacheSpec("evict", "evict 48", "sinkcache", dict(policy="evict", budget=48, window=16, sinks="first")),
    CacheSpec("int4", "int4", "sinkcache", dict(policy="quantize", bits=4, window=8, group_size=16, sinks="first")),
    CacheSpec("int2-auto", "int2 auto", "sinkcache", dict(policy="quantize", bits=2, window=8, group_size=16)),
    CacheSpec("quanto4", "quanto int4", "quanto", dict(nbits=4, q_group_size=32)),
]


def test_run_bench_on_tiny_model(tiny, tmp_path):
    model = tiny("llama", attn="sdpa")
    ids = prompt(100)
    runs = run_bench(model, ids, contexts=(40, 96), specs=SPECS, reps=2, decode_tokens=3, log=None)
    # every cache at every context and rep, the baseline once per (context, rep)
    assert sorted((r.cache, r.context, r.rep) for r in runs) == sorted(
        (s.name, c, k) for s in SPECS for c in (40, 96) for k in range(2)
    )
    for r in runs:
        assert len(r.step_s) == 3 and all(s > 0 for s in r.step_s) and r.prefill_s > 0 and len(r.tokens) == 3
        assert r.cache == "dynamic" or len(r.baseline_step_s) == 3  # A B pairs
    cfg = model.config
    rows = summarize(runs, SPECS, dtype_bytes=4)
    by = {(r["context"], r["cache"]): r for r in rows}
    assert len(rows) == 2 * len(SPECS)
    for ctx in (40, 96):
        base = by[(ctx, "dynamic")]
        dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (ctx + 3) * cfg.head_dim * 4
        assert base["kv_bytes"] == dense and base["kv_x"] == 1.0 and base["kv_x16"] == 0.5
        assert base["prefill_x"] == 1.0 and base["decode_x"] == 1.0 and base["agree"] == 1.0
        assert by[(ctx, "int4")]["kv_x"] > 1.0 and by[(ctx, "quanto4")]["kv_x"] > 1.0
    # eviction holds the same bytes at every context past its budget
    assert by[(40, "evict")]["kv_bytes"] < by[(96, "evict")]["kv_bytes"] or by[(96, "evict")]["kv_x"] > 1.0
    ev = [r.kv_bytes for r in runs if r.cache == "evict" and r.context == 96]
    assert by[(96, "evict")]["kv_x"] > 1.9 and len(set(ev)) == 1
    meta = {
        "model": "tiny-llama", "dtype": "float32", "decode_tokens": 3, "reps": 2, "budget": 48, "command": "test",
        "seconds": 1.0, "load_before": [0, 0, 0], "load_after": [0, 0, 0],
        "machine": {"machine": "x", "cpus": 2, "torch": torch.__version__, "threads": 1},
    }
    paths = write_results(runs, rows, meta, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["runs"]) == len(runs) and data["summary"][0]["cache"] == "dynamic"
    md = paths["md"].read_text()
    assert "| context | cache |" in md and "quanto int4" in md and "load average" in md
    assert paths["png"].stat().st_size > 1000
    assert "evict" in format_rows(rows)


def test_kv_bytes_counts_what_each_cache_holds(tiny):
    from transformers import DynamicCache

    model = tiny("llama", attn="sdpa")
    with torch.inference_mode():
        c = DynamicCache(config=model.config)
        model(input_ids=prompt(20), past_key_values=c, use_cache=True)
    cfg = model.config
    assert kv_bytes(c) == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 20 * cfg.head_dim * 4


def test_run_bench_rejects_bad_setups(tiny):
    model = tiny("llama", attn="sdpa")
    with pytest.raises(ValueError, match="baseline"):
        run_bench(model, prompt(20), contexts=(10,), specs=SPECS[1:], reps=1, decode_tokens=1, log=None)
    with pytest.raises(ValueError, match="exceeds"):
        run_bench(model, prompt(20), contexts=(30,), specs=SPECS, reps=1, decode_tokens=1, log=None)
    with pytest.raises(ValueError, match="unknown"):
        CacheSpec("x", "x", "nope").build(model)


def test_run_bench_builds_every_cache_before_measuring(tiny, monkeypatch):
    """A cache whose options are rejected fails before any cache is measured, naming it."""
    import sinkcache.bench as bench_mod

    model = tiny("llama", attn="sdpa")
    bad = CacheSpec("hybrid-small", "hybrid", "sinkcache", dict(policy="hybrid", bits=2, budget=20, window=8, group_size=16))
    measured: list[int] = []
    real = bench_mod._prefill
    monkeypatch.setattr(bench_mod, "_prefill", lambda *a, **k: measured.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match="cache 'hybrid-small': budget=20"):
        run_bench(model, prompt(40), contexts=(30,), specs=[*SPECS, bad], reps=1, decode_tokens=1, log=None)
    assert measured == []


def test_bench_subcommand_is_registered():
    args = build_parser().parse_args(["bench", "--quick", "--contexts", "64,128", "--caches", "int4,evict"])
    assert args.quick and args.contexts == "64,128" and args.threads == 1


def test_first_step_is_reported_apart_from_steady_decode():
    from sinkcache.bench import Run, steady_tps

    # A compressing cache's first decode step quantizes the whole prompt: it must not be averaged in.
    base = Run("dynamic", 10, 0, 1.0, [0.1, 0.1, 0.1], 100, 0, 0, [1, 2, 3])
    cache = Run("int4", 10, 0, 1.0, [0.9, 0.2, 0.2], 25, 0, 0, [1, 2, 3], baseline_step_s=[0.3, 0.1, 0.1])
    specs = [CacheSpec("dynamic", "d", "dynamic"), CacheSpec("int4", "q", "sinkcache")]
    rows = {r["cache"]: r for r in summarize([base, cache], specs, dtype_bytes=4)}
    assert steady_tps([0.9, 0.2, 0.2]) == pytest.approx(5.0) and steady_tps([0.5]) == pytest.approx(2.0)
    assert rows["int4"]["decode_tps"] == pytest.approx(5.0) and rows["int4"]["decode_x"] == pytest.approx(0.5)
    assert rows["int4"]["first_step_ms"] == pytest.approx(900.0) and rows["int4"]["first_step_x"] == pytest.approx(3.0)
    assert rows["int4"]["ms_per_token"] == pytest.approx(200.0)


def test_spec_meta_is_json_safe_and_keeps_option_objects_readable():
    from sinkcache.bench import _spec_meta, default_specs

    meta = json.loads(json.dumps(_spec_meta(default_specs())))
    assert meta["int2-refine-keynorm"]["options"]["refine"].startswith("Refinement(")
    assert "keynorm" in meta["int2-refine-keynorm"]["options"]["refine"]
    assert meta["int2-refine"]["options"] == {"policy": "quantize", "bits": 2, "refine": 0.14}
