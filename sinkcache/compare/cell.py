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

from .plan import ACCURACY_METRICS, PPL_METRIC, PPL_TASK, Cell

# Cache knobs of the in-package policies (ours and the baselines).
_SINKCACHE_KW: dict[str, dict[str, Any]] = {
    "full": {"policy": "full"},
    "sink-evict": {"policy": "evict", "sinks": "auto"},
    "recent-evict": {"policy": "evict", "sinks": "none"},
    "streamingllm": {"policy": "evict", "sinks": "first", "n_first": 4},
    "sink-quant": {"policy": "quantize", "sinks": "auto"},
    "kivi": {"policy": "quantize", "sinks": "none"},
    "sink-hybrid": {"policy": "hybrid", "sinks": "auto"},
}
_WINDOW_MODE = {"recent-evict": "rest", "streamingllm": "rest"}


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


def build_lm(cell: Cell, model_name: str, *, model: Any = None, tokenizer: Any = None, checkpoint: str | None = None, log: str | None = None):
    """The lm-eval model object that runs ``cell`` (options from :func:`lm_options`)."""
    from . import lms

    opts = lm_options(cell)
    cls = getattr(lms, opts.pop("class"))
    pretrained = model if model is not None else model_name
    common: dict[str, Any] = {"pretrained": pretrained, "tokenizer": tokenizer, "device": "cpu", "batch_size": 1}
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
    ppl = scores.get(PPL_TASK, {}).get(PPL_METRIC) if PPL_TASK in cell.tasks else None
    return {
        "per_task": per_task,
        "suite_score": (sum(vals) / len(vals)) if vals else None,
        "bits_per_byte": ppl,
        "word_perplexity": scores.get(PPL_TASK, {}).get("word_perplexity,none"),
        "kv_ratio": memory.get("ratio_vs_full"),
        # streaming perplexity: bytes attention really used per scored token (not the final state)
        "ppl_attended_kv_ratio": (memory.get("per_task", {}).get(PPL_TASK) or {}).get("attended_ratio_vs_full"),
        "mean_kv_bytes": memory.get("mean_memory_bytes"),
        "mean_full_kv_bytes": memory.get("mean_dense_bytes"),
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
) -> dict[str, Any]:
    """Run ``cell``; returns its record (scores, measured memory, wall time, peak RSS)."""
    import lm_eval
    import torch

    from ..evaluation import _scores, _versions, task_manager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    lm = build_lm(cell, model_name, model=model, tokenizer=tokenizer, checkpoint=checkpoint, log=log)
    t_load = time.perf_counter() - t0
    worker_rss = 0
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(cell.tasks),
            batch_size=1,
            device="cpu",
            limit=limit,
            task_manager=task_manager(include_defaults=False),  # the suite only: skips indexing ~15k tasks
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    finally:
        if hasattr(lm, "close"):
            worker_rss = lm.close()
    wall = time.perf_counter() - t0
    scores = _scores(results or {})
    memory = lm.kv_memory
    built, requested = memory.pop("cache", {}), memory.pop("cache_requested", {})
    versions = _versions()
    if getattr(lm, "worker_versions", None):
        versions["peer_env"] = lm.worker_versions
    rec = {
        "cell": cell.to_dict(),
        "cell_id": cell.cell_id,
        "group": cell.group,
        "setting": cell.setting,
        "cache": built,  # read back from the caches that ran (per-request values as ranges)
        "cache_requested": requested,
        "lm_options": lm_options(cell),
        "scores": scores,
        "memory": memory,
        "summary": summarize(cell, scores, memory),
        "n_samples": (results or {}).get("n-samples", {}),
        "time_s": {"load": round(t_load, 2), "wall": round(wall, 2)},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peer_worker_peak_rss_bytes": worker_rss or None,
        "num_threads": torch.get_num_threads(),
        "versions": versions,
    }
    return rec


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    rec = run_cell(
        Cell.from_dict(spec["cell"]),
        spec["model"],
        limit=spec.get("limit"),
        seed=int(spec.get("seed", 0)),
        checkpoint=spec.get("checkpoint"),
        log=spec.get("log"),
    )
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
