"""Tables and plot of a ``sinkcache compare`` sweep: ``results.md``, ``results.json``,
``accuracy_vs_kv_memory.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plan import ACCURACY_METRICS, POLICIES

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


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table: one row per cell."""
    head = (
        "| group | policy | setting (nominal) | KV % of full (measured) | mean KV MiB / full | suite score | "
        + " | ".join(_SHORT[t] for t in ACCURACY_METRICS)
        + " | ppl bits/byte | wall s | peak RSS MiB |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for r in records:
        s = r["summary"]
        rss = r.get("peak_rss_bytes") or 0
        worker = r.get("peer_worker_peak_rss_bytes")
        rss_txt = f"{rss / 2**20:.0f}" + (f" + {worker / 2**20:.0f} (kvpress venv)" if worker else "")
        per = [_f(s["per_task"].get(t), 2) if t in s["per_task"] else "—" for t in ACCURACY_METRICS]
        rows.append(
            f"| {r['group']} | {r['cell']['policy']} | {r['setting']} | {_f(100 * s['kv_ratio'] if s.get('kv_ratio') is not None else None, 1)} | "
            f"{_mib(s.get('mean_kv_bytes'))} / {_mib(s.get('mean_full_kv_bytes'))} | {_f(s.get('suite_score'))} | "
            + " | ".join(per)
            + f" | {_f(s.get('bits_per_byte'))} | {r['time_s']['wall']:.0f} | {rss_txt} |"
        )
    return "\n".join(rows)


def markdown(model: str, records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    desc = "\n".join(f"| `{p}` | {g} | {d} |" for p, (g, _k, d) in POLICIES.items() if any(r["cell"]["policy"] == p for r in records))
    lines = [
        f"# `sinkcache compare` — {model}",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Offline suite (`sinkcache_suite`), `--limit {meta.get('limit')}` documents per task, seed {meta.get('seed')}, "
        f"CPU, 1 thread per cell, fp32 model (so the full KV cache is fp32). Cells finished: {len(records)}"
        + (f" of {meta['planned']}" if meta.get("planned") else "")
        + ".",
        "",
        "* **setting**: eviction-type policies keep a fraction of *each request's* tokens (budget = that fraction "
        "of the prefilled context, or of the whole text for perplexity; kvpress `compression_ratio` = 1 - fraction); "
        "quantizers use the bit width.",
        "* **KV % of full (measured)**: mean over requests of bytes held (`memory_bytes()` for sinkcache; the real "
        "tensors for the peers: quanto/HQQ packed data + scales + residual fp window, kvpress's DynamicCache) "
        "divided by what an uncompressed cache holds for the same tokens, measured after each request "
        "(including the scored continuation / generated tokens).",
        "* **suite score**: mean of the six accuracy tasks (exact match; `acc` for facts). **ppl**: docstring "
        "streaming perplexity in bits/byte (lower is better; kvpress presses compress only at prefill, so they "
        "have no streaming-perplexity number).",
        "* **peak RSS**: the cell's process (model + lm-eval + cache); for kvpress, plus its worker process in the "
        "kvpress virtualenv (which holds a second copy of the model).",
        "",
        table(records),
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

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_policy.setdefault(r["cell"]["policy"], []).append(r)
    styles = {"ours": ("-", "o", 2.4), "baseline": ("--", "s", 1.4), "peer": (":", "^", 1.4), "reference": ("", "*", 1)}
    full = by_policy.pop("full", [])
    for policy, rs in by_policy.items():
        group = POLICIES[policy][0]
        ls, mk, lw = styles[group]
        pts = sorted((100 * r["summary"]["kv_ratio"], r["summary"].get("suite_score"), r["summary"].get("bits_per_byte")) for r in rs)
        xs = [p[0] for p in pts if p[1] is not None]
        ys = [p[1] for p in pts if p[1] is not None]
        (line,) = ax1.plot(xs, ys, linestyle=ls, marker=mk, linewidth=lw, label=f"{policy} ({group})")
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
    ax1.legend(fontsize=7, loc="best")
    ax2.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: str | Path, model: str, records: list[dict[str, Any]], meta: dict[str, Any], *, with_plot: bool = True) -> None:
    """Rewrite results.json, results.md and the plot from ``records``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("scores",)} | {"scores": r.get("scores", {})} for r in records]
    (out / "results.json").write_text(json.dumps({"model": model, "meta": meta, "cells": slim}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(model, records, meta))
    if with_plot and records:
        plot(model, records, out / "accuracy_vs_kv_memory.png")
