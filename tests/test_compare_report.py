"""results.md/json: intervals per cell, paired differences at matched settings, verdicts."""

from __future__ import annotations

import json
import random

import pytest

from sinkcache.compare.plan import Cell
from sinkcache.compare.report import against_full, analyse, comparisons, informative_tasks, write_results

PK, VT = "sinkcache_passkey", "sinkcache_variable_tracking"


def _rec(cell: Cell, pk: list[float], vt: list[float], kv: float = 0.2) -> dict:
    docs = {PK: {str(i): v for i, v in enumerate(pk)}, VT: {str(i): v for i, v in enumerate(vt)}}
    summary = {"per_task": {PK: sum(pk) / len(pk), VT: sum(vt) / len(vt)}, "suite_score": None, "bits_per_byte": None,
               "kv_ratio": kv, "mean_kv_bytes": 1.0, "mean_full_kv_bytes": 5.0}
    return {"cell": cell.to_dict(), "cell_id": cell.cell_id, "group": cell.group, "setting": cell.setting, "docs": docs,
            "n_docs": {PK: len(pk), VT: len(vt)}, "summary": summary, "scores": {}, "memory": {}, "time_s": {"wall": 1.0}}


def _grid(n=60):
    rng = random.Random(0)
    full = _rec(Cell("full"), [1.0] * n, [0.0] * n, kv=1.0)
    kivi = _rec(Cell("kivi", bits=2), [float(rng.random() < 0.3) for _ in range(n)], [0.0] * n)
    ours = _rec(Cell("sink-quant", bits=2), [1.0 if kivi["docs"][PK][str(i)] else float(rng.random() < 0.6) for i in range(n)], [0.0] * n)
    same = _rec(Cell("hf-quanto", bits=2), list(ours["docs"][PK].values()), [0.0] * n)
    return [full, kivi, ours, same]


def test_tasks_the_full_cache_fails_are_left_out_of_the_score():
    assert informative_tasks(_grid()) == [PK]


def test_pairs_are_ours_against_baseline_and_peer_at_the_same_setting():
    comps = comparisons(_grid(), iters=500)
    assert [(c["ours"], c["other"], c["kind"]) for c in comps] == [("sink-quant_2bit", "kivi_2bit", "baseline"), ("sink-quant_2bit", "hf-quanto_2bit", "peer")]
    base, peer = comps
    assert base["suite"]["verdict"] == "win" and base["suite"]["low"] > 0  # ours never worse, often better
    assert peer["suite"]["mean"] == 0 and peer["suite"]["verdict"] == "tie"  # identical documents
    assert base["n_docs"] == {PK: 60}


def test_the_default_eviction_is_paired_with_its_sink_ablation_and_the_recent_window():
    n = 40
    cells = [_rec(Cell(p, budget=25.0), [float(i % 2) for i in range(n)], [0.0] * n)
             for p in ("sink-evict-tova-pooled", "nosink-evict-tova-pooled", "recent-evict")]
    comps = comparisons([_rec(Cell("full"), [1.0] * n, [0.0] * n, kv=1.0), *cells], iters=200)
    assert [(c["other"], c["kind"]) for c in comps] == [("recent-evict_b25", "baseline"), ("nosink-evict-tova-pooled_b25", "baseline")]


def test_the_smaller_window_variant_is_paired_with_the_default_eviction_and_kvpress_tova():
    n = 40
    cells = [_rec(Cell(p, budget=25.0), [float(i % 2) for i in range(n)], [0.0] * n)
             for p in ("sink-evict-tova-pooled-w32", "sink-evict-tova-pooled", "kvpress-tova", "recent-evict")]
    comps = comparisons([_rec(Cell("full"), [1.0] * n, [0.0] * n, kv=1.0), *cells], iters=200)
    got = [(c["other"], c["kind"]) for c in comps if c["ours"] == "sink-evict-tova-pooled-w32_b25"]
    assert got == [("recent-evict_b25", "baseline"), ("sink-evict-tova-pooled_b25", "ours"), ("kvpress-tova_b25", "peer")]


def test_every_cell_is_paired_with_the_full_cache_of_its_task_set():
    recs = _grid()
    n = 60
    same = [f"h{i}" for i in range(n)]
    recs.append(_ruler_rec(Cell("full", tasks=("ruler_vt@512",)), {"ruler_vt@512": [1.0] * n}, {"ruler_vt@512": same}))
    recs.append(_ruler_rec(Cell("kivi", bits=2, tasks=("ruler_vt@512",)), {"ruler_vt@512": [0.0] * 30 + [1.0] * 30}, {"ruler_vt@512": same}))
    got = {d["ours"]: d for d in against_full(recs, iters=300)}
    assert set(got) == {"kivi_2bit", "sink-quant_2bit", "hf-quanto_2bit", "kivi_2bit_ruler"}
    assert {d["other"] for k, d in got.items()} == {"full", "full_ruler"} and got["kivi_2bit_ruler"]["other"] == "full_ruler"
    kivi = sum(recs[1]["docs"][PK].values()) / n
    assert got["kivi_2bit"]["suite"]["mean"] == pytest.approx(kivi - 1.0) and got["kivi_2bit"]["suite"]["verdict"] == "loss"
    assert got["kivi_2bit_ruler"]["ruler"]["mean"] == pytest.approx(-0.5) and got["kivi_2bit"]["kind"] == "reference"


def test_streamingllm_is_paired_with_the_window_alone_and_nothing_else():
    n = 40
    recs = [_rec(Cell(p, budget=25.0), [float(i % 2) for i in range(n)], [0.0] * n) for p in ("streamingllm", "recent-evict", "kvpress-tova")]
    comps = comparisons([_rec(Cell("full"), [1.0] * n, [0.0] * n, kv=1.0), *recs], iters=200)
    assert [(c["ours"], c["other"], c["kind"]) for c in comps] == [("streamingllm_b25", "recent-evict_b25", "baseline")]


def test_results_report_intervals_and_verdicts(tmp_path):
    recs = _grid()
    write_results(tmp_path, "tiny", recs, {"limit": 60, "seed": 0, "command": "x"}, with_plot=False)
    md = (tmp_path / "results.md").read_text()
    assert "## Paired differences at matched settings" in md and "**win**" in md
    assert "## What each cell costs against the full cache" in md and "| kivi_2bit | full | reference |" in md
    assert "left out of the score because the full cache scores 0 on them: vt" in md
    data = json.loads((tmp_path / "results.json").read_text())
    iv = data["analysis"]["intervals"]["kivi_2bit"]["suite"]
    assert iv["low"] <= iv["mean"] <= iv["high"] and iv["n"] == 60
    assert analyse(recs, iters=200)["excluded_tasks"] == [VT]


def _ruler_rec(cell: Cell, vals: dict[str, list[float]], hashes: dict[str, list[str]]) -> dict:
    docs = {t: {str(i): v for i, v in enumerate(vs)} for t, vs in vals.items()}
    return {"cell": cell.to_dict(), "cell_id": cell.cell_id, "group": cell.group, "setting": cell.setting, "docs": docs,
            "doc_hash": {t: {str(i): h for i, h in enumerate(hs)} for t, hs in hashes.items()},
            "n_docs": {t: len(v) for t, v in docs.items()}, "memory": {}, "scores": {}, "time_s": {"wall": 1.0},
            "summary": {"per_task": {}, "suite_score": None, "bits_per_byte": None, "kv_ratio": 0.2}}


def test_ruler_pairs_use_only_documents_with_the_same_input():
    vt, mk = "ruler_vt@512", "niah_multikey_2@512"
    tasks = (vt, mk)
    n = 40
    same = [f"h{i}" for i in range(n)]
    full = _ruler_rec(Cell("full", tasks=tasks), {vt: [1.0] * n, mk: [0.0] * n}, {vt: same, mk: same})
    kivi = _ruler_rec(Cell("kivi", bits=2, tasks=tasks), {vt: [0.0] * n, mk: [0.0] * n}, {vt: same, mk: same})
    # ours: 10 documents were generated differently (another length set): they must not be paired
    other = same[:30] + [f"x{i}" for i in range(10)]
    ours = _ruler_rec(Cell("sink-quant", bits=2, tasks=tasks), {vt: [1.0] * 30 + [0.0] * 10, mk: [0.0] * n}, {vt: other, mk: same})
    suite_full = _ruler_rec(Cell("full"), {PK: [1.0] * n}, {})
    recs = [suite_full, full, kivi, ours]
    comps = comparisons(recs, iters=300)
    assert [(c["ours"], c["other"]) for c in comps] == [("sink-quant_2bit_ruler", "kivi_2bit_ruler")]  # within the RULER set
    d = comps[0]
    assert d["n_ruler_docs"] == {vt: 30}  # mk is left out (full scores 0); 10 mismatched documents dropped
    assert d["ruler"]["mean"] == 1.0 and d["ruler"]["verdict"] == "win" and "suite" not in d
    a = analyse(recs, iters=300)
    assert a["ruler_tasks"] == [vt] and a["excluded_ruler_tasks"] == [mk]


def test_results_have_a_ruler_table_and_keep_ruler_cells_out_of_the_suite_table(tmp_path):
    vt = "ruler_vt@1024"
    hs = [f"h{i}" for i in range(8)]
    recs = [_grid()[0], _ruler_rec(Cell("full", tasks=(vt,)), {vt: [1.0, 0.0] * 4}, {vt: hs}),
            _ruler_rec(Cell("kivi", bits=2, tasks=(vt,)), {vt: [0.0] * 8}, {vt: hs})]
    write_results(tmp_path, "tiny", recs, {"seed": 0, "command": "x"}, with_plot=False)
    md = (tmp_path / "results.md").read_text()
    assert "## lm-eval's RULER tasks (offline variants)" in md and "| vt@1k | docs/task |" in md
    suite_table = md.split("## lm-eval's RULER")[0]
    assert "| reference | full |" in suite_table and "int2" not in suite_table
    assert "| baseline | kivi | int2 | — | 0.000 [0.000, 0.000] | 0.00 | 8 |" in md


def test_pairs_at_unequal_measured_bytes_are_flagged():
    from sinkcache.compare.report import pairs_table

    comps = comparisons(_grid(), iters=200)
    comps[1]["kv_ratio_ours"], comps[1]["kv_ratio_other"] = 0.245, 0.171
    md = pairs_table(comps)
    assert md.count("**not matched**") == 1 and "(**not matched**: ours 1.43x)" in md


def test_rounding_sized_bits_per_byte_difference_is_a_tie():
    # two cells that keep the same tokens differ by float rounding only: resolved, but not a loss
    from sinkcache.compare.plan import PPL_TASK
    from sinkcache.compare.report import PPL_NEGLIGIBLE_BITS, paired

    full, kivi, ours, _ = _grid()
    n = 40
    kivi["docs"][PPL_TASK] = {str(i): (-1000.0 - i, 2000.0) for i in range(n)}
    ours["docs"][PPL_TASK] = {str(i): (-1000.0 - i - 1e-4, 2000.0) for i in range(n)}  # ~7e-8 bits/byte worse
    d = paired(kivi, ours, [PK], iters=500)["bits_per_byte"]
    assert 0 < d["low"] and d["high"] < PPL_NEGLIGIBLE_BITS and d["verdict"] == "tie"
    ours["docs"][PPL_TASK] = {str(i): (-1000.0 - i - 1.0, 2000.0) for i in range(n)}  # ~7e-4 bits/byte worse
    assert paired(kivi, ours, [PK], iters=500)["bits_per_byte"]["verdict"] == "loss"


def test_provenance_names_where_each_cell_ran():
    from sinkcache.compare.report import provenance

    recs = [
        {"limit": 100, "code": "a", "placement": {"device": "cpu", "dtype": "float32"}},
        {"limit": 100, "code": "a", "placement": {"device": "cuda:0", "dtype": "bfloat16"}},
        {"limit": 100, "code": "a"},  # an older cell: nothing recorded, and it must say so
    ]
    text = provenance(recs)
    assert "ran on: cpu float32 (1 cell), cuda:0 bfloat16 (1 cell), not recorded (1 cell)" in text
