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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .cell import record_from_parts
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
    out_dir: Path, model: str, limit: int | None, seed: int, cells: list[Cell], code: str | None = None,
    *, device: str = "cpu", dtype: str = "float32",
) -> dict[str, dict[str, Any]]:
    """Finished cell records (by cell id) that match this run: same options, device, dtype and code."""
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
        if rec.get("key") == run_key(model, limit, seed, c, code=code, device=device, dtype=dtype):
            done[c.cell_id] = rec
    return done


def load_cells(out_dir: Path, model: str) -> list[dict[str, Any]]:
    """Every finished cell record in ``out_dir/cells`` for ``model``, whatever run made it.

    A report covers all of them (for example peers run at 50 documents next to in-package cells at
    100): each record carries its own limit, code fingerprint and per-document scores, and pairs
    are taken over the documents both cells scored.
    """
    recs: list[dict[str, Any]] = []
    for path in sorted((Path(out_dir) / "cells").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("model") != model or "cell" not in rec or "summary" not in rec:
            continue
        recs.append(rec)
    return recs


def _env() -> dict[str, str]:
    from ..placement import DIST_ENV

    # a cell runs alone: without a launch's rank variables (else lm-eval would shard it again)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _subprocess_runner(spec_path: Path, out_path: Path, log_path: Path) -> int:
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "sinkcache.compare.cell", str(spec_path), str(out_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    return proc.returncode


@dataclass
class _Job:
    """One process: a single cell, or one shard of documents of the fork group."""

    name: str
    spec: dict[str, Any]
    out: Path
    cells: list[Cell]


def run_sweep(
    model: str,
    cells: list[Cell],
    out_dir: str | Path,
    *,
    limit: int | None,
    seed: int = 0,
    jobs: int = 1,
    fork: bool = True,
    fork_shards: int | None = None,
    runner: Callable[[Path, Path, Path], int] | None = None,
    on_update: Callable[[list[dict[str, Any]]], None] | None = None,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run the cells not finished yet; returns ``{"done": [...records], "failed": [...], "skipped": n}``.

    ``fork``: the in-package cells (ours and the in-package baselines) run together from one
    prefill per request (:class:`~sinkcache.fork_lm.ForkLM`), their documents dealt over ``jobs``
    processes; each peer cell runs alone. ``jobs`` processes run at once (single-threaded each).
    ``fork_shards`` (default ``jobs``): how many pieces the fork group's documents are dealt into;
    each finished piece is kept in ``OUT/parts`` and reused on resume, so more pieces than ``jobs``
    make a long grid resumable in small steps.
    ``runner(spec, out, log)`` runs one process (default: ``python -m sinkcache.compare.cell``);
    ``on_update(records)`` is called after every finished cell with all records so far.
    ``device`` (``cpu``/``cuda``) and ``dtype``: where every cell runs; both are part of the run key.

    Under ``accelerate launch``/``torchrun`` (``WORLD_SIZE > 1``) each rank runs its share of the
    jobs (:func:`.ranks.my_share`; the fork group's documents are dealt into one shard per rank
    unless ``fork_shards`` says otherwise), on ``cuda:<local rank>`` when ``device`` is ``cuda``;
    rank 0 then merges and reports, the other ranks return ``{"rank": r, ...}`` with nothing done.
    """
    from ..placement import dist_ranks, rank_device
    from . import ranks

    rank, world, local_rank = dist_ranks()
    if world > 1 and jobs > 1:
        raise ValueError(f"jobs={jobs} under a launch of {world} ranks: the ranks are the processes; drop --jobs")
    lead = rank == 0
    out = Path(out_dir)
    for sub in ("cells", "logs", "parts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    run = runner or _subprocess_runner
    cells = interleave(cells)
    code = code_fingerprint()
    done = load_done(out, model, limit, seed, cells, code, device=device, dtype=dtype)
    if world > 1:
        ranks.barrier()  # every rank has read the finished cells before rank 0 writes any (same plan on every rank)
    todo = [c for c in cells if c.cell_id not in done]
    failed: list[dict[str, Any]] = []
    records = [done[c.cell_id] for c in cells if c.cell_id in done]
    if on_update is not None and records and lead:
        on_update(records)
    base: dict[str, Any] = {"model": model, "limit": limit, "seed": seed, "code": code, "threads": 1, "device": device, "dtype": dtype}
    key = {c.cell_id: run_key(model, limit, seed, c, code=code, device=device, dtype=dtype) for c in cells}

    from .cell import forkable

    shards = int(fork_shards) if fork_shards is not None else max(1, int(world if world > 1 else jobs))
    if shards < 1:
        raise ValueError(f"fork_shards={fork_shards!r}: must be a positive integer")
    group = [c for c in todo if fork and forkable(c)]
    if len(group) < 2 and shards < 2:
        group = []  # one cell in one process: nothing to share, nothing to deal out
    # A single in-package cell still goes through the fork path when there are several shards:
    # its documents are dealt over the processes (and finished pieces are kept), as for a group.
    job_list: list[_Job] = []
    for k in range(shards if group else 0):
        keys = [key[c.cell_id] for c in group]
        spec = dict(base, cells=[c.to_dict() for c in group], keys=keys, shard=k, shards=shards)
        job_list.append(_Job(f"fork_{k + 1}of{shards}", spec, out / "parts" / f"fork_{k + 1}of{shards}.json", group))
    for c in todo:
        if c in group:
            continue
        spec = dict(base, cell=c.to_dict(), key=key[c.cell_id], log=str((out / "logs" / f"{c.cell_id}.peer.log").resolve()))
        job_list.append(_Job(c.cell_id, spec, out / "cells" / f"{c.cell_id}.json", [c]))

    bar = tqdm(total=len(todo), desc=f"compare {model}", unit="cell", disable=not (progress and lead), dynamic_ncols=True)
    if done and progress and lead:
        bar.write(f"resuming: {len(done)} of {len(cells)} cells already finished in {out / 'cells'}")
    if group and progress and lead:
        bar.write(f"{len(group)} in-package cells share one prefill per request, documents over {shards} process(es)")
    shard_out: dict[str, dict[str, Any]] = {}

    def reusable_part(job: _Job) -> bool:
        if not job.out.exists() or "cells" not in job.spec:
            return False
        try:
            return json.loads(job.out.read_text()).get("keys") == job.spec["keys"]
        except (OSError, ValueError):
            return False

    def add(rec: dict[str, Any], c: Cell) -> None:
        records.append(rec)
        s = rec.get("summary", {})
        score = s.get("suite_score")
        bar.set_postfix_str(f"{c.cell_id}: score {score if score is None else round(score, 3)}, KV {100 * (s.get('kv_ratio') or 0):.1f}%")
        bar.update(1)

    def finish_group() -> None:
        shard_recs = [shard_out[j.name] for j in job_list if "cells" in j.spec]
        for c in group:
            parts = [r["parts"][c.cell_id] for r in shard_recs]
            member_s = sum(r["timing"]["member_s"][c.cell_id] for r in shard_recs)
            rec = record_from_parts(
                c, parts,
                time_s={"wall": round(member_s, 2), "note": "this cell's own compute; the shared prefill is in fork"},
                fork={
                    "members": len(group), "shards": len(shard_recs),
                    "jobs": max(1, int(jobs)), "ranks": world,
                    "group_wall_s": max(r["timing"]["wall_s"] for r in shard_recs),
                    "shard_wall_s": [round(r["timing"]["wall_s"], 2) for r in shard_recs],
                    "shared_prefill_s": round(sum(r["timing"]["shared_prefill_s"] for r in shard_recs), 2),
                    "prefills": sum(r["timing"]["prefills"] for r in shard_recs),
                },
                peak_rss_bytes=max(r["peak_rss_bytes"] for r in shard_recs),
                peer_worker_peak_rss_bytes=None,
                num_threads=shard_recs[0]["num_threads"],
                versions=shard_recs[0]["versions"],
                key=key[c.cell_id], code=code, limit=limit, seed=seed, model=model,
            )
            dst = out / "cells" / f"{c.cell_id}.json"
            tmp = dst.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=1) + "\n")
            tmp.replace(dst)
            add(rec, c)
        if on_update is not None:
            on_update(records)

    def finish(job: _Job, rc: int) -> None:
        log = out / "logs" / f"{job.name}.log"
        if rc != 0 or not job.out.exists():
            failed.extend({"cell_id": c.cell_id, "returncode": rc, "log": str(log)} for c in job.cells)
            bar.write(f"{job.name} failed (status {rc}); see {log}")
            if "cells" not in job.spec:
                bar.update(1)
            return
        rec = json.loads(job.out.read_text())
        if "cells" in job.spec:
            shard_out[job.name] = rec
            if all(j.name in shard_out for j in job_list if "cells" in j.spec):
                finish_group()
        else:
            add(rec, job.cells[0])
            if on_update is not None:
                on_update(records)

    pending: list[_Job] = []
    for job in job_list:
        if reusable_part(job):
            if progress and lead:
                bar.write(f"{job.name}: reusing finished shard {job.out}")
            if lead:
                finish(job, 0)
        else:
            pending.append(job)

    def spec_for(job: _Job) -> tuple[Path, Path, Path]:
        spec_path = out / "logs" / f"{job.name}.spec.json"
        spec_path.write_text(json.dumps(job.spec, indent=1) + "\n")
        return spec_path, job.out, out / "logs" / f"{job.name}.log"

    if world > 1:
        ranks.barrier()  # every rank has read the finished parts before any rank writes new ones
        for job in ranks.my_share(pending, rank, world):
            job.spec["device"] = rank_device(device, local_rank)
            sp, jo, lg = spec_for(job)
            rc = run(sp, jo, lg)
            (out / "logs" / f"{job.name}.rc").write_text(f"{rc}\n")
        ranks.barrier()
        if not lead:
            bar.close()
            ranks.close()
            return {"done": [], "failed": [], "skipped": len(done), "rank": rank}
        for job in pending:
            rc_path = out / "logs" / f"{job.name}.rc"
            finish(job, int(rc_path.read_text()) if rc_path.exists() else 1)
        ranks.close()
    elif jobs <= 1 or runner is not None:
        for job in pending:
            bar.set_description(f"compare {model}: {job.name}")
            sp, jo, lg = spec_for(job)
            finish(job, run(sp, jo, lg))
    else:
        active: list[tuple[_Job, subprocess.Popen, Any]] = []
        try:
            _run_parallel(pending, active, jobs, spec_for, finish)
        finally:  # interrupted: stop the processes still running (they are rerun on resume)
            for _j, proc, fh in active:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                fh.close()
    bar.close()
    order = {c.cell_id: i for i, c in enumerate(cells)}
    records.sort(key=lambda r: order.get(r["cell_id"], 1 << 30))
    return {"done": records, "failed": failed, "skipped": len(done)}


def _run_parallel(pending, active, jobs, spec_for, finish) -> None:
    """Keep ``jobs`` processes running until ``pending`` is empty and all have finished."""
    env = _env()
    while pending or active:
        while pending and len(active) < jobs:
            job = pending.pop(0)
            spec_path, job_out, log = spec_for(job)
            fh = open(log, "w")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, "-m", "sinkcache.compare.cell", str(spec_path), str(job_out)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
            active.append((job, proc, fh))
        time.sleep(1.0)
        for item in list(active):
            job, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                active.remove(item)
                finish(job, proc.returncode)
