"""``evals/dev_pair.py``: pairs cells kept as fork pieces with cells kept as records, as the report does."""

from __future__ import annotations

import json

import pytest
from evals_scripts import load_eval_script

PK = "sinkcache_passkey"


def _write(tmp_path):
    # cell A in two fork pieces (documents 0-1 and 2-3), cell B as a record answering two more documents
    a1 = {"parts": {"A": {"docs": {PK: {"0": 0.0, "1": 1.0}}}}}
    a2 = {"parts": {"A": {"docs": {PK: {"2": 0.0, "3": 0.0}}}}}
    b = {"cell_id": "B", "docs": {PK: {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}}}
    paths = []
    for i, d in enumerate((a1, a2, b)):
        f = tmp_path / f"{i}.json"
        f.write_text(json.dumps(d))
        paths.append(str(f))
    return paths


def test_pieces_are_merged_and_paired_with_a_record(tmp_path):
    p1, p2, cell = _write(tmp_path)
    out = tmp_path / "pairs.json"
    res = load_eval_script("dev_pair").main(["--parts", p1, p2, "--cells", cell, "--pair", "A:B", "--out", str(out)])
    assert res[0]["n_docs"] == {PK: 4}
    assert res[0]["suite"]["mean"] == pytest.approx(0.5)  # B - A over the four shared documents
    assert json.loads(out.read_text()) == res


def test_an_unknown_cell_names_what_there_is(tmp_path):
    p1, p2, cell = _write(tmp_path)
    with pytest.raises(SystemExit, match="no cell C; have: A, B"):
        load_eval_script("dev_pair").main(["--parts", p1, p2, "--cells", cell, "--pair", "A:C"])
