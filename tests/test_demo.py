"""``sinkcache demo`` (``sinkcache/demo.py``): fixed questions, the caches each row builds, and
answers from the shared prompt forward equal to each cache answering alone."""

from __future__ import annotations

import math

import pytest
import torch

from sinkcache import cli, demo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(byte_tok):
    return byte_tok


@pytest.fixture(scope="module")
def model(byte_model):
    return byte_model


def test_questions_are_fixed_by_the_seed_and_long_enough(tok):
    a = demo.questions(tok, 4, 300, seed=3)
    b = demo.questions(tok, 4, 300, seed=3)
    assert [q for q, _ in a] == [q for q, _ in b]
    assert [q for q, _ in demo.questions(tok, 4, 300, seed=4)] != [q for q, _ in a]
    assert [q.depth for q, _ in a] == [0.125, 0.375, 0.625, 0.875]
    for q, enc in a:
        assert enc["input_ids"].shape[1] >= 300
        assert len(q.answer) == 5 and q.text.count(q.answer) == 2  # "The pass key is K. ... K is the pass key."
        assert q.text.endswith("The pass key is")
    with pytest.raises(ValueError, match="context=10"):
        demo.questions(tok, 2, 10)


def test_rows_build_what_they_say(model, tok):
    """Each row's cache, read back from the built object: the budget rows hold 25% of the prompt."""
    rows, _ = demo.demo_rows(model, tok, budget_percent=25.0, score="tova")
    built = {}
    for r in rows:
        c = r.build(400)
        built[r.label] = c.describe()
        c.detach()
    labels = [r.label for r in rows]
    assert labels[0] == "full cache" and rows[0].group == "reference"
    d = built["SinkCache() default: int4, first-token sink"]
    assert (d["policy"], d["bits"], d["sinks"]) == ("quantize", 4, "first")
    assert built["int2, first-token sink"]["sinks"] == "first" and built["int2, first-token sink"]["bits"] == 2
    assert built["int2, no sink (KIVI)"]["sinks"] == "none"
    ev = built["evict 25%: measured sinks, tova scores"]
    assert (ev["policy"], ev["budget"], ev["sinks"], ev["score"]) == ("evict", math.ceil(0.25 * 400), "auto", "tova")
    st = built["evict 25%: StreamingLLM (first 4 + recent)"]
    assert (st["budget"], st["window"], st["sinks"], st["n_first"], st["score"]) == (100, 96, "first", 4, "keynorm")
    peers = [r for r in rows if r.group == "peer"]
    assert [built[r.label]["nbits"] for r in peers] == [4, 2]
    with pytest.raises(ValueError, match="budget_percent=0"):
        demo.demo_rows(model, tok, budget_percent=0)


def test_forked_answers_equal_each_cache_alone(model, tok, monkeypatch):
    """The SinkCache rows answer from one shared prompt forward: the same tokens as if each cache
    had run the prompt itself."""
    qs = demo.questions(tok, 2, 200, seed=1)
    rows, _ = demo.demo_rows(model, tok, budget_percent=25.0, score="snapkv")
    calls: list[list[int]] = []
    real_answer = demo._answer

    def spy(model_, enc, cache):
        ids, sec = real_answer(model_, enc, cache)
        calls.append(ids)
        return ids, sec

    monkeypatch.setattr(demo, "_answer", spy)
    # every answer counts as right, so every row is asked every question (in row order)
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: " ".join(q.answer for q, _ in qs), raising=False)
    kept, prefill_s = demo.run_demo(model, tok, qs, rows, progress=False)
    assert len(kept) == 2 and prefill_s > 0 and len(calls) == 2 * len(rows)
    for qi, (_, enc) in enumerate(qs):
        for ri, r in enumerate(rows):
            assert r.asked == 2 and r.correct == 2 and len(r.bytes) == 2 and r.tokens > 0
            if r.group == "peer":
                continue
            cache = r.build(int(enc["input_ids"].shape[1]))
            demo._prefill(model, enc, cache)
            alone, _ = real_answer(model, enc, cache)
            cache.detach()
            assert calls[qi * len(rows) + ri] == alone, r.label
    ev = next(r for r in rows if r.label.startswith("evict 25%: measured"))
    assert sum(ev.bytes) < 0.4 * sum(rows[0].bytes)  # eviction really held a quarter or so
    text = demo.report(rows, 2, 2)  # what was built, read back, is printed with the table
    assert f"{ev.label}: policy=evict, budget={ev.built['budget']}" in text and "score=snapkv" in text


def test_questions_the_full_cache_misses_are_not_asked(model, tok, monkeypatch):
    qs = demo.questions(tok, 2, 120, seed=0)
    rows, _ = demo.demo_rows(model, tok)
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: "no idea", raising=False)
    kept, _ = demo.run_demo(model, tok, qs, rows, progress=False)
    assert kept == [] and all(r.asked == 0 for r in rows)
    text = demo.report(rows, 0, 2)
    assert "of the 0 questions the full cache answers (2 asked" in text


def test_demo_options_fail_before_loading(capsys, monkeypatch):
    from sinkcache import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert cli.main(["demo", "--budget-percent", "150"]) == 2
    assert "--budget-percent 150 must be in (0, 100]" in capsys.readouterr().err
    assert cli.main(["demo", "--context", "10"]) == 2
    assert "--context" in capsys.readouterr().err


@pytest.mark.real_model
def test_demo_runs_end_to_end(capsys, tmp_path):
    png = tmp_path / "demo.png"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--questions", "2", "--context", "160", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the thread count is undone when the command ends
    for label in ("full cache", "SinkCache() default", "int2, no sink (KIVI)", "StreamingLLM", "quanto int2"):
        assert label in out
    assert png.exists() and png.stat().st_size > 10_000
