"""``sinkcache compare`` under ``accelerate launch``: 2 CPU ranks share the grid, rank 0 merges.

The launch uses accelerate's torchrun launcher (``--multi_gpu``): on CPU, ``accelerate launch --cpu``
with more than one process needs ``mpirun``; the torchrun launcher starts plain ranks, and the
sweep's own barrier uses gloo, so the same command runs on CPU and on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sinkcache.compare.cell import run_fork_shard
from sinkcache.compare.plan import PPL_TASK, Cell, plan
from sinkcache.compare.ranks import my_share
from sinkcache.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("sinkcache_passkey", PPL_TASK)  # perplexity: per-document log-likelihoods (floats) to compare


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ckpt(byte_ckpt):
    """The tiny random Llama and the byte tokenizer as a local checkpoint (cells load it by path)."""
    return byte_ckpt


def test_my_share_deals_round_robin_and_rejects_bad_ranks():
    assert my_share(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert my_share(list("abcde"), 1, 2) == ["b", "d"]
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        my_share([1], 2, 2)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not installed")
def test_two_accelerate_ranks_give_the_single_process_scores(ckpt, tmp_path):
    cells = plan(["full", "sink-evict", "kivi"], budgets=[50], bits=[2], tasks=TASKS)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "sinkcache.cli", "compare", str(ckpt), "--policies", "full,sink-evict,kivi", "--budgets", "50", "--bits", "2",
        "--tasks", ",".join(TASKS), "--limit", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 cells finished (0 reused), 0 failed" in proc.stdout

    model, tok = load_model(str(ckpt), dtype="float32")
    one = run_fork_shard(cells, str(ckpt), limit=2, model=model, tokenizer=tok)  # one process, all documents
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["runs"][-1]["ranks"] == 2
    for c in cells:
        rec = json.loads((out / "cells" / f"{c.cell_id}.json").read_text())
        assert rec["fork"]["ranks"] == 2 and rec["shards"] == 2
        assert rec["placement"]["device"] == "cpu" and rec["placement"]["dtype"] == "float32"
        want = one["parts"][c.cell_id]["docs"]
        assert rec["docs"] == want, c.cell_id  # identical per-document scores, every task
        assert len(want[PPL_TASK]) >= 2 and len(want["sinkcache_passkey"]) == 2
    # each rank scored its own documents: the parts split them
    parts = [json.loads((out / "parts" / f"fork_{k}of2.json").read_text()) for k in (1, 2)]
    docs = [set(p["parts"]["full"]["docs"]["sinkcache_passkey"]) for p in parts]
    assert docs[0] and docs[1] and not docs[0] & docs[1]


def test_jobs_with_a_launch_is_an_error(tmp_path, monkeypatch):
    from sinkcache.compare.runner import run_sweep

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="jobs=2 under a launch of 2 ranks"):
        run_sweep("tiny", [Cell("full", tasks=TASKS)], tmp_path, limit=1, jobs=2, progress=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
