"""ProfileSinks (``sinkcache/sinks/profile.py``): marking by id, loading and saving profiles, the shipped ones."""

from __future__ import annotations

import json

import pytest
import torch
from planted import planted_model, planted_profile_dict, sample

from sinkcache import SinkCache
from sinkcache.context import TokenContext
from sinkcache.sinks.profile import (
    PROFILE_DIR,
    ProfileSinks,
    load_profile,
    save_profile,
    shipped_profile_path,
)


def _ctx(ids: list[list[int]], pad=None) -> TokenContext:
    ctx = TokenContext()
    ctx.keep_ids = True
    t = torch.tensor(ids)
    mask = None
    if pad is not None:
        mask = torch.ones_like(t)
        for b, p in enumerate(pad):
            mask[b, :p] = 0
    ctx.observe(t, mask, 0)
    return ctx


@pytest.fixture(scope="module")
def planted_profile():
    return planted_profile_dict()



def test_save_load_roundtrip(tmp_path, planted_profile):
    p = save_profile(planted_profile, tmp_path / "sub" / "tiny.json")
    loaded = load_profile(p)
    assert loaded == json.loads(json.dumps(planted_profile))
    with pytest.raises(ValueError, match="no such file"):
        load_profile(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not a sinkcache profile"):
        load_profile({"format": "other"})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(bad)


def test_profile_sinks_marks_by_id_per_head():
    prof = {
        "format": "sinkcache-profile", "version": 1, "n_first": 1,
        "layers": [{"layer": 0, "heads": [[5], [6]]}, {"layer": 1, "heads": [[], []]}],
    }
    sel = ProfileSinks(prof)
    assert sel.needs_ids and sel.name == "profile" and sel.n_first == 1
    ctx = _ctx([[9, 5, 6, 5, 8]])
    keys = torch.zeros(1, 2, 5, 4)
    cols = torch.arange(5)
    m = sel.mark(0, cols, ctx, keys)
    assert m.shape == (1, 2, 5)
    assert m[0, 0].tolist() == [True, True, False, True, False]
    assert m[0, 1].tolist() == [True, False, True, False, False]
    assert sel.mark(1, cols, ctx, keys)[0, 0].tolist() == [True, False, False, False, False]
    assert sel.mark(7, cols, ctx, keys)[0, 0].tolist() == [True, False, False, False, False]  # not in the profile
    # a model with another kv-head count gets the union
    m1 = sel.mark(0, cols, ctx, torch.zeros(1, 1, 5, 4))
    assert m1.shape == (1, 1, 5) and m1[0, 0].tolist() == [True, True, True, True, False]
    # ids unknown: first-token rule only
    assert sel.mark(0, cols, TokenContext(), keys).sum() == 1


def test_profile_sinks_skip_padding():
    prof = {"format": "sinkcache-profile", "version": 1, "layers": [{"layer": 0, "heads": [[5]]}]}
    sel = ProfileSinks(prof)
    ctx = _ctx([[5, 5, 5, 3], [9, 5, 3, 5]], pad=[2, 0])
    m = sel.mark(0, torch.arange(4), ctx, torch.zeros(2, 1, 4, 4))
    assert m[0, 0].tolist() == [False, False, True, False]  # pads are never sinks; col 2 is the first real token
    assert m[1, 0].tolist() == [True, True, False, True]


def test_profile_sinks_in_cache_end_to_end(planted_profile):
    model = planted_model(layers=2)
    ids = torch.tensor([sample(96, (30,), seed=9)])
    cache = SinkCache(policy="quantize", bits=2, window=0, group_size=16, sinks=ProfileSinks(planted_profile), model=model)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        cols = {int(c) for c in layer.sink_col[0].flatten() if int(c) >= 0}
        assert cols == {0, 30}
    cache.detach()


def test_shipped_profiles_load():
    shipped = sorted(PROFILE_DIR.glob("*.json"))
    for p in shipped:
        prof = load_profile(p.stem)
        sel = ProfileSinks(p.stem)
        assert prof["num_layers"] == len(prof["layers"])
        assert sel.model == prof["model"]
        assert shipped_profile_path(p.stem) == p
    assert shipped_profile_path("no-such-model") is None
