"""``evals/summary_tables.py``: README's tables come from a compare folder's results.json, pairs
missing from a folder print as dashes, and the cost table shows the cells asked for."""

from __future__ import annotations

import json
import random

import pytest
from evals_scripts import load_eval_script

from sinkcache.compare.plan import Cell
from sinkcache.compare.report import write_results

PK = "sinkcache_passkey"


def _rec(cell: Cell, pk: list[float], kv: float) -> dict:
    summary = {"per_task": {PK: sum(pk) / len(pk)}, "suite_score": None, "bits_per_byte": None, "kv_ratio": kv,
               "mean_kv_bytes": 1.0, "mean_full_kv_bytes": 5.0}
    return {"cell": cell.to_dict(), "cell_id": cell.cell_id, "group": cell.group, "setting": cell.setting,
            "docs": {PK: {str(i): v for i, v in enumerate(pk)}}, "n_docs": {PK: len(pk)}, "summary": summary,
            "scores": {}, "memory": {}, "time_s": {"wall": 1.0}}


def test_tables_read_the_pairs_and_mark_what_did_not_run(tmp_path, capsys):
    n = 50
    rng = random.Random(1)
    kivi = [float(rng.random() < 0.3) for _ in range(n)]
    recs = [_rec(Cell("full"), [1.0] * n, 1.0), _rec(Cell("kivi", bits=2), kivi, 0.185),
            _rec(Cell("sink-quant", bits=2), [1.0 if k else float(rng.random() < 0.5) for k in kivi], 0.187)]
    write_results(tmp_path, "tiny", recs, {"limit": n, "seed": 0, "command": "x"}, with_plot=False)
    mod = load_eval_script("summary_tables")
    mod.main([str(tmp_path), "--cost-cells", "kivi_2bit"])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    want = next(c for c in data["analysis"]["comparisons"] if c["ours"] == "sink-quant_2bit")["suite"]
    row = next(line for line in out.splitlines() if line.startswith("| int2, measured sinks"))
    assert f"{want['mean']:+.3f}".replace("-", "−") in row and "win" in row and "18.7 / 18.5" in row
    assert "| int4" not in out  # no int4 cells in this folder: the row is left out
    cost = [line for line in out.splitlines() if line.startswith("| kivi_2bit |")]
    assert len(cost) == 1 and "loss" in cost[0] and "sink-quant_2bit |" not in out.split("| cell |")[1]


def test_fill_rewrites_only_the_marked_blocks(tmp_path):
    n = 30
    recs = [_rec(Cell("full"), [1.0] * n, 1.0), _rec(Cell("kivi", bits=2), [0.0] * n, 0.185)]
    write_results(tmp_path / "r", "tiny", recs, {"limit": n, "seed": 0, "command": "x"}, with_plot=False)
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- summary_tables cost kivi_2bit -->\nstale table\n<!-- /summary_tables -->\noutro\n")
    mod = load_eval_script("summary_tables")
    mod.main([str(tmp_path / "r"), "--fill", str(doc)])
    text = doc.read_text()
    assert text.startswith("intro\n<!-- summary_tables cost kivi_2bit -->\n| cell |") and text.endswith("<!-- /summary_tables -->\noutro\n")
    assert "stale table" not in text and "| kivi_2bit | 18.5 | **−1.000" in text
    doc.write_text("no blocks")
    with pytest.raises(SystemExit, match="no <!-- summary_tables"):
        mod.main([str(tmp_path / "r"), "--fill", str(doc)])
