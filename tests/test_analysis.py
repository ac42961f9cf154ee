"""Sink detection and analysis on a tiny Llama with a planted sink.

The planted model: every query carries a constant component in one head dimension (fed by a
hidden feature all embeddings share) and only the token ``SINK`` has a key in that dimension, so
every query attends to it. The dimension is the last rotary pair, whose frequency is so low that
RoPE leaves the alignment intact over a few hundred positions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from planted import NORMAL, SINK, planted_model

from sinkcache import SinkCache
from sinkcache.analysis import (
    analyze,
    attention_pass,
    detect_command,
    eager_attention,
    received_from_following,
    token_class,
)
from sinkcache.attention import attention_modules
from sinkcache.sinks.auto import AutoSinks, received_attention


def planted_ids(length: int = 96, sink_at: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 128, (1, length), generator=g)
    ids[ids == SINK] = NORMAL
    ids[0, sink_at] = SINK
    return ids


class FakeTokenizer:
    """Enough of a tokenizer for analyze()/detect_command(): one id per character-ish word."""

    bos_token_id = None

    def decode(self, ids):
        out = []
        for i in ids:
            i = int(i)
            out.append("." if i == SINK else "\n" if i == 3 else f" w{i}")
        return "".join(out)

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [SINK if w == "." else 3 if w == "\\n" else 10 + (sum(map(ord, w)) % 100) for w in text.split()]

        class Enc:
            pass

        enc = Enc()
        enc.input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return enc


# ---------------------------------------------------------------------------------------------
# the runtime detector (sinkcache.sinks.auto)


def _capture(model, ids):
    """hidden_states and position embeddings seen by layer 0's attention module."""
    got = {}

    def hook(module, args, kwargs, output):
        got.setdefault("hs", kwargs["hidden_states"])
        got.setdefault("pe", kwargs["position_embeddings"])
        got.setdefault("w", output[1])

    mod = attention_modules(model)[0][1]
    h = mod.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return mod, got


def test_received_attention_finds_planted_sink():
    model = planted_model()
    ids = planted_ids(96, sink_at=20)
    mod, got = _capture(model, ids)
    with torch.no_grad():
        att = received_attention(mod, got["hs"], got["pe"][0], got["pe"][1], obs_window=32)
    assert att.shape == (1, 2, 96)
    assert torch.allclose(att.sum(-1), torch.ones(1, 2), atol=1e-4)  # mean of softmax rows
    assert bool((att[0, :, 20] > 0.5).all()), att[0, :, 20]
    others = att[0].clone()
    others[:, 20] = 0
    assert float(others.max()) < 0.05


def test_received_attention_matches_eager_weights():
    model = planted_model(attn="eager")
    ids = planted_ids(64, sink_at=10)
    mod, got = _capture(model, ids)
    with torch.no_grad():
        att = received_attention(mod, got["hs"], got["pe"][0], got["pe"][1], obs_window=16)
    ref = got["w"][0, :, -16:, :].float().view(2, 2, 16, 64).mean(dim=(1, 2))
    torch.testing.assert_close(att[0], ref, atol=1e-5, rtol=1e-4)


def test_no_sink_without_the_planted_token():
    model = planted_model()
    ids = planted_ids(96, sink_at=20)
    ids[0, 20] = NORMAL
    mod, got = _capture(model, ids)
    with torch.no_grad():
        att = received_attention(mod, got["hs"], got["pe"][0], got["pe"][1], obs_window=32)
    assert float(att[0, :, 1:].max()) < 0.05


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_auto_sinks_keep_planted_sink_in_cache(attn):
    model = planted_model(attn=attn)
    ids = planted_ids(96, sink_at=20)
    cache = SinkCache(policy="quantize", bits=2, window=0, group_size=16, sinks="auto", model=model)
    assert isinstance(cache.sink_selector, AutoSinks)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)  # compresses the prompt
    layer = cache.layers[0]
    cols = {int(c) for c in layer.sink_col[0].flatten() if int(c) >= 0}
    assert 20 in cols and 0 in cols
    assert cols <= {0, 20}, cols  # no ordinary token became a sink
    # both kv heads keep it
    for h in range(2):
        assert 20 in layer.sink_col[0, h].tolist()
    cache.detach()


@pytest.mark.parametrize("threshold, expected", [(0.5, {0, 20}), (0.7, {0})])
def test_auto_sinks_threshold_controls_marks(threshold, expected):
    model = planted_model(strength=1.0)  # the planted key draws ~0.62 of the observed attention
    ids = planted_ids(96, sink_at=20)
    cache = SinkCache(policy="quantize", bits=2, window=0, group_size=16, sinks=AutoSinks(threshold=threshold), model=model)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    cols = {int(c) for c in cache.layers[0].sink_col[0].flatten() if int(c) >= 0}
    assert cols == expected
    cache.detach()


# ---------------------------------------------------------------------------------------------
# analysis


def test_token_class():
    assert token_class("anything", 0) == "first"
    assert token_class(".", 3) == "punctuation"
    assert token_class(" --", 3) == "punctuation"
    assert token_class("\n\n   ", 3) == "newline"
    assert token_class(".\n", 3) == "newline"
    assert token_class(" the", 3) == "other"
    assert token_class(" ", 3) == "other"


def test_received_from_following_matches_loop():
    torch.manual_seed(0)
    t = 20
    a = torch.rand(3, t, t).tril()
    a = a / a.sum(-1, keepdim=True)
    got = received_from_following(a, span=5, min_queries=2)
    for h in range(3):
        for s in range(t):
            qs = list(range(s + 1, min(s + 5, t - 1) + 1))
            if len(qs) < 2:
                assert math.isnan(float(got[h, s]))
            else:
                assert float(got[h, s]) == pytest.approx(float(a[h, qs, s].mean()), abs=1e-6)
    all_ = received_from_following(a, span=None, min_queries=1)
    assert float(all_[0, 3]) == pytest.approx(float(a[0, 4:, 3].mean()), abs=1e-6)


def test_eager_attention_is_restored():
    model = planted_model(attn="sdpa")
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    seen = []
    attention_pass(model, planted_ids(32, 5), lambda i, m, w, h: seen.append((i, tuple(w.shape))))
    assert seen == [(0, (1, 4, 32, 32))]
    assert model.config._attn_implementation == "sdpa"


def test_analyze_planted_sink():
    model = planted_model(layers=2)
    ids = planted_ids(128, sink_at=20)
    rep = analyze(model, FakeTokenizer(), input_ids=ids, threshold=0.1)
    assert model.config._attn_implementation == "sdpa"
    tok = rep.tokens[20]
    assert tok["class"] == "punctuation" and tok["sink_heads"] == 8  # all 4 heads of both layers
    ordinary = [t for t in rep.tokens[1:] if t["position"] != 20]
    assert all(t["sink_heads"] == 0 for t in ordinary)
    for layer in rep.layers:
        assert layer["sink_positions"] == [20]
        for h in layer["heads"]:
            assert h["sink_head"]
            assert h["punctuation_mass"] > 0.5
            assert h["main_sink"]["position"] == 20
            top = h["sinks"][0]
            assert top["position"] == 20 and top["segment"][0] == 21 and top["segment"][1] == 128
            # head output over the caught tokens is (almost) the sink's value: the tag direction
            assert h["tag"]["mean_cos"] > 0.9
    s = rep.summary
    assert s["sink_heads"] == 8 and s["heads"] == 8
    assert s["attention_share"]["punctuation_sinks"] > 0.5
    assert s["classes"]["punctuation"]["sink_any"] == 1
    json.dumps(rep.to_dict(), allow_nan=False)
    assert "sink heads" in rep.summary_table()


def test_analyze_validates():
    model = planted_model()
    with pytest.raises(ValueError, match="exactly one"):
        analyze(model, FakeTokenizer())
    with pytest.raises(ValueError, match="at least 4"):
        analyze(model, FakeTokenizer(), input_ids=[1, 2])


def test_detect_command_writes_report(tmp_path, monkeypatch, capsys):
    import sinkcache.models

    model = planted_model(layers=2)
    monkeypatch.setattr(sinkcache.models, "load_model", lambda name, **kw: (model, FakeTokenizer()))
    text = tmp_path / "in.txt"
    text.write_text(" ".join(["a", "b", "c", "."] + [f"x{i}" for i in range(60)]))
    out = tmp_path / "rep"
    assert detect_command("tiny", text=str(text), out_dir=out, progress=False) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["tokens"] == 64
    assert 3 in data["layers"][0]["sink_positions"]
    assert (out / "heatmap.png").stat().st_size > 1000
    assert (out / "tokens.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "sink heads" in printed and "report.json" in printed


def test_detect_command_errors(tmp_path, capsys):
    assert detect_command("tiny", text="a", prompt="b", out_dir=tmp_path) == 2
    assert detect_command("tiny", text=str(tmp_path / "missing.txt"), out_dir=tmp_path) == 2
    assert detect_command("tiny", prompt="  ", out_dir=tmp_path) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_detect_command_on_builtin_models(name, tmp_path, capsys):
    """`sinkcache detect` runs on both built-in models (short text) and writes JSON, heatmap, tokens;
    the first token is a sink head's main sink somewhere (both models have first-token sinks)."""
    torch.set_num_threads(1)
    out = tmp_path / name
    assert detect_command(name, out_dir=out, max_tokens=128, progress=False) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["tokens"] == 128
    assert data["summary"]["sink_heads_by_main_sink"].get("first", 0) >= 1
    assert (out / "heatmap.png").stat().st_size > 1000 and (out / "tokens.png").stat().st_size > 1000
    assert "sink heads" in capsys.readouterr().out
