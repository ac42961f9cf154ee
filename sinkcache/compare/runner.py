"""Drive a ``sinkcache compare`` sweep: one subprocess per cell, resumable, with a progress bar.

Finished cells live in ``OUT/cells/<cell_id>.json``; a cell whose file records the same run key
(model, limit, seed, the cell's full options and the code fingerprint) is skipped on the next run. After every cell the
tables (``results.md``, ``results.json``) and the plot are rewritten from all finished cells, so
an interrupted sweep still leaves its finished cells reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .plan import Cell, code_fingerprint, run_key


def interleave(cells: list[Cell]) -> list[Cell]:
    """Run order: each policy's first setting, then each policy's second, ... so that a partial
    sweep covers every policy."""
    by_policy: dict[str, list[Cell]] = {}
    for c in cells:
        by_policy.setdefault(c.policy, []).append(c)
    out: list[Cell] = []
    rounds = max((len(v) for v in by_policy.values()), default=0)
    for i in range(rounds):
        out.extend(v[i] for v in by_policy.values() if i < len(v))
    return out


def load_done(
    out_dir: Path, model: str, limit: int | None, seed: int, cells: list[Cell], code: str | None = None
) -> dict[str, dict[str, Any]]:
    """Finished cell records (by cell id) that match this run: same options and same code."""
    code = code or code_fingerprint()
    done: dict[str, dict[str, Any]] = {}
    for c in cells:
        path = out_dir / "cells" / f"{c.cell_id}.json"
        if not path.exists():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("key") == run_key(model, limit, seed, c, code=code):
            done[c.cell_id] = rec
    return done


def _subprocess_runner(spec_path: Path, out_path: Path, log_path: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "sinkcache.compare.cell", str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc.returncode


def run_sweep(
    model: str,
    cells: list[Cell],
    out_dir: str | Path,
    *,
    limit: int | None,
    seed: int = 0,
    jobs: int = 1,
    runner: Callable[[Path, Path, Path], int] | None = None,
    on_update: Callable[[list[dict[str, Any]]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the cells not finished yet; returns ``{"done": [...records], "failed": [...], "skipped": n}``.

    ``jobs`` cells run at once (each in its own single-threaded process). ``runner(spec, out, log)``
    runs one cell (default: ``python -m sinkcache.compare.cell``); ``on_update(records)`` is called
    after every finished cell with all records so far (to rewrite the tables and plot).
    """
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run = runner or _subprocess_runner
    cells = interleave(cells)
    code = code_fingerprint()
    done = load_done(out, model, limit, seed, cells, code)
    todo = [c for c in cells if c.cell_id not in done]
    failed: list[dict[str, Any]] = []
    records = [done[c.cell_id] for c in cells if c.cell_id in done]
    if on_update is not None and records:
        on_update(records)
    bar = tqdm(total=len(todo), desc=f"compare {model}", unit="cell", disable=not progress, dynamic_ncols=True)
    if done and progress:
        bar.write(f"resuming: {len(done)} of {len(cells)} cells already finished in {out / 'cells'}")

    def spec_for(c: Cell) -> tuple[Path, Path, Path]:
        spec = {
            "cell": c.to_dict(),
            "model": model,
            "limit": limit,
            "seed": seed,
            "key": run_key(model, limit, seed, c, code=code),
            "code": code,
            "threads": 1,
            "log": str((out / "logs" / f"{c.cell_id}.peer.log").resolve()),
        }
        spec_path = out / "logs" / f"{c.cell_id}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")
        return spec_path, out / "cells" / f"{c.cell_id}.json", out / "logs" / f"{c.cell_id}.log"

    def finish(c: Cell, rc: int, cell_out: Path, log: Path) -> None:
        if rc == 0 and cell_out.exists():
            rec = json.loads(cell_out.read_text())
            records.append(rec)
            s = rec.get("summary", {})
            score = s.get("suite_score")
            bar.set_postfix_str(
                f"{c.cell_id}: score {score if score is None else round(score, 3)}, KV {100 * (s.get('kv_ratio') or 0):.1f}%"
            )
            if on_update is not None:
                on_update(records)
        else:
            failed.append({"cell_id": c.cell_id, "returncode": rc, "log": str(log)})
            bar.write(f"cell {c.cell_id} failed (status {rc}); see {log}")
        bar.update(1)

    if jobs <= 1 or runner is not None:
        for c in todo:
            spec_path, cell_out, log = spec_for(c)
            bar.set_description(f"compare {model}: {c.cell_id}")
            finish(c, run(spec_path, cell_out, log), cell_out, log)
    else:
        pending = list(todo)
        active: list[tuple[Cell, subprocess.Popen, Path, Path, Any]] = []  # cell, process, out, log, log file
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            _run_parallel(pending, active, jobs, spec_for, finish, env)
        finally:  # interrupted: stop the cells still running (they are rerun on resume)
            for _c, proc, _o, _l, fh in active:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                fh.close()
    bar.close()
    order = {c.cell_id: i for i, c in enumerate(cells)}
    records.sort(key=lambda r: order.get(r["cell_id"], 1 << 30))
    return {"done": records, "failed": failed, "skipped": len(done)}


def _run_parallel(pending, active, jobs, spec_for, finish, env) -> None:
    """Keep ``jobs`` cell processes running until ``pending`` is empty and all have finished."""
    while pending or active:
        while pending and len(active) < jobs:
            c = pending.pop(0)
            spec_path, cell_out, log = spec_for(c)
            fh = open(log, "w")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, "-m", "sinkcache.compare.cell", str(spec_path), str(cell_out)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
            active.append((c, proc, cell_out, log, fh))
        time.sleep(1.0)
        for item in list(active):
            c, proc, cell_out, log, fh = item
            if proc.poll() is not None:
                fh.close()
                active.remove(item)
                finish(c, proc.returncode, cell_out, log)
