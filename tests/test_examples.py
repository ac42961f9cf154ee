"""Every example runs (small sizes, default model) so none can rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = {
    "quickstart.py": ["--max-new-tokens", "12"],
    "compare_policies.py": ["--max-new-tokens", "8", "--repeat", "2"],
    "streaming_chat.py": ["--turns", "3", "--budget", "48", "--max-new-tokens", "16"],
    "weights_and_cache_compressed.py": ["--max-new-tokens", "12"],
    "visualize_sinks.py": ["--max-tokens", "96"],
    "lm_eval_api.py": ["--limit", "2"],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path):
    args = list(CASES[name])
    if name == "visualize_sinks.py":
        args += ["--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    if name in ("quickstart.py", "weights_and_cache_compressed.py"):
        assert "Paris" in out
    if name == "streaming_chat.py":
        held = [int(line.split("held")[1].split()[0]) for line in out.splitlines() if "held" in line]
        assert held and max(held) <= 48
    if name == "visualize_sinks.py":
        assert list(tmp_path.glob("*.png"))
