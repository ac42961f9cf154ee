"""``sinkcache compare``: compression policies side by side with their peers, at equal KV memory.

Sweeps policies x memory settings on the offline suite for one model and writes ``results.md``,
``results.json`` and ``accuracy_vs_kv_memory.png``:

* ours: sink-aware eviction, quantization and hybrid;
* baselines inside sinkcache: pure recent window, StreamingLLM (first 4 + window), plain KIVI;
* peers through their own packages: transformers' quantized KV layers (optimum-quanto, HQQ) and
  NVIDIA kvpress presses (run from kvpress's own virtualenv, see ``evals/peers/``).

Modules: :mod:`.plan` (policies, cells, run keys), :mod:`.lms` (the lm-eval models),
:mod:`.cell` (one cell in its own process), :mod:`.runner` (sweep, resume, progress),
:mod:`.report` (tables and plot).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from .plan import (
    DEFAULT_BITS,
    DEFAULT_BUDGETS,
    DEFAULT_HYBRID_BITS,
    DEFAULT_POLICIES,
    POLICIES,
    SUITE_TASKS,
    Cell,
    plan,
)

__all__ = ["run_compare", "plan", "Cell", "POLICIES", "SUITE_TASKS", "default_out_dir"]


def default_out_dir(model: str) -> Path:
    """``evals/results/<model>`` of this checkout."""
    return Path(__file__).resolve().parent.parent.parent / "evals" / "results" / Path(model).name


def run_compare(
    model: str,
    *,
    policies: list[str] | tuple[str, ...] = DEFAULT_POLICIES,
    budgets: list[float] | tuple[float, ...] = DEFAULT_BUDGETS,
    bits: list[int] | tuple[int, ...] = DEFAULT_BITS,
    hybrid_bits: list[int] | tuple[int, ...] = DEFAULT_HYBRID_BITS,
    tasks: list[str] | tuple[str, ...] = SUITE_TASKS,
    limit: int | None = 5,
    seed: int = 0,
    out_dir: str | Path | None = None,
    jobs: int = 1,
    fork: bool = True,
    hybrid_budgets: list[float] | tuple[float, ...] | None = None,
    runner: Any = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep and write the tables and plot; returns the runner's summary."""
    from .report import write_results
    from .runner import run_sweep

    cells = plan(policies, budgets, bits, hybrid_bits, tasks, hybrid_budgets)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model)
    meta = {
        "command": command or "sinkcache compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "model": model,
        "limit": limit,
        "seed": seed,
        "planned": len(cells),
        "policies": list(policies),
        "budgets_percent": list(budgets),
        "bits": list(bits),
        "hybrid_bits": list(hybrid_bits),
        "hybrid_budgets_percent": list(budgets if hybrid_budgets is None else hybrid_budgets),
        "fork": fork,
        "jobs": jobs,
        "tasks": list(tasks),
    }

    def update(records: list[dict[str, Any]]) -> None:
        write_results(out, model, records, meta)

    res = run_sweep(model, cells, out, limit=limit, seed=seed, jobs=jobs, fork=fork, runner=runner, on_update=update, progress=progress)
    write_results(out, model, res["done"], meta)
    res["out_dir"] = str(out)
    return res
