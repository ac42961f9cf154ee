"""Per-document scores of a cell, and the task scores computed from them.

Every cell keeps each document's primary metric (``docs``: ``{task: {doc_id: value}}``), so that
cells can be compared document by document (paired intervals, :mod:`.stats`) and so that shards of
documents run in different processes merge into exactly the record one process would write.
Accuracy tasks store the per-document metric (exact match, ``acc``); streaming perplexity stores
``[loglikelihood, bytes]`` (bits/byte is a ratio of sums, not a mean of per-document values).
"""

from __future__ import annotations

import math
from typing import Any

from .plan import ACCURACY_METRICS, PPL_METRIC, PPL_TASK, ruler_parts, ruler_split

Docs = dict[str, dict[str, Any]]


def ruler_metric(task: str) -> str:
    """lm-eval's metric key of a RULER task at one length: ``"1024,none"`` for ``niah_single_1@1024``."""
    return f"{ruler_parts(task)[1]},none"


def per_doc(results: dict[str, Any], tasks: list[str] | tuple[str, ...]) -> Docs:
    """``{task: {doc_id: value}}`` from lm-eval results made with ``log_samples=True``.

    A RULER task at one length (``niah_single_1@1024``) takes the documents of that length from
    its variant's samples (RULER scores each document under its own length and -1 under the others)."""
    out: Docs = {}
    samples = results.get("samples") or {}
    for task in tasks:
        if sp := ruler_split(task):
            key = str(sp[1])
            rvals = {
                str(s["doc_id"]): float(s[key])
                for s in samples.get(sp[0], [])
                if s.get("filter") == "none" and key in s and float(s[key]) != -1.0
            }
            if rvals:
                out[task] = dict(sorted(rvals.items(), key=lambda kv: int(kv[0])))
            continue
        if task == PPL_TASK:
            metric, filt = PPL_METRIC.split(",")
        elif task in ACCURACY_METRICS:
            metric, filt = ACCURACY_METRICS[task].split(",")
        else:
            continue
        vals: dict[str, Any] = {}
        for s in samples.get(task, []):
            if s.get("filter") != filt or metric not in s:
                continue
            v = s[metric]
            vals[str(s["doc_id"])] = [float(v[0]), float(v[1])] if task == PPL_TASK else float(v)
        if vals:
            out[task] = dict(sorted(vals.items(), key=lambda kv: int(kv[0])))
    return out


def bits_per_byte(pairs: list[list[float]]) -> float:
    """lm-eval's ``bits_per_byte``: ``-sum(loglikelihood) / sum(bytes) / ln 2``."""
    return -sum(p[0] for p in pairs) / sum(p[1] for p in pairs) / math.log(2)


def task_scores(docs: Docs) -> dict[str, dict[str, float]]:
    """``{task: {"metric,filter": value}}`` computed from the documents (as lm-eval aggregates them)."""
    out: dict[str, dict[str, float]] = {}
    for task, vals in docs.items():
        if task == PPL_TASK:
            out[task] = {PPL_METRIC: bits_per_byte(list(vals.values()))}
        elif task in ACCURACY_METRICS:
            out[task] = {ACCURACY_METRICS[task]: sum(vals.values()) / len(vals)}
        elif ruler_split(task):
            out[task] = {ruler_metric(task): sum(vals.values()) / len(vals)}
    return out


def merge_docs(parts: list[Docs]) -> Docs:
    """The union of shards' documents (a document scored twice is an error: shards must be disjoint)."""
    out: Docs = {}
    for part in parts:
        for task, vals in part.items():
            dst = out.setdefault(task, {})
            dup = set(dst) & set(vals)
            if dup:
                raise ValueError(f"task {task}: documents {sorted(dup, key=int)[:5]} appear in two shards")
            dst.update(vals)
    return {t: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for t, v in out.items()}
