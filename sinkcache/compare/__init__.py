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

import json
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
    fork_shards: int | None = None,
    hybrid_budgets: list[float] | tuple[float, ...] | None = None,
    runner: Any = None,
    progress: bool = True,
    command: str | None = None,
    report_only: bool = False,
    import_dirs: list[str | Path] | tuple[str | Path, ...] = (),
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep and write the tables and plot; returns the runner's summary.

    The report covers every finished cell of ``model`` in ``OUT/cells``, the ones this sweep planned
    and any left there by earlier sweeps (their commands are kept in ``results.json``'s
    ``meta["runs"]``). ``report_only``: run nothing, only rewrite the report from those cells.
    ``import_dirs``: other sweeps' output folders whose finished cells of ``model`` are copied into
    ``OUT/cells`` first (replacing cells of the same id), their commands added to the history.
    ``device`` (default: CUDA when available) and ``dtype`` (default: bfloat16 on CUDA, float32 on
    CPU): where every cell runs, ours and the peers'; bad values raise ValueError naming them.
    Under ``accelerate launch`` the ranks share the cells (see :func:`.runner.run_sweep`) and rank 0
    writes the report.
    """
    from ..placement import dist_ranks, resolve_device, resolve_dtype
    from .report import write_results
    from .runner import load_cells, run_sweep

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    rank, world, _ = dist_ranks()

    cells = plan(policies, budgets, bits, hybrid_bits, tasks, hybrid_budgets)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model)
    run = {
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
        "fork_shards": fork_shards,
        "tasks": list(tasks),
        "device": device,
        "dtype": dtype,
        "ranks": world,
    }
    runs = previous_runs(out, model)
    for src in import_dirs:
        imported = import_cells(Path(src), out, model) if rank == 0 else load_cells(Path(src), model)
        if not imported:
            raise ValueError(f"--import {src}: no finished cells of {model} in {Path(src) / 'cells'}")
        runs += [r for r in previous_runs(Path(src), model) if r.get("command") not in [x.get("command") for x in runs]]
    if world > 1:
        from . import ranks

        ranks.barrier()  # rank 0 has copied the imported cells before any rank reads OUT/cells
        if rank != 0 and report_only:
            return {"done": [], "failed": [], "skipped": 0, "rank": rank}
    if not report_only and run["command"] not in [r.get("command") for r in runs]:
        runs.append(run)
    meta = {"model": model, "seed": seed, "runs": runs}

    def update(records: list[dict[str, Any]]) -> None:
        write_results(out, model, merge_records(records, load_cells(out, model)), meta)

    if report_only:
        res: dict[str, Any] = {"done": [], "failed": [], "skipped": 0}
    else:
        res = run_sweep(
            model, cells, out, limit=limit, seed=seed, jobs=jobs, fork=fork, fork_shards=fork_shards,
            runner=runner, on_update=update, progress=progress, device=device, dtype=dtype,
        )
        if res.get("rank", 0) != 0:
            return res  # rank 0 reports
    records = merge_records(res["done"], load_cells(out, model))
    write_results(out, model, records, meta)
    res["reported"] = len(records)
    res["out_dir"] = str(out)
    return res


def previous_runs(out_dir: Path, model: str) -> list[dict[str, Any]]:
    """The sweeps recorded in ``out_dir/results.json`` for ``model`` (oldest first)."""
    path = Path(out_dir) / "results.json"
    try:
        meta = json.loads(path.read_text()).get("meta", {})
    except (OSError, ValueError):
        return []
    if meta.get("model") != model:
        return []
    if "runs" in meta:
        return list(meta["runs"])
    return [meta] if meta.get("command") else []  # a report written before runs were kept


def merge_records(planned: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This sweep's records plus every other finished cell, in policy order then setting.

    A cell id this sweep produced wins over an older file of the same id."""
    by_id = {r["cell_id"]: r for r in found}
    by_id.update({r["cell_id"]: r for r in planned})
    order = {p: i for i, p in enumerate(POLICIES)}

    def key(r: dict[str, Any]) -> tuple:
        c = r["cell"]
        return (order.get(c["policy"], len(order)), -(c.get("bits") or 0), -(c.get("budget") or 0.0), r["cell_id"])

    return sorted(by_id.values(), key=key)


def import_cells(src: Path, out: Path, model: str) -> list[str]:
    """Copy ``src/cells/*.json`` of ``model`` into ``out/cells``; returns the cell ids copied."""
    from .runner import load_cells

    (out / "cells").mkdir(parents=True, exist_ok=True)
    ids = []
    for rec in load_cells(src, model):
        (out / "cells" / f"{rec['cell_id']}.json").write_text(json.dumps(rec, indent=1) + "\n")
        ids.append(rec["cell_id"])
    return ids
