"""Compare task sets: ``--tasks`` names, RULER at one length per task, documents that are the same in
every process (seeded generation, hashed inputs), per-length sampling and per-document scores."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_evals import _byte_tokenizer

from sinkcache.compare.plan import RULER_TASKS, SUITE_TASKS, Cell, expand_tasks, plan, ruler_split
from sinkcache.compare.samples import per_doc, ruler_metric, task_scores

pytest.importorskip("wonderwords")


def test_expand_tasks_names_suite_ruler_and_lengths():
    assert expand_tasks(["suite"]) == list(SUITE_TASKS)
    assert expand_tasks(["ruler"], [1024]) == [f"{t}@1024" for t in RULER_TASKS]
    assert expand_tasks(["ruler_vt", "niah_single_1@2048", "sinkcache_passkey"], [512, 1024]) == [
        "ruler_vt@512", "ruler_vt@1024", "niah_single_1@2048", "sinkcache_passkey"]
    assert expand_tasks(["ruler_vt", "ruler_vt@512"], [512]) == ["ruler_vt@512"]  # no duplicates
    assert ruler_split("ruler_cwe@2048") == ("ruler_cwe", 2048) and ruler_split("sinkcache_passkey") is None


@pytest.mark.parametrize(
    ("tasks", "lengths", "match"),
    [
        (["niah_single_2"], [1024], "cannot run offline: essay haystack"),
        (["ruler_qa_squad@1024"], [1024], "cannot run offline: downloads SQuAD"),
        (["passkey"], [1024], "unknown task 'passkey'"),
        (["ruler"], [100], r"RULER lengths \[100\]"),
        (["ruler_vt@100"], [1024], "RULER lengths must be >= 256"),
    ],
)
def test_expand_tasks_rejects_what_cannot_run(tasks, lengths, match):
    with pytest.raises(ValueError, match=match):
        expand_tasks(tasks, lengths)


def test_ruler_cells_are_their_own_cells():
    cells = plan(["full", "kivi"], [50], [2], tasks=["ruler_vt@512"])
    assert [c.cell_id for c in cells] == ["full_ruler", "kivi_2bit_ruler"]
    assert Cell("full").task_set == "suite" and cells[0].task_set == "ruler"
    with pytest.raises(ValueError, match="TASK@LENGTH"):
        plan(["full"], tasks=["ruler_vt"])  # plan takes expanded names only


def test_per_doc_takes_each_length_from_its_documents():
    samples = [
        {"doc_id": 0, "filter": "none", "512": 1.0, "1024": -1.0},
        {"doc_id": 3, "filter": "none", "512": -1.0, "1024": 0.5},
        {"doc_id": 1, "filter": "none", "512": 0.0, "1024": -1.0},
    ]
    docs = per_doc({"samples": {"ruler_vt": samples}}, ["ruler_vt@512", "ruler_vt@1024"])
    assert docs == {"ruler_vt@512": {"0": 1.0, "1": 0.0}, "ruler_vt@1024": {"3": 0.5}}
    assert task_scores(docs) == {"ruler_vt@512": {"512,none": 0.5}, "ruler_vt@1024": {"1024,none": 0.5}}
    assert ruler_metric("ruler_vt@512") == "512,none"


@pytest.fixture(scope="module")
def vt(tmp_path_factory):
    from sinkcache.compare import tasks as T

    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    try:
        yield T, T.load(["ruler_cwe@1024"], tokenizer=_byte_tokenizer(), model_name="tiny-byte")
    finally:
        mp.undo()


def test_ruler_documents_are_the_same_in_every_load(vt):
    """RULER draws from global and module-level generators: loading seeds them, so two loads (two
    processes, two cells) score the same documents, and their hashes say so. (``ruler_cwe``: the
    byte-level test tokenizer makes ``ruler_vt``'s template too long for small lengths.)"""
    T, ts = vt
    picked = T.samples(ts, 4)
    first = T.doc_hashes(ts, picked)
    random.seed(99)
    np.random.seed(99)
    again = T.load(["ruler_cwe@1024"], tokenizer=_byte_tokenizer(), model_name="tiny-byte")
    assert T.doc_hashes(again, T.samples(again, 4)) == first
    assert list(first) == ["ruler_cwe@1024"] and len(first["ruler_cwe@1024"]) == 4
    # the module-level generator is back at its import-time state after a load
    import sys

    rng = sys.modules["lm_eval.tasks.ruler.cwe_utils"].RNG
    rng.random()
    T._reseed_module_rngs()
    assert rng.random() == random.Random(42).random()


def test_ruler_samples_take_the_first_documents_of_each_length_dealt_over_shards(vt):
    T, ts = vt
    docs = ts.docs["ruler_cwe"]
    picked = T.samples(ts, 5)["ruler_cwe"]
    assert len(picked) == 5 and all(int(docs[i]["max_length"]) == 1024 for i in picked)
    shards = [T.samples(ts, 5, k, 2)["ruler_cwe"] for k in (0, 1)]
    assert sorted(shards[0] + shards[1]) == picked and not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="shard 2 of 2"):
        T.samples(ts, 5, 2, 2)


def test_ruler_needs_the_tokenizer():
    from sinkcache.compare import tasks as T

    with pytest.raises(ValueError, match="need the model's tokenizer"):
        T.load(["ruler_cwe@1024"])


def test_ruler_cells_fork_and_score_per_length(tmp_path, monkeypatch):
    """A RULER cell through the fork path: per-document scores per length, hashes, a RULER score."""
    from conftest import _build

    from sinkcache.compare.cell import record_from_parts, run_fork_shard

    monkeypatch.setenv("HOME", str(tmp_path))
    tok = _byte_tokenizer()
    model = _build("llama", vocab_size=len(tok))
    tasks = ("niah_multikey_2@1024",)  # the byte tokenizer leaves cwe's answer lists empty at 1k
    cells = [Cell("full", tasks=tasks), Cell("kivi", bits=2, tasks=tasks)]
    out = run_fork_shard(cells, "tiny-byte", limit=2, model=model, tokenizer=tok)
    for c in cells:
        rec = record_from_parts(c, [out["parts"][c.cell_id]])
        assert rec["n_docs"] == {"niah_multikey_2@1024": 2} and len(rec["doc_hash"]["niah_multikey_2@1024"]) == 2
        assert rec["summary"]["ruler_score"] is not None and 0 <= rec["summary"]["ruler_score"] <= 1
        assert rec["scores"]["niah_multikey_2@1024"]["1024,none"] == pytest.approx(rec["lm_eval_scores"]["niah_multikey_2"]["1024,none"])
    assert out["parts"]["full_ruler"]["doc_hash"] == out["parts"]["kivi_2bit_ruler"]["doc_hash"]
