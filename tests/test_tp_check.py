"""``evals/tp_check.py``: SinkCache under transformers' tensor parallelism (``tp_plan="auto"``),
2 CPU ranks over gloo: each policy's sharded greedy tokens equal its unsharded tokens, and each
rank's cache holds its own heads only (half the bytes)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _build
from test_evals import _byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_tensor_parallel_tokens_equal_unsharded(tmp_path):
    ckpt = tmp_path / "tiny-llama"
    tok = _byte_tokenizer()
    _build("llama", vocab_size=len(tok)).save_pretrained(ckpt)  # 2 KV heads: one per rank
    tok.save_pretrained(ckpt)
    out = tmp_path / "tp.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        "torchrun", "--nproc-per-node", "2", "--master-port", str(_free_port()), str(ROOT / "evals" / "tp_check.py"),
        "--model", str(ckpt), "--device", "cpu", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["world_size"] == 2 and rep["tp_size"] == 2 and rep["backend"] == "gloo"
    assert rep["device"] == "cpu" and rep["dtype"] == "float32"
    full = rep["per_rank"][0]["full"]["tokens_unsharded"]
    for rank_rows in rep["per_rank"]:
        assert set(rank_rows) == {"full", "quantize", "quantize-auto-sinks", "evict", "evict-tova"}
        for name, row in rank_rows.items():
            assert row["tokens_sharded"] == row["tokens_unsharded"], name
            assert len(row["tokens_sharded"]) == 16
            # this rank's cache holds one of the two KV heads: half the unsharded bytes
            assert row["cache_sharded"]["memory_bytes"] * 2 == row["cache_unsharded"]["memory_bytes"], name
    # the compressing policies change the tokens (the equality is not the full cache's by accident)
    assert rep["per_rank"][0]["evict"]["tokens_unsharded"] != full


def test_tp_check_refuses_one_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evals" / "tp_check.py"), "--model", str(tmp_path), "--device", "cpu"],
        env={**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "launch with torchrun --nproc-per-node N" in proc.stderr
