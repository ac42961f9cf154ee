"""Which lm-eval tasks and documents a compare cell runs: the offline suite, and lm-eval's own RULER
tasks at chosen document lengths.

A compare task is a suite task (``sinkcache_passkey``) or one RULER variant at one length
(``niah_single_1@1024``, see :func:`~sinkcache.compare.plan.ruler_split`). RULER generates its
documents when the task is loaded, sized by the model's tokenizer (saved to a local folder, which
RULER's metadata needs). Two things make its documents the same in every process, so that cells and
document shards can be paired document by document:

* each variant is loaded on its own with Python's and NumPy's global generators seeded first
  (``ruler_vt`` draws from them unseeded) and RULER's module-level generators reset;
* every document's input is hashed (:func:`doc_hashes`); pairs are taken only over documents whose
  hashes agree (:func:`~sinkcache.compare.report.paired`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from .plan import RULER_TASKS, ruler_split

#: Seed of the global generators before loading RULER variant ``i`` (of :data:`RULER_TASKS`).
RULER_SEED = 1234


@dataclass
class TaskSet:
    """The loaded tasks of one cell (or fork group).

    ``lm_tasks``: what lm-eval's evaluate is given (task names for the suite alone; loaded task
    objects when RULER is in, so its documents are generated once); ``docs``: lm-eval task name ->
    its evaluation documents; ``lengths``: RULER variant -> the lengths this cell scores.
    """

    tasks: list[str]
    lm_tasks: list[Any]
    task_manager: Any
    docs: dict[str, Any]
    lengths: dict[str, list[int]] = field(default_factory=dict)


def ruler_lengths(tasks: list[str] | tuple[str, ...]) -> list[int]:
    """Every RULER length in ``tasks`` (RULER's metadata takes one list for all its variants)."""
    return sorted({sp[1] for t in tasks if (sp := ruler_split(t))})


def load(tasks: list[str] | tuple[str, ...], *, tokenizer: Any = None, model_name: str = "") -> TaskSet:
    """Load ``tasks``; RULER variants need the model's ``tokenizer`` (saved under ``model_name``)."""
    from lm_eval.tasks import get_task_dict

    from .. import ruler
    from ..evaluation import task_manager

    suite = [t for t in tasks if not ruler_split(t)]
    lengths: dict[str, list[int]] = {}
    for t in tasks:
        if sp := ruler_split(t):
            lengths.setdefault(sp[0], []).append(sp[1])
    if not lengths:
        tm = task_manager(include_defaults=False)  # the suite only: skips indexing ~15k tasks
        tdict = get_task_dict(suite, tm)
        return TaskSet(list(tasks), list(suite), tm, {t: tdict[t].eval_docs for t in suite})
    ruler.check_available()
    if tokenizer is None:
        raise ValueError("RULER tasks need the model's tokenizer (they size their documents with it)")
    tok_dir = ruler.tokenizer_path(tokenizer, model_name)
    tm = task_manager(include_defaults=True, metadata=ruler.metadata(tok_dir, ruler_lengths(tasks)))
    objs: dict[str, Any] = {}
    if suite:
        objs.update(ruler.leaf_tasks(get_task_dict(suite, tm)))
    import numpy as np

    with ruler.quiet_punkt():
        for base in lengths:
            state = random.getstate()
            random.seed(RULER_SEED + RULER_TASKS.index(base))
            np.random.seed(RULER_SEED + RULER_TASKS.index(base))
            _reseed_module_rngs()
            try:
                objs.update(ruler.leaf_tasks(get_task_dict([base], tm)))
            finally:
                random.setstate(state)
    names = [*suite, *lengths]
    return TaskSet(list(tasks), [objs[n] for n in names], tm, {n: objs[n].eval_docs for n in names}, lengths)


def _reseed_module_rngs() -> None:
    """Put RULER's module-level generators (``cwe_utils.RNG = random.Random(42)``) back to their
    import-time state, so a second load in one process makes the documents a fresh process makes."""
    import sys

    for name, mod in list(sys.modules.items()):
        if name.startswith("lm_eval.tasks.ruler") and isinstance(getattr(mod, "RNG", None), random.Random):
            mod.RNG.seed(42)


def samples(ts: TaskSet, limit: int | None, shard: int = 0, shards: int = 1) -> dict[str, list[int]]:
    """lm-eval ``samples=``: per lm-eval task, the first ``limit`` documents (of each RULER length),
    dealt round-robin over ``shards`` (so shards stay balanced across lengths)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: need 0 <= shard < shards")
    out: dict[str, list[int]] = {}
    for name, docs in ts.docs.items():
        if name in ts.lengths:
            by_len: dict[int, list[int]] = {}
            for i, d in enumerate(docs):
                if int(d["max_length"]) in ts.lengths[name]:
                    by_len.setdefault(int(d["max_length"]), []).append(i)
            picked = [idx[: len(idx) if limit is None else int(limit)] for _, idx in sorted(by_len.items())]
            out[name] = sorted(i for idx in picked for j, i in enumerate(idx) if j % shards == shard)
        else:
            n = len(docs) if limit is None else min(len(docs), int(limit))
            out[name] = [i for i in range(n) if i % shards == shard]
    return out


def doc_hashes(ts: TaskSet, picked: dict[str, list[int]]) -> dict[str, dict[str, str]]:
    """``{task@length: {doc_id: hash of the document's input and answer}}`` for the RULER documents picked."""
    out: dict[str, dict[str, str]] = {}
    for name in ts.lengths:
        docs = ts.docs[name]
        for i in picked.get(name, []):
            d = docs[i]
            h = hashlib.sha256((str(d["input"]) + "\0" + str(d["outputs"])).encode()).hexdigest()[:12]
            out.setdefault(f"{name}@{int(d['max_length'])}", {})[str(i)] = h
    return out
