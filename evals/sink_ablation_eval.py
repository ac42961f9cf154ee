"""Sinks or not, through the lm-eval entry point: per-document bits per byte with paired intervals.

The comparison the old ``sinkcache compare`` could not make (its ``kivi`` baseline ran with a
first-token sink). Every config runs ``run_eval`` on the offline streaming-perplexity task
(``sinkcache_docstring_ppl``: 30 documents, chosen before any result was seen) with the same
quantizing cache except the sink selector, keeps per-document samples, and reports each config
against ``none`` as a paired bootstrap interval of per-document bits per byte (lower is better).
The selector that ran is read back from the built cache (``config.cache.sink_selector``).

    python evals/sink_ablation_eval.py smollm2-135m --out evals/results/sink_ablation/smollm2-135m

Resumable: a config whose JSON exists is not re-run (delete it to re-run).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TASK = "sinkcache_docstring_ppl"
CONFIGS = ("full", "none", "first", "auto", "first-refine")
#: ``first-refine``: the first-token sink + attention-ranked refinement of this share of each block
#: (docs/sinks.md section 5; the share chosen there on the calibration split, by bytes).
REFINE_SHARE = 0.14


def per_doc_bpb(report: dict) -> list[float]:
    """Bits per byte of each document, in lm-eval's document order."""
    samples = sorted(report["lm_eval"]["samples"][TASK], key=lambda s: s["doc_id"])
    out = []
    for s in samples:
        ll, n_bytes = s["bits_per_byte"]
        out.append(-float(ll) / (float(n_bytes) * math.log(2)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="documents (default: all 30)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from sinkcache.compare.stats import paired_difference, verdict
    from sinkcache.evaluation import run_eval

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in CONFIGS:
        path = args.out / f"{name}.json"
        if not path.exists():
            cache = (
                dict(policy="full")
                if name == "full"
                else dict(policy="quantize", bits=args.bits, window=args.window, group_size=args.group_size, sinks=name)
            )
            if name == "first-refine":
                cache.update(sinks="first", refine=REFINE_SHARE)
            run_eval(args.model, [TASK], limit=args.limit, output=path, log_samples=True, progress=False, **cache)
        reports[name] = json.loads(path.read_text())

    docs = {name: per_doc_bpb(r) for name, r in reports.items()}
    lines = [
        f"# Sinks through lm-eval: {args.model}, int{args.bits}, window {args.window}, group {args.group_size}",
        "",
        f"`python evals/sink_ablation_eval.py {args.model} --out {args.out}`; task `{TASK}`, "
        f"{len(docs['none'])} documents; bits per byte (lower is better); difference vs `none`: per-document "
        "paired bootstrap, 95% interval, 10,000 resamples.",
        "",
        "| config (built selector) | bits/byte (lm-eval) | mean per-doc bpb | vs none | verdict | KV held at end | KV attended per scored token |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for name, r in reports.items():
        built = r["config"]["cache"]
        mem = r["memory"]["per_task"][TASK]
        diff = paired_difference(docs["none"], docs[name]) if name != "none" else None
        row = {
            "built": built,
            "bits_per_byte": r["scores"][TASK]["bits_per_byte,none"],
            "per_doc_mean": sum(docs[name]) / len(docs[name]),
            "vs_none": diff.to_dict() if diff else None,
            "verdict_vs_none": verdict(diff, higher_is_better=False) if diff else None,
            "kv_ratio_end": mem["ratio_vs_full"],
            "kv_ratio_attended": mem.get("attended_ratio_vs_full"),
        }
        summary[name] = row
        sel = built.get("sink_selector") or "-"
        if built.get("refine"):
            sel += f" + refine {built['refine']['share']} ({built['refine']['score']})"
        att = row["kv_ratio_attended"]
        lines.append(
            f"| {name} ({sel}) | {row['bits_per_byte']:.4f} | {row['per_doc_mean']:.4f} | "
            f"{diff if diff else '-'} | {row['verdict_vs_none'] or '-'} | {100 * mem['ratio_vs_full']:.1f}% | "
            f"{'-' if att is None else f'{100 * att:.1f}%'} |"
        )
    lines += ["", "Against `first` (the default sink), same documents, paired:", ""]
    for name in ("auto", "first-refine"):
        if name in docs and "first" in docs:
            d = paired_difference(docs["first"], docs[name])
            summary[name]["vs_first"] = d.to_dict()
            gap = docs["none"], docs["full"]
            closed = (sum(gap[0]) - sum(docs[name])) / (sum(gap[0]) - sum(gap[1]))
            lines.append(
                f"* `{name}` - `first`: {d} bits/byte, {verdict(d, higher_is_better=False)}; "
                f"closes {100 * closed:.0f}% of the none -> full gap in mean per-document bits/byte."
            )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
