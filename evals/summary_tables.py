"""README's comparison tables, printed from committed ``sinkcache compare`` results (never typed by hand).

    python evals/summary_tables.py evals/results/smollm2-135m evals/results/gemma3-270m

For each model folder (its ``results.json``) it prints, in markdown:

* **sinks**: each sink-aware cell against the same cache without sinks (``ours - baseline``), paired over
  the documents both scored: suite score and bits/byte, or the RULER score for RULER cells;
* **cost**: each cell against the full cache (``cell - full``), the price of the compression.

A pair whose cells are missing in a folder prints a dash, so the table says what was not run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: (row label, ours, baseline) of the sink table; ``{b}`` is the eviction budget.
SINK_ROWS = [
    ("int4", "sink-quant_4bit", "kivi_4bit"),
    ("int2", "sink-quant_2bit", "kivi_2bit"),
    ("int2, RULER", "sink-quant_2bit_ruler", "kivi_2bit_ruler"),
    *[(f"evict {b}% (tova-pooled): sinks vs none", f"sink-evict-tova-pooled_b{b}", f"nosink-evict-tova-pooled_b{b}") for b in ("50", "25", "12.5")],
    *[(f"evict {b}%: sink-evict (tova-pooled) vs recent window", f"sink-evict-tova-pooled_b{b}", f"recent-evict_b{b}") for b in ("50", "25", "12.5")],
    *[(f"evict {b}%: sink-evict (key norm) vs recent window", f"sink-evict_b{b}", f"recent-evict_b{b}") for b in ("50", "25", "12.5")],
    ("evict 25%, RULER: sink-evict (key norm) vs recent window", "sink-evict_b25_ruler", "recent-evict_b25_ruler"),
    ("hybrid int4 + 25%", "sink-hybrid_4bit_b25", "nosink-hybrid_4bit_b25"),
]


def _sign(x: float, nd: int) -> str:
    return f"{x:+.{nd}f}".replace("-", "−")


def diff(iv: dict[str, Any] | None, nd: int = 3) -> str:
    """``+0.028 [+0.005, +0.053] **win**``; ``(tie)`` when the interval spans 0; a dash when absent."""
    if not iv:
        return "—"
    s = f"{_sign(iv['mean'], nd)} [{_sign(iv['low'], nd)}, {_sign(iv['high'], nd)}]"
    return f"**{s} {iv['verdict']}**" if iv["verdict"] in ("win", "loss") else f"{s} (tie)"


def _bpb_digits(iv: dict[str, Any] | None) -> int:
    return 3 if iv and abs(iv["mean"]) >= 0.01 else 4


def load(folder: str | Path) -> dict[str, Any]:
    data = json.loads((Path(folder) / "results.json").read_text())
    pairs = {(c["ours"], c["other"]): c for c in data["analysis"]["comparisons"] + data["analysis"].get("against_full", [])}
    cells = {c["cell_id"]: c for c in data["cells"]}
    return {"model": data["model"], "pairs": pairs, "cells": cells, "intervals": data["analysis"]["intervals"]}


def _pair_cell(res: dict[str, Any], ours: str, other: str) -> str:
    c = res["pairs"].get((ours, other))
    if c is None:
        return "— | —"
    kv = f"{100 * c['kv_ratio_ours']:.1f} / {100 * c['kv_ratio_other']:.1f}"
    if ours.endswith("_ruler"):
        n = sum(c.get("n_ruler_docs", {}).values())
        return f"{kv} | {diff(c.get('ruler'))} RULER (n={n})"
    n = sum(c.get("n_docs", {}).values())
    bpb = c.get("bits_per_byte")
    return f"{kv} | {diff(c.get('suite'))} (n={n}); {diff(bpb, _bpb_digits(bpb))} bits/byte"


def sink_table(results: list[dict[str, Any]]) -> str:
    head = "| setting | " + " | ".join(f"{r['model']}: KV % ours / no-sink | {r['model']}: Δ score [95% CI]; Δ bits/byte" for r in results) + " |"
    rows = [head, "|---|" + "---|---|" * len(results)]
    for label, ours, other in SINK_ROWS:
        if all((ours, other) not in r["pairs"] for r in results):
            continue
        rows.append(f"| {label} | " + " | ".join(_pair_cell(r, ours, other) for r in results) + " |")
    return "\n".join(rows)


def cost_table(results: list[dict[str, Any]], cells: list[str] | None = None) -> str:
    """``cells``: the cell ids to show, in this order (default: every cell paired with full)."""
    ids: list[str] = list(cells or [])
    if not ids:
        for r in results:
            ids += [k[0] for k in r["pairs"] if k[1] in ("full", "full_ruler") and k[0] not in ids]
    head = "| cell | " + " | ".join(f"{r['model']}: KV % | {r['model']}: Δ vs full [95% CI]; Δ bits/byte" for r in results) + " |"
    rows = [head, "|---|" + "---|---|" * len(results)]
    for cid in ids:
        cols = []
        for r in results:
            full = "full_ruler" if cid.endswith("_ruler") else "full"
            cols.append(_pair_cell(r, cid, full).replace(" / 100.0", ""))
        rows.append(f"| {cid} | " + " | ".join(cols) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="sinkcache compare output folders (each with results.json)")
    ap.add_argument("--table", choices=("sinks", "cost", "both"), default="both")
    ap.add_argument("--cost-cells", default="", help="comma-separated cell ids of the cost table (default: all)")
    args = ap.parse_args(argv)
    results = [load(f) for f in args.folders]
    if args.table in ("sinks", "both"):
        print(sink_table(results) + "\n")
    if args.table in ("cost", "both"):
        print(cost_table(results, [c for c in args.cost_cells.split(",") if c]))


if __name__ == "__main__":
    main()
