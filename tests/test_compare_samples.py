"""Per-document scores: extraction from lm-eval samples, merging shards, scores from documents."""

from __future__ import annotations

import math

import pytest

from sinkcache.compare.plan import PPL_TASK
from sinkcache.compare.samples import bits_per_byte, merge_docs, per_doc, task_scores


def _results():
    return {
        "samples": {
            "sinkcache_arithmetic_cot": [
                {"doc_id": 1, "filter": "strict_match", "exact_match": 1.0},
                {"doc_id": 1, "filter": "flexible_extract", "exact_match": 0.0},
                {"doc_id": 0, "filter": "strict_match", "exact_match": 0.0},
            ],
            "sinkcache_facts_mc": [{"doc_id": 3, "filter": "none", "acc": 1.0, "acc_norm": 0.0}],
            PPL_TASK: [{"doc_id": 0, "filter": "none", "bits_per_byte": (-100.0, 200)}, {"doc_id": 1, "filter": "none", "bits_per_byte": (-50.0, 100)}],
            "other_task": [{"doc_id": 0, "filter": "none", "acc": 1.0}],
        }
    }


def test_per_doc_reads_the_scored_filter_and_metric():
    tasks = ["sinkcache_arithmetic_cot", "sinkcache_facts_mc", PPL_TASK, "other_task"]
    docs = per_doc(_results(), tasks)
    assert docs["sinkcache_arithmetic_cot"] == {"0": 0.0, "1": 1.0}  # strict_match, as the suite scores it
    assert docs["sinkcache_facts_mc"] == {"3": 1.0}
    assert docs[PPL_TASK] == {"0": [-100.0, 200.0], "1": [-50.0, 100.0]}
    assert "other_task" not in docs


def test_task_scores_aggregate_like_lm_eval():
    docs = per_doc(_results(), ["sinkcache_arithmetic_cot", PPL_TASK])
    sc = task_scores(docs)
    assert sc["sinkcache_arithmetic_cot"] == {"exact_match,strict_match": 0.5}
    assert sc[PPL_TASK]["bits_per_byte,none"] == pytest.approx(150 / 300 / math.log(2))
    assert bits_per_byte([[-1.0, 1.0]]) == pytest.approx(1 / math.log(2))


def test_merge_docs_unions_disjoint_shards_and_refuses_overlap():
    a = {"t": {"0": 1.0, "2": 0.0}}
    b = {"t": {"1": 1.0}, "u": {"5": 0.0}}
    assert merge_docs([a, b]) == {"t": {"0": 1.0, "1": 1.0, "2": 0.0}, "u": {"5": 0.0}}
    with pytest.raises(ValueError, match="two shards"):
        merge_docs([a, {"t": {"2": 1.0}}])
