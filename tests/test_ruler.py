"""lm-eval's RULER tasks offline: which run, the tokenizer path they need, per-length sampling."""

from __future__ import annotations

import sys
import types

import pytest
from test_evals import _byte_tokenizer

from sinkcache import ruler


def test_expand_names_the_offline_variants_and_skips_downloads():
    tasks, skipped = ruler.expand(["ruler_offline", "sinkcache_passkey"])
    assert tasks == [*ruler.OFFLINE_TASKS, "sinkcache_passkey"] and skipped == {}
    tasks, skipped = ruler.expand(["ruler"], offline=True)
    assert tasks == list(ruler.OFFLINE_TASKS) and "niah_single_2" in skipped and "essay" in skipped["niah_single_2"]
    assert ruler.expand(["ruler"], offline=False) == (["ruler"], {})  # with the Hub, lm-eval's own group
    assert ruler.expand(["ruler_qa_squad"], offline=True) == ([], {"ruler_qa_squad": "downloads SQuAD"})


def test_tokenizer_is_saved_to_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = _byte_tokenizer()
    path = ruler.tokenizer_path(tok, "org/some-model")
    assert path.startswith(str(tmp_path)) and (tmp_path / ".cache/sinkcache/tokenizers/org_some-model/tokenizer_config.json").exists()
    assert ruler.tokenizer_path(tok, path) == path  # a folder with tokenizer files is used as is


def test_metadata_validates_lengths():
    assert ruler.metadata("/x", [1024, 2048]) == {"tokenizer": "/x", "max_seq_lengths": [1024, 2048]}
    with pytest.raises(ValueError, match="integers >= 256"):
        ruler.metadata("/x", [100])
    with pytest.raises(ValueError, match="integers >= 256"):
        ruler.metadata("/x", [])


def test_samples_take_the_first_documents_of_every_length():
    class T:
        def __init__(self, name, docs):
            self.task_name, self.eval_docs = name, docs

    rul = T("niah_single_1", [{"max_length": 1024}] * 5 + [{"max_length": 2048}] * 5)
    suite = T("sinkcache_passkey", [{}] * 3)
    got = ruler.samples_per_length({"grp": {"niah_single_1": rul}, "sinkcache_passkey": suite}, 2)
    assert got == {"niah_single_1": [0, 1, 5, 6], "sinkcache_passkey": [0, 1]}


def test_quiet_punkt_skips_the_download_only_when_data_is_missing(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(download=lambda *a, **k: calls.append(a) or True, data=types.SimpleNamespace())

    def missing(_):
        raise LookupError

    fake.data.find = missing
    monkeypatch.setitem(sys.modules, "nltk", fake)
    with ruler.quiet_punkt():
        assert fake.download("punkt_tab") is False
    assert calls == [] and fake.download("x") is True  # restored afterwards
    fake.data.find = lambda _: "/present"
    with ruler.quiet_punkt():
        fake.download("punkt_tab")
    assert calls == [("x",), ("punkt_tab",)]


def test_run_eval_gives_ruler_tasks_a_tokenizer_path(monkeypatch, tmp_path):
    """``run_eval`` (and so ``sinkcache eval``) builds RULER's metadata itself."""
    from conftest import _build

    import sinkcache.evaluation as ev

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}

    def fake(lm, tasks, **kw):
        seen["tasks"], seen["tm"], seen["limit"] = tasks, kw["task_manager"], kw["limit"]
        return {"results": {}, "n-samples": {}}

    monkeypatch.setattr(ev, "_simple_evaluate", fake)
    tok = _byte_tokenizer()
    model = _build("llama", vocab_size=len(tok))
    res = ev.run_eval("tiny", ["ruler_offline"], model=model, tokenizer=tok, progress=False, ruler_lengths=(512,))
    assert seen["tasks"] == list(ruler.OFFLINE_TASKS)
    meta = seen["tm"].metadata
    assert meta["max_seq_lengths"] == [512] and (tmp_path / ".cache/sinkcache/tokenizers").exists()
    assert res["config"]["ruler_lengths"] == [512]
