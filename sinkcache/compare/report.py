"""Tables and plot of a ``sinkcache compare`` sweep: ``results.md``, ``results.json``,
``accuracy_vs_kv_memory.png``, with intervals from per-document scores.

* **Cell intervals**: the suite score (mean of the accuracy tasks' means) with a 95% bootstrap
  interval over documents (resampled within each task), each task's accuracy likewise, and
  streaming bits/byte (a ratio of sums, resampled by document).
* **Pairs at matched memory**: each of ours against its no-sink baseline and against every peer
  at the same nominal setting (bit width, or budget as a share of each request's KV): the paired
  difference ``ours - other`` over the documents both scored, with its interval. A difference is a
  win or a loss only when its interval excludes zero (:func:`~sinkcache.compare.stats.verdict`).

Tasks on which the full cache scores at chance stay in the per-task tables but are left out of the
suite score's intervals and differences (a compressed cache cannot lose what the model never had).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .plan import ACCURACY_METRICS, POLICIES, PPL_TASK, RULER_TASKS, ruler_parts, ruler_split
from .stats import Interval, ratio_of_sums, stratified_mean, verdict

#: ours -> its no-sink (or no-protection) baseline in the same family.
_EVICT_OURS = (
    "sink-evict", "sink-evict-tova", "sink-evict-tova-w32", "sink-evict-tova-pooled", "sink-evict-snapkv", "sink-evict-h2o",
    "sink-evict-tova-pooled-w32", "sink-evict-vatp-w32", "sink-evict-tova-span-w32", "sink-evict-vatp-wshrink",
)
BASELINE_OF = {
    **{p: "recent-evict" for p in _EVICT_OURS}, "sink-quant": "kivi", "sink-quant-first": "kivi", "sink-quant-refine": "kivi", "sink-quant-auto-refine": "kivi", "sink-hybrid": "nosink-hybrid",
}
#: ours -> the same cache without sinks, a second baseline where the first (``BASELINE_OF``) also
#: differs in more than the sinks (the recent window has no scorer either).
SINK_ABLATION_OF = {
    "sink-evict-tova-pooled": "nosink-evict-tova-pooled",
    # a window-only cache with and without its first 4 tokens: the sinks' effect with no scorer at all
    "streamingllm": "recent-evict",
}
#: Bits/byte differences wholly inside +-this are ties whatever their interval says: the smallest
#: difference anyone would act on is orders of magnitude larger, while two cells that keep the same
#: tokens still differ by float rounding (~1e-7 bits/byte; gemma3's pooled vs per-head TOVA).
PPL_NEGLIGIBLE_BITS = 1e-4

_EVICT_PEERS = ("streamingllm", "kvpress-streaming_llm", "kvpress-snapkv", "kvpress-knorm", "kvpress-tova", "kvpress-expected_attention")
#: ours -> the peers it is compared with at the same nominal setting (the attention-scored evictions
#: are also compared with the key-norm one).
PEERS_OF = {
    "sink-evict": _EVICT_PEERS,
    **{p: ("sink-evict", *_EVICT_PEERS) for p in _EVICT_OURS[1:]},
    # variants of the TOVA cell are also compared with the default one
    **{p: ("sink-evict-tova", "sink-evict", *_EVICT_PEERS) for p in ("sink-evict-tova-w32", "sink-evict-tova-pooled")},
    # the default with a smaller window against the default it changes
    "sink-evict-tova-pooled-w32": ("sink-evict-tova-pooled", "sink-evict-tova-w32", "sink-evict", *_EVICT_PEERS),
    # candidate scorers against the cache they change (same window) and the default
    **{p: ("sink-evict-tova-pooled-w32", "sink-evict-tova-pooled", *_EVICT_PEERS) for p in ("sink-evict-vatp-w32", "sink-evict-tova-span-w32")},
    # the shrinking window against the same scorer with the fixed 32-token window
    "sink-evict-vatp-wshrink": ("sink-evict-vatp-w32", "sink-evict-tova-pooled-w32", *_EVICT_PEERS),
    "sink-quant": ("hf-quanto", "hf-hqq"),
    "sink-quant-first": ("sink-quant", "hf-quanto", "hf-hqq"),
    "sink-quant-refine": ("sink-quant", "hf-quanto", "hf-hqq"),
    "sink-quant-auto-refine": ("sink-quant", "sink-quant-refine", "hf-quanto", "hf-hqq"),
}


def _setting(rec: dict[str, Any]) -> tuple:
    """What a pair must share: the memory setting and the task set (suite or RULER)."""
    c = rec["cell"]
    return (c.get("bits"), c.get("budget"), any(ruler_split(t) for t in c.get("tasks", ())))


def _acc_docs(rec: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    return {t: rec.get("docs", {}).get(t, {}) for t in tasks if rec.get("docs", {}).get(t)}


def _ruler_only(rec: dict[str, Any]) -> bool:
    tasks = rec["cell"].get("tasks", ())
    return bool(tasks) and all(ruler_split(t) for t in tasks)


def ruler_tasks(records: list[dict[str, Any]]) -> list[str]:
    """The RULER tasks (``task@length``) any cell scored, variant by variant, length by length."""
    found = {t for r in records for t in r.get("docs", {}) if ruler_split(t)}
    return sorted(found, key=lambda t: (RULER_TASKS.index(ruler_parts(t)[0]), ruler_parts(t)[1]))


def informative_tasks(records: list[dict[str, Any]], *, chance: float = 0.0, ruler: bool = False) -> list[str]:
    """Accuracy tasks (suite, or RULER with ``ruler=True``) the full cache scores above ``chance``
    on (all tasks if there is no full cell)."""
    tasks = ruler_tasks(records) if ruler else list(ACCURACY_METRICS)
    full = next((r for r in records if r["cell"]["policy"] == "full" and any(t in r.get("docs", {}) for t in tasks)), None)
    if full is None:
        return tasks
    out = []
    for t in tasks:
        vals = list(full.get("docs", {}).get(t, {}).values())
        if vals and sum(vals) / len(vals) > chance:
            out.append(t)
    return out


def cell_intervals(rec: dict[str, Any], tasks: list[str], *, iters: int = 2000, ruler: list[str] | None = None) -> dict[str, Any]:
    """``{"suite": Interval, "ruler": Interval, "per_task": {task: Interval}, "bits_per_byte": Interval}``
    (dicts); ``tasks``: the suite tasks in the suite score, ``ruler``: the RULER tasks in the RULER score."""
    out: dict[str, Any] = {"per_task": {}}
    for name, ts in (("suite", tasks), ("ruler", ruler or [])):
        docs = _acc_docs(rec, ts)
        if sum(len(v) for v in docs.values()) >= 2:
            out[name] = stratified_mean({t: list(v.values()) for t, v in docs.items()}, iters=iters).to_dict()
    for t, v in _acc_docs(rec, [*tasks, *(ruler or [])]).items():
        if len(v) >= 2:
            out["per_task"][t] = stratified_mean({t: list(v.values())}, iters=iters).to_dict()
    ppl = rec.get("docs", {}).get(PPL_TASK) or {}
    if len(ppl) >= 2:
        pairs = list(ppl.values())
        out["bits_per_byte"] = ratio_of_sums([-p[0] / math.log(2) for p in pairs], [p[1] for p in pairs], iters=iters).to_dict()
    return out


def shared_docs(a: dict[str, Any], b: dict[str, Any], task: str) -> list[str]:
    """Document ids both cells scored on ``task`` and that are the same document in both (RULER's
    generated documents carry a hash of their input; a mismatch is left out of the pair)."""
    ids = set(a.get("docs", {}).get(task, {})) & set(b.get("docs", {}).get(task, {}))
    ha, hb = (a.get("doc_hash") or {}).get(task), (b.get("doc_hash") or {}).get(task)
    if ha is not None or hb is not None:
        ids = {i for i in ids if (ha or {}).get(i) is not None and (ha or {}).get(i) == (hb or {}).get(i)}
    return sorted(ids, key=int)


def paired(a: dict[str, Any], b: dict[str, Any], tasks: list[str], *, iters: int = 2000, ruler: list[str] | None = None) -> dict[str, Any]:
    """``b - a`` over shared documents: suite score and RULER score (higher is better), bits/byte
    (lower is better)."""
    out: dict[str, Any] = {"a": a["cell_id"], "b": b["cell_id"]}
    for name, ts in (("suite", tasks), ("ruler", ruler or [])):
        diffs: dict[str, list[float]] = {}
        for t in ts:
            shared = shared_docs(a, b, t)
            if shared:
                diffs[t] = [b["docs"][t][i] - a["docs"][t][i] for i in shared]
        if sum(len(v) for v in diffs.values()) >= 2:
            iv = stratified_mean(diffs, iters=iters)
            out[name] = iv.to_dict() | {"verdict": verdict(iv, higher_is_better=True)}
            out["n_docs" if name == "suite" else "n_ruler_docs"] = {t: len(v) for t, v in diffs.items()}
    pa, pb = a.get("docs", {}).get(PPL_TASK) or {}, b.get("docs", {}).get(PPL_TASK) or {}
    shared = sorted(set(pa) & set(pb), key=int)
    if len(shared) >= 2:
        num = [(-pb[i][0] + pa[i][0]) / math.log(2) for i in shared]
        iv = ratio_of_sums(num, [pa[i][1] for i in shared], iters=iters)
        out["bits_per_byte"] = iv.to_dict() | {"verdict": verdict(iv, higher_is_better=False, negligible=PPL_NEGLIGIBLE_BITS)}
    return out


def comparisons(records: list[dict[str, Any]], *, iters: int = 2000) -> list[dict[str, Any]]:
    """Every (ours, baseline) and (ours, peer) pair at the same nominal setting, as ``ours - other``."""
    tasks = informative_tasks(records)
    ruler = informative_tasks(records, ruler=True)
    by = {(r["cell"]["policy"], _setting(r)): r for r in records}
    out = []
    for r in records:
        pol = r["cell"]["policy"]
        ours = POLICIES.get(pol, ("",))[0] == "ours"
        if not ours and pol not in SINK_ABLATION_OF:
            continue
        others = [("baseline", BASELINE_OF[pol])] if pol in BASELINE_OF else []
        others += [("baseline", SINK_ABLATION_OF[pol])] if pol in SINK_ABLATION_OF else []
        if ours:
            others += [("ours" if POLICIES.get(p, ("",))[0] == "ours" else "peer", p) for p in PEERS_OF.get(pol, ())]
        for kind, other in others:
            o = by.get((other, _setting(r)))
            if o is None:
                continue
            d = paired(o, r, tasks, iters=iters, ruler=ruler)
            d.update(kind=kind, ours=r["cell_id"], other=o["cell_id"], setting=r["setting"],
                     kv_ratio_ours=r["summary"].get("kv_ratio"), kv_ratio_other=o["summary"].get("kv_ratio"))
            out.append(d)
    return out


def against_full(records: list[dict[str, Any]], *, iters: int = 2000) -> list[dict[str, Any]]:
    """What each compressed cell costs: ``cell - full`` over shared documents, suite cells against the
    suite's full cell and RULER cells against the RULER full cell (kind ``"reference"``)."""
    tasks = informative_tasks(records)
    ruler = informative_tasks(records, ruler=True)
    fulls = {_ruler_only(r): r for r in records if r["cell"]["policy"] == "full" and r.get("docs")}
    out = []
    for r in records:
        f = fulls.get(_ruler_only(r))
        if f is None or r is f or not r.get("docs"):
            continue
        d = paired(f, r, tasks, iters=iters, ruler=ruler)
        d.update(kind="reference", ours=r["cell_id"], other=f["cell_id"], setting=r["setting"],
                 kv_ratio_ours=r["summary"].get("kv_ratio"), kv_ratio_other=f["summary"].get("kv_ratio"))
        out.append(d)
    return out


def fmt(iv: dict[str, Any] | Interval | None, nd: int = 3) -> str:
    """``0.412 [0.371, 0.455]``, or a dash."""
    if iv is None:
        return "—"
    d = iv.to_dict() if isinstance(iv, Interval) else iv
    return f"{d['mean']:.{nd}f} [{d['low']:.{nd}f}, {d['high']:.{nd}f}]"


def fmt_diff(iv: dict[str, Any] | None, nd: int = 3) -> str:
    if iv is None:
        return "—"
    mark = {"win": " **win**", "loss": " **loss**", "tie": ""}.get(iv.get("verdict", "tie"), "")
    return f"{iv['mean']:+.{nd}f} [{iv['low']:+.{nd}f}, {iv['high']:+.{nd}f}]{mark}"


_SHORT = {
    "sinkcache_passkey": "passkey",
    "sinkcache_niah_multikey": "niah",
    "sinkcache_kv_retrieval": "kv",
    "sinkcache_variable_tracking": "vt",
    "sinkcache_arithmetic_cot": "arith",
    "sinkcache_facts_mc": "facts",
}


def _f(v: Any, nd: int = 3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _mib(n: Any) -> str:
    return "—" if not n else f"{n / 2**20:.2f}"


def table(records: list[dict[str, Any]], intervals: dict[str, dict[str, Any]] | None = None) -> str:
    """The markdown table: one row per cell, with 95% intervals where per-document scores exist."""
    intervals = intervals or {}
    head = (
        "| group | policy | setting (nominal) | KV % of full (measured) | KV % attended (ppl) | mean KV MiB / full | "
        "suite score [95% CI] | "
        + " | ".join(_SHORT[t] for t in ACCURACY_METRICS)
        + " | ppl bits/byte [95% CI] | docs/task | wall s | peak RSS MiB |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for r in records:
        s = r["summary"]
        iv = intervals.get(r["cell_id"], {})
        rss = r.get("peak_rss_bytes") or 0
        worker = r.get("peer_worker_peak_rss_bytes")
        rss_txt = f"{rss / 2**20:.0f}" + (f" + {worker / 2**20:.0f} (kvpress venv)" if worker else "")
        per = [_f(s["per_task"].get(t), 2) if t in s["per_task"] else "—" for t in ACCURACY_METRICS]
        suite = fmt(iv["suite"]) if iv.get("suite") else _f(s.get("suite_score"))
        ppl = fmt(iv["bits_per_byte"]) if iv.get("bits_per_byte") else _f(s.get("bits_per_byte"))
        n_docs = sorted(set((r.get("n_docs") or {}).values()))
        att = s.get("ppl_attended_kv_ratio")
        rows.append(
            f"| {r['group']} | {r['cell']['policy']} | {r['setting']} | {_f(100 * s['kv_ratio'] if s.get('kv_ratio') is not None else None, 1)} | "
            f"{_f(100 * att if att is not None else None, 1)} | "
            f"{_mib(s.get('mean_kv_bytes'))} / {_mib(s.get('mean_full_kv_bytes'))} | {suite} | "
            + " | ".join(per)
            + f" | {ppl} | {'–'.join(map(str, n_docs)) or '?'} | {r['time_s']['wall']:.0f} | {rss_txt} |"
        )
    return "\n".join(rows)


def pairs_table(comps: list[dict[str, Any]], *, matched: bool = True) -> str:
    """Paired differences ``ours - other`` at the same nominal setting (a RULER column when any pair has one).
    ``matched=False``: the pairs differ in memory by design (cells against the full cache), so unequal
    bytes are not flagged."""
    with_ruler = any(d.get("ruler") for d in comps)
    rows = [
        "| ours | vs | kind | setting | KV % ours / other | Δ suite score [95% CI] | Δ bits/byte [95% CI] (lower is better) | docs |"
        + (" Δ RULER score [95% CI] | RULER docs |" if with_ruler else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_ruler else ""),
    ]
    for d in comps:
        kv = f"{_f(100 * (d.get('kv_ratio_ours') or 0), 1)} / {_f(100 * (d.get('kv_ratio_other') or 0), 1)}"
        if matched and d.get("kv_ratio_ours") and d.get("kv_ratio_other") and abs(d["kv_ratio_ours"] / d["kv_ratio_other"] - 1) > 0.10:
            # same nominal setting, different measured bytes: say so where the verdict is read
            kv += f" (**not matched**: ours {d['kv_ratio_ours'] / d['kv_ratio_other']:.2f}x)"
        n = sum((d.get("n_docs") or {}).values())
        row = (
            f"| {d['ours']} | {d['other']} | {d['kind']} | {d['setting']} | {kv} | {fmt_diff(d.get('suite'))} | "
            f"{fmt_diff(d.get('bits_per_byte'), 4)} | {n} |"
        )
        if with_ruler:
            row += f" {fmt_diff(d.get('ruler'))} | {sum((d.get('n_ruler_docs') or {}).values()) or '—'} |"
        rows.append(row)
    return "\n".join(rows)


def _ruler_short(task: str) -> str:
    base, n = ruler_parts(task)
    return f"{base.removeprefix('ruler_')}@{n // 1024}k" if n % 1024 == 0 else f"{base.removeprefix('ruler_')}@{n}"


def ruler_table(records: list[dict[str, Any]], analysis: dict[str, Any]) -> str:
    """One row per cell that ran RULER: its RULER score with interval and each task@length's accuracy."""
    tasks = ruler_tasks(records)
    excluded = set(analysis.get("excluded_ruler_tasks") or [])
    head = (
        "| group | policy | setting | KV % of full (RULER requests) | RULER score [95% CI] | "
        + " | ".join(_ruler_short(t) + (" (excl.)" if t in excluded else "") for t in tasks)
        + " | docs/task |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        docs = r.get("docs", {})
        if not any(t in docs for t in tasks):
            continue
        iv = (analysis.get("intervals") or {}).get(r["cell_id"], {})
        per = [_f(sum(docs[t].values()) / len(docs[t]), 2) if docs.get(t) else "—" for t in tasks]
        mem = (r.get("memory") or {}).get("per_task") or {}
        bases = {ruler_parts(t)[0] for t in tasks if t in docs}
        held = sum(mem[b].get("mean_memory_bytes") or 0 for b in bases if b in mem)
        dense = sum(mem[b].get("mean_dense_bytes") or 0 for b in bases if b in mem)
        n = sorted({len(docs[t]) for t in tasks if t in docs})
        rows.append(
            f"| {r['group']} | {r['cell']['policy']} | {r['setting']} | {_f(100 * held / dense if dense else None, 1)} | "
            f"{fmt(iv.get('ruler'))} | " + " | ".join(per) + f" | {'–'.join(map(str, n))} |"
        )
    return "\n".join(rows)


def analyse(records: list[dict[str, Any]], *, iters: int = 2000) -> dict[str, Any]:
    """Intervals per cell and the paired comparisons (what results.md/json report)."""
    tasks = informative_tasks(records)
    ruler = informative_tasks(records, ruler=True)
    return {
        "suite_tasks": tasks,
        # tasks that ran but on which the full cache scored 0 (tasks that did not run are just absent)
        "excluded_tasks": [t for t in ACCURACY_METRICS if t not in tasks and any(r.get("docs", {}).get(t) for r in records)],
        "ruler_tasks": ruler,
        "excluded_ruler_tasks": [t for t in ruler_tasks(records) if t not in ruler],
        "intervals": {r["cell_id"]: cell_intervals(r, tasks, iters=iters, ruler=ruler) for r in records if r.get("docs")},
        "comparisons": comparisons([r for r in records if r.get("docs")], iters=iters),
        "against_full": against_full(records, iters=iters),
        "bootstrap": {"iters": iters, "level": 0.95, "seed": 0, "resampled": "documents, within each task"},
    }


def provenance(records: list[dict[str, Any]]) -> str:
    """Which documents-per-task limits, code fingerprints and devices/dtypes the cells ran at, with cell counts."""
    def count(key: Any, missing: str = "all") -> str:
        n: dict[Any, int] = {}
        for r in records:
            k = key(r)
            n[k] = n.get(k, 0) + 1
        return ", ".join(f"{k if k is not None else missing} ({v} cell{'s' if v != 1 else ''})" for k, v in n.items())

    def where(r: dict[str, Any]) -> str | None:
        # read back from the model each cell ran (older cells did not record it)
        p = r.get("placement") or {}
        return f"{p['device']} {p['dtype']}" if p.get("device") and p.get("dtype") else None

    text = (
        f"Documents per task: {count(lambda r: r.get('limit'))}; code fingerprint: {count(lambda r: r.get('code'))}; "
        f"ran on: {count(where, 'not recorded')}."
    )
    if len({r.get("limit") for r in records}) > 1:
        text += " Cells at different limits are paired over the documents both scored (the first documents of each task)."
    return text


def fork_sentence(fork: dict[str, Any]) -> str:
    """How the in-package cells ran; the wall time only where the pieces ran all at once."""
    one = fork["members"] == 1
    head = (
        (f"The {fork['members']} in-package cells" if not one else "The in-package cell")
        + (f" at {fork['limit']} documents per task" if fork.get("limit") else "")
        + (" ran from one shared prefill per request (`ForkLM`; identical " if not one else " ran through `ForkLM` (identical ")
        + f"per-document scores to separate runs, `tests/test_fork.py`), documents dealt over {fork['shards']} pieces"
    )
    jobs = fork.get("jobs", fork["shards"])
    prefill = f"{fork['prefills']} shared prefills, {fork['shared_prefill_s'] / 60:.1f} CPU-min of them"
    if fork["shards"] <= jobs:
        return head + f" run at once: **grid wall time {fork['group_wall_s'] / 60:.1f} min** ({prefill})."
    total = sum(fork.get("shard_wall_s") or [fork["group_wall_s"]])
    return head + (
        f", {jobs} at a time (resumable): **{total / 60:.0f} process-min in all**, about {total / 60 / jobs:.0f} min "
        f"of wall time at {jobs} processes ({prefill})."
    )


def markdown(model: str, records: list[dict[str, Any]], meta: dict[str, Any], analysis: dict[str, Any] | None = None) -> str:
    analysis = analysis or analyse(records)
    desc = "\n".join(f"| `{p}` | {g} | {d} |" for p, (g, _k, d) in POLICIES.items() if any(r["cell"]["policy"] == p for r in records))
    excluded = analysis.get("excluded_tasks") or []
    groups: dict[tuple, dict[str, Any]] = {}  # one entry per fork group (same sweep, same shards)
    for r in records:
        if r.get("fork"):
            f = r["fork"]
            groups.setdefault((f["members"], f["shards"], f["group_wall_s"], f["prefills"], r.get("limit")), f | {"limit": r.get("limit")})
    runs = meta.get("runs") or ([meta] if meta.get("command") else [])
    lines = [f"# `sinkcache compare` — {model}", ""]
    lines += ["Commands (every cell below was made by one of them):", ""] if len(runs) > 1 else []
    lines += [f"{'* ' if len(runs) > 1 else 'Command: '}`{r.get('command', '')}`" for r in runs] + [""]
    lines += [
        f"Offline suite (`sinkcache_suite`), seed {meta.get('seed')}, CPU, 1 thread per process, fp32 model (so the "
        f"full KV cache is fp32). Cells reported: {len(records)}. {provenance(records)}",
        "",
    ]
    lines += [x for f in groups.values() for x in (fork_sentence(f), "")]
    lines += [
        "* **setting**: eviction-type policies keep a fraction of *each request's* tokens (budget = that fraction "
        "of the prefilled context, or of the whole text for perplexity; kvpress `compression_ratio` = 1 - fraction); "
        "quantizers use the bit width.",
        "* **KV % of full (measured)**: mean over requests of bytes held (`memory_bytes()` for sinkcache; the real "
        "tensors for the peers: quanto/HQQ packed data + scales + residual fp window, kvpress's DynamicCache) "
        "divided by what an uncompressed cache holds for the same tokens, measured after each request "
        "(including the scored continuation / generated tokens). **KV % attended (ppl)**: for streaming "
        "perplexity, the mean share of the full cache that a scored token attended (the end state understates it).",
        "* **suite score**: mean over the accuracy tasks of each task's accuracy (exact match; `acc` for facts), with a "
        "95% percentile-bootstrap interval over documents (resampled within each task, "
        f"{analysis['bootstrap']['iters']} resamples)"
        + (f"; left out of the score because the full cache scores 0 on them: {', '.join(_SHORT.get(t, t) for t in excluded)}" if excluded else "")
        + ". **ppl**: docstring streaming perplexity in bits/byte (lower is better; kvpress presses compress only at "
        "prefill, so they have no streaming-perplexity number).",
        "* **peak RSS**: the process (model + lm-eval + caches); for kvpress, plus its worker process in the "
        "kvpress virtualenv (which holds a second copy of the model).",
        "",
        table([r for r in records if not _ruler_only(r)], analysis.get("intervals")),
        "",
    ]
    if ruler_tasks(records):
        excl = analysis.get("excluded_ruler_tasks") or []
        lines += [
            "## lm-eval's RULER tasks (offline variants)",
            "",
            "Each RULER variant at each document length is its own task (`task@length`, lengths in tokens of the "
            "model's tokenizer), scored by lm-eval's string match; documents are generated by lm-eval with seeded "
            "generators and paired by a hash of their input. **RULER score**: mean over the task@lengths, 95% "
            "bootstrap interval over documents"
            + (f"; left out of the score because the full cache scores 0 on them: {', '.join(excl)}" if excl else "")
            + ".",
            "",
            ruler_table(records, analysis),
            "",
        ]
    lines += [
        "## Paired differences at matched settings",
        "",
        "`ours - other` over the documents both cells scored; **win**/**loss** only where the 95% interval excludes 0 "
        "(otherwise the difference is not resolved at this many documents); a bits/byte interval lying wholly within "
        f"+-{PPL_NEGLIGIBLE_BITS:g} is a tie (float rounding between caches that keep the same tokens). Pairs share the nominal setting; where "
        "the measured bytes differ by more than 10% the KV column says **not matched**, and the verdict is not one "
        "at equal memory.",
        "",
        pairs_table(analysis.get("comparisons") or []),
        "",
    ]
    if analysis.get("against_full"):
        lines += [
            "## What each cell costs against the full cache",
            "",
            "`cell - full` over the documents both scored (suite cells against `full`, RULER cells against "
            "`full_ruler`); a **loss** is a cost resolved at this many documents, a tie is a cost too small to "
            "resolve here (not proof of none).",
            "",
            pairs_table(analysis["against_full"], matched=False),
            "",
        ]
    lines += [
        "## Policies",
        "",
        "| policy | group | what |",
        "|---|---|---|",
        desc,
        "",
        "![accuracy vs KV memory](accuracy_vs_kv_memory.png)",
        "",
    ]
    return "\n".join(lines)


def plot(model: str, records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6.5))
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_policy.setdefault(r["cell"]["policy"], []).append(r)
    styles = {"ours": ("-", "o", 2.4), "baseline": ("--", "s", 1.4), "peer": (":", "^", 1.4), "reference": ("", "*", 1)}
    full = by_policy.pop("full", [])
    palette = [plt.get_cmap("tab20")(k) for k in range(20)]  # more policies than tab10's 10 colours
    for i, (policy, rs) in enumerate(by_policy.items()):
        group = POLICIES[policy][0]
        ls, mk, lw = styles[group]
        pts = sorted((100 * r["summary"]["kv_ratio"], r["summary"].get("suite_score"), r["summary"].get("bits_per_byte")) for r in rs)
        xs = [p[0] for p in pts if p[1] is not None]
        ys = [p[1] for p in pts if p[1] is not None]
        (line,) = ax1.plot(xs, ys, linestyle=ls, marker=mk, linewidth=lw, color=palette[(2 * i) % 20 + (i // 10) % 2], label=f"{policy} ({group})")
        px = [p[0] for p in pts if p[2] is not None]
        py = [p[2] for p in pts if p[2] is not None]
        if px:
            ax2.plot(px, py, linestyle=ls, marker=mk, linewidth=lw, color=line.get_color(), label=policy)
    for r in full:
        s = r["summary"]
        if s.get("suite_score") is not None:
            ax1.axhline(s["suite_score"], color="k", linewidth=0.8, alpha=0.6)
            ax1.plot([100], [s["suite_score"]], "k*", markersize=12, label="full cache")
        if s.get("bits_per_byte") is not None:
            ax2.axhline(s["bits_per_byte"], color="k", linewidth=0.8, alpha=0.6)
            ax2.plot([100], [s["bits_per_byte"]], "k*", markersize=12, label="full cache")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes, % of full cache (measured, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("suite score (mean accuracy of 6 tasks)")
    ax1.set_title(f"{model}: accuracy vs KV memory")
    ax2.set_ylabel("docstring perplexity, bits/byte (lower is better)")
    ax2.set_title("streaming perplexity vs KV memory")
    # One legend for both panels (same colours), below them: inside an axis it hid lines.
    handles, labels = ax1.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ncol = 5
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = -(-len(seen) // ncol)
    fig.tight_layout(rect=(0, min(0.4, 0.035 * rows + 0.02), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: str | Path, model: str, records: list[dict[str, Any]], meta: dict[str, Any], *, with_plot: bool = True) -> None:
    """Rewrite results.json, results.md and the plot from ``records``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(records)
    slim = [{k: v for k, v in r.items() if k not in ("scores",)} | {"scores": r.get("scores", {})} for r in records]
    (out / "results.json").write_text(json.dumps({"model": model, "meta": meta, "analysis": analysis, "cells": slim}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(model, records, meta, analysis))
    if with_plot and records:
        plot(model, records, out / "accuracy_vs_kv_memory.png")
