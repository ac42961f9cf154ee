"""``evals/cli_startup.py``: times the light CLI commands in fresh interpreters and records whether
they imported torch (they must not: that is what made ``--help`` take 7 s)."""

from __future__ import annotations

import json

import pytest
from evals_scripts import load_eval_script


def test_light_commands_are_timed_and_do_not_import_torch(tmp_path):
    mod = load_eval_script("cli_startup")
    out = tmp_path / "cli.json"
    mod.main(["--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["command"] for r in data["rows"]] == ["sinkcache --help", "sinkcache --version", "sinkcache eval --help", "sinkcache compare --help"]
    assert all(r["imported_torch"] == [False] and len(r["seconds"]) == 1 and r["median_s"] > 0 for r in data["rows"])


def test_bad_repeats_raise():
    with pytest.raises(SystemExit, match="--repeats 0"):
        load_eval_script("cli_startup").main(["--repeats", "0"])
