"""``evals/gpu_check.py`` runs end to end on CPU with a toy model (CI has no GPU; the script is
what a GPU session runs, so it must not rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "evals" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_on_cpu_with_a_toy_model(tmp_path):
    out = tmp_path / "check.json"
    assert _load().main(["--device", "cpu", "--tiny", "--dtype", "float32", "--contexts", "300", "--decode-tokens", "3", "--reps", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["all_equal"] and set(res["equality"]) == {"full", "quantize-holds-all", "evict-holds-all"}
    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["model_shape"]["num_hidden_layers"] == 4
    rows = {r["cache"]: r for r in res["decode"]}
    assert rows["int2"]["built"]["bits"] == 2 and rows["evict"]["built"]["budget"] == 1024
    assert rows["int2"]["kv_x"] > 1.0 and rows["int4"]["kv_x"] > 1.0  # 300 tokens > the 128-token window


def test_gpu_check_refuses_cuda_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        _load().main(["--device", "cuda", "--out", "/tmp/never.json"])
