"""Run one cell of ``sinkcache compare`` (one policy at one memory setting over the tasks).

``python -m sinkcache.compare.cell SPEC.json OUT.json`` runs in its own process so that its peak
RSS is its own; the parent (:mod:`sinkcache.compare.runner`) starts one per cell.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .plan import ACCURACY_METRICS, PPL_METRIC, PPL_TASK, Cell, ruler_split
from .samples import merge_docs, per_doc, ruler_metric, task_scores

# Cache knobs of the in-package policies (ours and the baselines).
_SINKCACHE_KW: dict[str, dict[str, Any]] = {
    "full": {"policy": "full"},
    # The scorer is pinned: these cells measure key-norm eviction whatever the library default is.
    "sink-evict": {"policy": "evict", "sinks": "auto", "score": "keynorm"},
    "sink-evict-tova": {"policy": "evict", "sinks": "auto", "score": "tova"},
    "sink-evict-snapkv": {"policy": "evict", "sinks": "auto", "score": "snapkv"},
    "sink-evict-h2o": {"policy": "evict", "sinks": "auto", "score": "h2o"},
    # TOVA with a 32-token recent window instead of min(256, budget // 2): kvpress's TOVA reserves
    # none, so at 50% ours spent half its budget on a window the scorer could have chosen itself.
    "sink-evict-tova-w32": {"policy": "evict", "sinks": "auto", "score": "tova", "window": 32},
    # TOVA pooled over the layer's heads, as kvpress's TOVAPress scores (one token set per layer).
    "sink-evict-tova-pooled": {"policy": "evict", "sinks": "auto", "score": "tova-pooled"},
    # The sink ablation of the default eviction: the same scorer and window, no sinks kept. TOVA
    # keeps tokens that draw attention, sinks included, so this asks what explicit protection adds.
    "nosink-evict-tova-pooled": {"policy": "evict", "sinks": "none", "score": "tova-pooled"},
    # The default scorer with a 32-token recent window instead of min(256, budget // 2): kvpress's
    # TOVA protects only the newest token, so at small budgets ours scores half as many tokens.
    "sink-evict-tova-pooled-w32": {"policy": "evict", "sinks": "auto", "score": "tova-pooled", "window": 32},
    # Two candidates beyond kvpress's TOVA score, both with the 32-token window (issue 15): value-
    # weighted attention (VATP; sinks are what VATP alone loses) and max-pooled spans.
    "sink-evict-vatp-w32": {"policy": "evict", "sinks": "auto", "score": "vatp", "window": 32},
    "sink-evict-tova-span-w32": {"policy": "evict", "sinks": "auto", "score": "tova-span", "window": 32},
    # vatp with a window that shrinks with small budgets, min(32, budget // 8) (window mode "shrink"):
    # the 32-token window was half of a 512-token prompt's budget at 12.5% (gemma3's passkey misses).
    "sink-evict-vatp-wshrink": {"policy": "evict", "sinks": "auto", "score": "vatp"},
    "recent-evict": {"policy": "evict", "sinks": "none", "score": "keynorm"},
    "streamingllm": {"policy": "evict", "sinks": "first", "n_first": 4, "score": "keynorm"},
    "sink-quant": {"policy": "quantize", "sinks": "auto"},
    # The library's default sink selector (the grid's sink-quant measures "auto").
    "sink-quant-first": {"policy": "quantize", "sinks": "first"},
    "kivi": {"policy": "quantize", "sinks": "none"},
    # The design issue 14 measured on held-out text: first-token sink + 14% of each block refined.
    "sink-quant-refine": {"policy": "quantize", "sinks": "first", "refine": 0.14},
    # Both halves of issue 14's evidence in one cache: measured sinks (won the suite) + refinement (won RULER).
    "sink-quant-auto-refine": {"policy": "quantize", "sinks": "auto", "refine": 0.14},
    "sink-hybrid": {"policy": "hybrid", "sinks": "auto"},
    "nosink-hybrid": {"policy": "hybrid", "sinks": "none"},
}
_WINDOW_MODE = {"recent-evict": "rest", "streamingllm": "rest", "sink-evict-vatp-wshrink": "shrink"}


def lm_options(cell: Cell) -> dict[str, Any]:
    """The lm-eval model class and every option that runs ``cell`` (no model objects): what the
    cell *is*. It goes into the run key, so changing any knob here invalidates finished cells."""
    from .plan import HYBRID_GROUP, HYBRID_WINDOW, QUANT_GROUP, QUANT_WINDOW

    if cell.policy in _SINKCACHE_KW:
        kw = dict(_SINKCACHE_KW[cell.policy])
        if kw["policy"] == "quantize":
            kw.update(bits=cell.bits, window=QUANT_WINDOW, group_size=QUANT_GROUP)
        elif kw["policy"] == "hybrid":
            # smaller groups and window so that small budgets still leave room for evictable groups
            kw.update(bits=cell.bits, window=HYBRID_WINDOW, group_size=HYBRID_GROUP)
        if kw["policy"] in ("evict", "hybrid"):
            if cell.budget is None:
                raise ValueError(f"cell {cell.cell_id}: policy {cell.policy!r} needs a budget")
            kw.update(budget_frac=cell.budget / 100.0, window_mode=_WINDOW_MODE.get(cell.policy, "default"))
        return {"class": "FractionLM", **kw}
    if cell.policy in ("hf-quanto", "hf-hqq"):
        return {"class": "QuantizedPeerLM", "backend": cell.policy.removeprefix("hf-"), "nbits": int(cell.bits or 4)}
    if cell.policy.startswith("kvpress-"):
        if cell.budget is None:
            raise ValueError(f"cell {cell.cell_id}: kvpress presses need a budget")
        return {"class": "KVPressLM", "press": cell.policy.removeprefix("kvpress-"), "ratio": round(1 - cell.budget / 100.0, 6)}
    raise ValueError(f"unknown policy {cell.policy!r}")


def build_lm(
    cell: Cell, model_name: str, *, model: Any = None, tokenizer: Any = None, checkpoint: str | None = None, log: str | None = None,
    device: str = "cpu", dtype: str = "float32",
):
    """The lm-eval model object that runs ``cell`` (options from :func:`lm_options`) on ``device``
    in ``dtype`` (a model object given as ``model`` runs where it is)."""
    from . import lms

    opts = lm_options(cell)
    cls = getattr(lms, opts.pop("class"))
    pretrained = model if model is not None else model_name
    common: dict[str, Any] = {"pretrained": pretrained, "tokenizer": tokenizer, "device": device, "dtype": dtype, "batch_size": 1}
    if cls is lms.KVPressLM:
        if checkpoint is None:
            from ..models import load_model  # noqa: F401  (ensures the converted checkpoint exists)

            checkpoint = str(Path.home() / ".cache" / "sinkcache" / model_name)
        return cls(**common, **opts, checkpoint=checkpoint, log=log)
    return cls(**common, **opts)


def summarize(cell: Cell, scores: dict[str, dict[str, float]], memory: dict[str, Any]) -> dict[str, Any]:
    """Per-task primary metric, the suite score (mean accuracy) and perplexity (bits/byte)."""
    per_task = {t: scores.get(t, {}).get(m) for t, m in ACCURACY_METRICS.items() if t in cell.tasks}
    vals = [v for v in per_task.values() if v is not None]
    ruler = {t: scores.get(t, {}).get(ruler_metric(t)) for t in cell.tasks if ruler_split(t)}
    ruler_vals = [v for v in ruler.values() if v is not None]
    ppl = scores.get(PPL_TASK, {}).get(PPL_METRIC) if PPL_TASK in cell.tasks else None
    return {
        "per_task": per_task,
        "suite_score": (sum(vals) / len(vals)) if vals else None,
        "ruler_per_task": ruler,
        # every RULER task; the report's interval leaves out tasks the full cache scores 0 on
        "ruler_score": (sum(ruler_vals) / len(ruler_vals)) if ruler_vals else None,
        "bits_per_byte": ppl,
        "word_perplexity": scores.get(PPL_TASK, {}).get("word_perplexity,none"),
        "kv_ratio": memory.get("ratio_vs_full"),
        # streaming perplexity: bytes attention really used per scored token (not the final state)
        "ppl_attended_kv_ratio": (memory.get("per_task", {}).get(PPL_TASK) or {}).get("attended_ratio_vs_full"),
        "mean_kv_bytes": memory.get("mean_memory_bytes"),
        "mean_full_kv_bytes": memory.get("mean_dense_bytes"),
    }


def shard_samples(
    tasks: list[str] | tuple[str, ...], limit: int | None, shard: int = 0, shards: int = 1, *, tokenizer: Any = None, model_name: str = ""
) -> dict[str, list[int]]:
    """lm-eval ``samples=``: per task, the first ``limit`` documents (of each RULER length) whose
    position is ``shard`` modulo ``shards`` (see :func:`.tasks.samples`)."""
    from . import tasks as tasks_mod

    return tasks_mod.samples(tasks_mod.load(tasks, tokenizer=tokenizer, model_name=model_name), limit, shard, shards)


def _evaluate(lm: Any, ts: Any, samples: dict[str, list[int]], seed: int) -> dict[str, Any]:
    from ..evaluation import _simple_evaluate

    return _simple_evaluate(
        lm, ts.lm_tasks, samples=samples, num_fewshot=None, batch_size=1, limit=None,
        task_manager=ts.task_manager, log_samples=True, apply_chat_template=False, seed=seed, bootstrap_iters=0, progress=False,
    ) or {}


def _part(lm: Any, results: dict[str, Any], tasks: list[str], wall: float, doc_hash: dict[str, Any] | None = None) -> dict[str, Any]:
    """What one process measured for one cell: per-document scores and the raw KV log."""
    from ..evaluation import _scores
    from ..placement import placement

    log = lm.kv_log
    where = getattr(lm, "worker_placement", None) or placement(lm.model)
    return {
        "placement": where,
        "docs": per_doc(results, tasks),
        "doc_hash": doc_hash or {},
        "lm_eval_scores": _scores(results),
        "n_samples": results.get("n-samples", {}),
        "kv": {"records": list(log.records), "configs": list(log.configs), "attended": list(log.attended)},
        "cache_requested": lm.kv_memory.get("cache_requested", {}),
        "wall_s": round(wall, 2),
    }


def record_from_parts(cell: Cell, parts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A cell's record from the parts its shards wrote: scores recomputed from the merged documents,
    memory from the merged KV logs, the built cache from every request's read-back description."""
    from ..evaluation import _KVLog, merge_configs

    log = _KVLog()
    for p in parts:
        log.records += [tuple(r) for r in p["kv"]["records"]]
        log.configs += p["kv"]["configs"]
        log.attended += [tuple(a) for a in p["kv"]["attended"]]
    docs = merge_docs([p["docs"] for p in parts])
    doc_hash = merge_docs([p.get("doc_hash") or {} for p in parts])
    scores = task_scores(docs)
    memory = log.summary()
    rec = {
        "cell": cell.to_dict(),
        "cell_id": cell.cell_id,
        "group": cell.group,
        "setting": cell.setting,
        "cache": merge_configs(log.configs),  # read back from the caches that ran
        "cache_requested": parts[0].get("cache_requested", {}) if parts else {},
        "lm_options": lm_options(cell),
        "scores": scores,
        "memory": memory,
        "summary": summarize(cell, scores, memory),
        "docs": docs,
        "n_docs": {t: len(v) for t, v in docs.items()},
        "shards": len(parts),
    }
    where = [p["placement"] for p in parts if p.get("placement")]
    if where:
        # read back from the models that ran; one entry per distinct placement (ranks on cuda:0, cuda:1, ...)
        rec["placement"] = where[0] if all(w == where[0] for w in where) else [dict(w) for w in {json.dumps(w, sort_keys=True): w for w in where}.values()]
    if doc_hash:
        rec["doc_hash"] = doc_hash  # RULER documents are generated: pairs check they are the same
    if len(parts) == 1:
        rec["lm_eval_scores"] = parts[0]["lm_eval_scores"]  # lm-eval's own aggregate, for cross-checking
    rec.update(extra)
    return rec


def _process_facts() -> dict[str, Any]:
    import torch

    from ..evaluation import _versions

    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "num_threads": torch.get_num_threads(),
        "versions": _versions(),
    }


def run_cell(
    cell: Cell,
    model_name: str,
    *,
    limit: int | None,
    seed: int = 0,
    model: Any = None,
    tokenizer: Any = None,
    checkpoint: str | None = None,
    log: str | None = None,
    progress: bool = False,
    shard: int = 0,
    shards: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run ``cell`` alone on ``device`` in ``dtype``; returns its record (scores, per-document scores, measured memory, wall
    time, peak RSS)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    lm = build_lm(cell, model_name, model=model, tokenizer=tokenizer, checkpoint=checkpoint, log=log, device=device, dtype=dtype)
    t_load = time.perf_counter() - t0
    worker_rss = 0
    tasks = list(cell.tasks)
    from . import tasks as tasks_mod

    try:
        ts = tasks_mod.load(tasks, tokenizer=getattr(lm, "tokenizer", tokenizer), model_name=model_name)
        picked = tasks_mod.samples(ts, limit, shard, shards)
        results = _evaluate(lm, ts, picked, seed)
    finally:
        if hasattr(lm, "close"):
            worker_rss = lm.close()
    wall = time.perf_counter() - t0
    part = _part(lm, results, tasks, wall, tasks_mod.doc_hashes(ts, picked))
    facts = _process_facts()
    if getattr(lm, "worker_versions", None):
        facts["versions"]["peer_env"] = lm.worker_versions
    return record_from_parts(
        cell, [part], time_s={"load": round(t_load, 2), "wall": round(wall, 2)},
        peer_worker_peak_rss_bytes=worker_rss or None, **facts,
    )


def run_fork_shard(
    cells: list[Cell], model_name: str, *, limit: int | None, seed: int = 0, shard: int = 0, shards: int = 1,
    model: Any = None, tokenizer: Any = None, device: str = "cpu", dtype: str = "float32",
) -> dict[str, Any]:
    """One shard of documents for several in-package cells, one prefill per request
    (:class:`~sinkcache.fork_lm.ForkLM`). Returns ``{"parts": {cell_id: part}, "timing": ...}``."""
    from ..fork_lm import ForkLM

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = list(cells[0].tasks)
    if any(list(c.tasks) != tasks for c in cells):
        raise ValueError("cells forked together must run the same tasks")
    bad = [c.cell_id for c in cells if not forkable(c)]
    if bad:
        raise ValueError(f"cells {bad} are peers: they run their own prefill (run_cell)")
    t0 = time.perf_counter()
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(model_name, dtype=dtype)
        model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to() confuses mypy
    members = {c.cell_id: build_lm(c, model_name, model=model, tokenizer=tokenizer, device=device, dtype=dtype) for c in cells}
    fork = ForkLM(members)
    t_load = time.perf_counter() - t0
    from . import tasks as tasks_mod

    ts = tasks_mod.load(tasks, tokenizer=tokenizer, model_name=model_name)
    samples = tasks_mod.samples(ts, limit, shard, shards)
    hashes = tasks_mod.doc_hashes(ts, samples)
    walls: dict[str, float] = {}

    def ev(lm):
        t = time.perf_counter()
        res = _evaluate(lm, ts, samples, seed)
        walls[lm.current] = time.perf_counter() - t
        return res

    results = fork.run_all(ev)
    parts = {name: _part(members[name], results[name], tasks, walls[name], hashes) for name in fork.names}
    timing = {
        "load_s": round(t_load, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "record_pass_s": round(walls[fork.names[0]], 2),
        "shared_prefill_s": round(fork.timing["shared_prefill_s"], 2),
        "prefills": fork.timing["prefills"],
        "member_s": {k: round(v, 2) for k, v in fork.timing["member_s"].items()},
    }
    return {"parts": parts, "timing": timing, "shard": shard, "shards": shards, **_process_facts()}


def forkable(cell: Cell) -> bool:
    """In-package policies attend the prompt at full precision: they can share one prefill."""
    return lm_options(cell)["class"] == "FractionLM"


def main(argv: list[str] | None = None) -> int:
    """``python -m sinkcache.compare.cell SPEC.json OUT.json``: one cell (``"cell"``) or one shard
    of a fork group (``"cells"``, ``"shard"``, ``"shards"``), written atomically to ``OUT.json``."""
    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    common = {"limit": spec.get("limit"), "seed": int(spec.get("seed", 0)), "device": spec.get("device", "cpu"), "dtype": spec.get("dtype", "float32")}
    if "cells" in spec:
        rec = run_fork_shard(
            [Cell.from_dict(c) for c in spec["cells"]], spec["model"], shard=int(spec["shard"]), shards=int(spec["shards"]), **common
        )
        rec["keys"] = spec["keys"]
    else:
        rec = run_cell(Cell.from_dict(spec["cell"]), spec["model"], checkpoint=spec.get("checkpoint"), log=spec.get("log"), **common)
        rec["key"] = spec["key"]
    rec["code"] = spec.get("code")
    rec["limit"] = spec.get("limit")
    rec["seed"] = spec.get("seed", 0)
    rec["model"] = spec["model"]
    from lm_eval.utils import handle_non_serializable

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=handle_non_serializable) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
