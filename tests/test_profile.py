"""Sink profiles (build/save/load, ProfileSinks) and the offline calibration text."""

from __future__ import annotations

import json

import pytest
import torch
from planted import NORMAL, SINK, planted_model

from sinkcache import SinkCache
from sinkcache.calibration import MODULES, SPLITS, documents, split_of, token_chunks
from sinkcache.context import TokenContext
from sinkcache.profile import (
    PROFILE_DIR,
    ProfileSinks,
    build_profile,
    load_profile,
    profile_command,
    save_profile,
    shipped_profile_path,
)


class FakeTokenizer:
    bos_token_id = None

    def decode(self, ids):
        return "".join("." if int(i) == SINK else f" w{int(i)}" for i in ids)

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Enc:
            input_ids = [[1, 2]] if return_tensors is None else torch.tensor([[1, 2]])

        return Enc()


def sample(length: int, sinks_at: tuple[int, ...], seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 128, (length,), generator=g)
    ids[ids == SINK] = NORMAL
    for p in sinks_at:
        ids[p] = SINK
    return ids.tolist()


# ---------------------------------------------------------------------------------------------
# calibration text


def test_splits_are_disjoint_and_stable():
    cal = [n for n in MODULES if split_of(n) == "calibration"]
    held = [n for n in MODULES if split_of(n) == "heldout"]
    assert cal and held and not set(cal) & set(held)
    assert len(cal) + len(held) == len(MODULES)
    assert split_of("json") == split_of("json")  # crc32, not the salted hash()
    with pytest.raises(ValueError, match="split='train'"):
        documents("train")


def test_documents_are_deterministic_text():
    a = documents("heldout")
    b = documents("heldout")
    assert a == b and len(a) > 10
    names = {n for n, _ in a}
    assert not names & {n for n, _ in documents("calibration")}
    assert sum(len(d) for _, d in a) > 100_000
    assert all(isinstance(d, str) and d.strip() for _, d in a)
    assert SPLITS == ("calibration", "heldout")


class CharTokenizer:
    """Deterministic stand-in: one token per byte; optional BOS."""

    def __init__(self, bos=None):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = list(text.encode("utf-8"))
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids

        class Enc:
            pass

        e = Enc()
        e.input_ids = ids
        return e


def test_token_chunks_lengths_and_bos():
    plain = token_chunks(CharTokenizer(), "calibration", 256, n=3)
    assert len(plain) == 3 and all(len(c) == 256 for c in plain)
    with_bos = token_chunks(CharTokenizer(bos=999), "calibration", 256, n=3)
    assert all(c[0] == 999 and len(c) == 256 for c in with_bos)
    assert with_bos[0][1:] == plain[0][:255]
    assert token_chunks(CharTokenizer(), "calibration", 256, n=3) == plain
    with pytest.raises(ValueError):
        token_chunks(CharTokenizer(), "calibration", 1)


# ---------------------------------------------------------------------------------------------
# building and loading profiles


@pytest.fixture(scope="module")
def planted_profile():
    model = planted_model(layers=2)
    texts = [sample(96, (5, 40), seed=s) for s in range(3)]
    return build_profile(model, FakeTokenizer(), texts, threshold=0.1, min_count=3, min_rate=0.5, model_name="tiny")


def test_build_profile_lists_planted_sink(planted_profile):
    prof = planted_profile
    assert prof["num_layers"] == 2 and prof["num_kv_heads"] == 2
    for layer in prof["layers"]:
        assert len(layer["heads"]) == 2
        for ids in layer["heads"]:
            assert ids == [SINK]  # found in every layer and kv head; nothing ordinary listed
    assert prof["tokens"][str(SINK)]["class"] == "punctuation"
    assert prof["tokens"][str(SINK)]["layers"] == [0, 1]
    assert prof["summary"]["listed_ids"] == 1
    assert prof["summary"]["sink_share_by_class"]["punctuation"] == 1.0
    assert prof["summary"]["sink_share_by_class"]["other"] == 0.0


def test_build_profile_min_count(planted_profile):
    model = planted_model(layers=1)
    prof = build_profile(model, FakeTokenizer(), [sample(96, (5,), seed=0)], threshold=0.1, min_count=3)
    assert prof["layers"][0]["heads"] == [[], []]  # seen once: below min_count


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


# ---------------------------------------------------------------------------------------------
# the selector


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


def test_profile_command_validates(capsys):
    assert profile_command("tiny", chunks=0) == 2
    assert profile_command("tiny", threshold=1.5) == 2
    assert "error" in capsys.readouterr().err


def test_profile_command_runs(tmp_path, monkeypatch, capsys):
    import sinkcache.models

    model = planted_model(layers=1)
    monkeypatch.setattr(sinkcache.models, "load_model", lambda name, **kw: (model, FakeTokenizer()))
    text = tmp_path / "cal.txt"
    text.write_text("x")
    # FakeTokenizer ignores the text: feed the chunks through build_profile's id path instead
    monkeypatch.setattr(
        "sinkcache.calibration.token_chunks", lambda tok, split, length, n=None: [sample(64, (5, 30), s) for s in range(2)]
    )
    out = tmp_path / "p.json"
    assert profile_command("tiny", out=out, chunks=2, length=64, min_count=2, progress=False) == 0
    prof = load_profile(out)
    assert prof["layers"][0]["heads"] == [[SINK], [SINK]]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_profile_matches_its_model(name):
    """The shipped profiles were made by `sinkcache profile` for these models (shape and settings)."""
    from sinkcache.models import load_model

    model, _ = load_model(name, progress=False)
    cfg = model.config.get_text_config()
    prof = load_profile(name)
    assert prof["model"] == name
    assert prof["num_layers"] == cfg.num_hidden_layers and prof["num_kv_heads"] == cfg.num_key_value_heads
    assert prof["vocab_size"] == cfg.vocab_size
    assert prof["settings"]["tokens"] == 16 * 1024 and "calibration" in prof["settings"]["source"]
