"""Paired differences between cells kept in different forms: fork pieces (``fork_KofN.json``, as the
dev-split evidence folders keep them) and finished cell records (``cells/*.json``), through the same
pairing as ``sinkcache compare``'s report (``sinkcache.compare.report.paired``).

    python evals/dev_pair.py --parts evals/results/dev-split/vatp-span/fork_*of3.json \\
        --cells /work/exp/dev-wshrink/cells/*.json \\
        --pair sink-evict-vatp-w32_b25:sink-evict-vatp-wshrink_b25 --out evals/results/dev-split/vatp-wshrink/pairs.json

Each ``--pair A:B`` prints ``B - A`` for the suite score (higher is better) and bits/byte (lower is better).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkcache.compare.plan import ACCURACY_METRICS
from sinkcache.compare.report import fmt_diff, paired
from sinkcache.compare.samples import merge_docs


def records(parts: list[str], cells: list[str]) -> dict[str, dict]:
    """Cell id -> a record with ``cell_id`` and merged per-document ``docs``."""
    out: dict[str, dict] = {}
    pieces: dict[str, list[dict]] = {}
    for f in parts:
        for cid, part in json.loads(Path(f).read_text())["parts"].items():
            pieces.setdefault(cid, []).append(part["docs"])
    for cid, docs in pieces.items():
        out[cid] = {"cell_id": cid, "docs": merge_docs(docs)}
    for f in cells:
        rec = json.loads(Path(f).read_text())
        out[rec["cell_id"]] = {"cell_id": rec["cell_id"], "docs": rec["docs"]}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="*", default=[])
    ap.add_argument("--cells", nargs="*", default=[])
    ap.add_argument("--pair", action="append", required=True, help="A:B (prints B - A)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    recs = records(a.parts, a.cells)
    tasks = list(ACCURACY_METRICS)
    res = []
    for spec in a.pair:
        x, y = spec.split(":")
        missing = [c for c in (x, y) if c not in recs]
        if missing:
            raise SystemExit(f"--pair {spec}: no cell {', '.join(missing)}; have: {', '.join(sorted(recs))}")
        p = paired(recs[x], recs[y], [t for t in tasks if t in recs[x]["docs"] and t in recs[y]["docs"]])
        res.append(p)
        n = sum((p.get("n_docs") or {}).values())
        print(f"{y} - {x}: suite {fmt_diff(p.get('suite'))} ({n} docs), bits/byte {fmt_diff(p.get('bits_per_byte'), 4)}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
