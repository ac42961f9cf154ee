"""Catch, tag, release over many texts: the analysis statistics with bootstrap intervals.

``sinkcache detect`` analyses one text. This runs the same analysis
(:func:`sinkcache.analysis.analyze`, every definition in that module's docstring) on ``--texts``
held-out chunks of ``--tokens`` tokens (:func:`sinkcache.calibration.token_chunks`, chosen by
position before any result) and reports, per statistic, the mean over texts with a 95% percentile
bootstrap interval (10,000 resamples of texts), plus paired sink-head vs non-sink-head contrasts of
the tag statistics (per text: sink heads' mean minus non-sink heads' mean).

    python evals/sink_analysis_eval.py smollm2-135m --out evals/results/sinks/analysis_smollm2-135m

Resumable: per-text summaries are kept in ``texts.jsonl`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: (label, path into analysis.summarize()'s dict)
STATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention on the first token", ("attention_share", "first")),
    ("attention on punctuation sinks", ("attention_share", "punctuation_sinks")),
    ("attention on newline sinks", ("attention_share", "newline_sinks")),
    ("attention on other sinks", ("attention_share", "other_sinks")),
    ("sink heads (share of heads)", ("_sink_head_share",)),
    ("punctuation tokens that are a sink in >= 1 head (share)", ("_punct_sink_share",)),
    ("newline tokens that are a sink in >= 1 head (share)", ("_newline_sink_share",)),
    ("tag, sink heads: top-PC variance share", ("tag", "sink_heads", "pc_share")),
    ("tag, non-sink heads: top-PC variance share", ("tag", "non_sink_heads", "pc_share")),
    ("tag, sink heads: |cos(top PC, W_o v_sink)|", ("tag", "sink_heads", "pc_cos")),
    ("tag, non-sink heads: |cos(top PC, W_o v_sink)|", ("tag", "non_sink_heads", "pc_cos")),
    ("tag, sink heads: |cos(mean output, W_o v_sink)|", ("tag", "sink_heads", "mean_cos")),
    ("tag, non-sink heads: |cos(mean output, W_o v_sink)|", ("tag", "non_sink_heads", "mean_cos")),
)
#: Paired contrasts: sink heads minus non-sink heads, per text.
CONTRASTS = ("pc_share", "pc_cos", "mean_cos")


def _get(d: dict, path: tuple[str, ...]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return None if d is None else float(d)


def per_text(summary: dict[str, Any]) -> dict[str, Any]:
    """The scalars this script aggregates, from one text's ``analysis.summarize`` dict."""
    s = dict(summary)
    s["_sink_head_share"] = summary["sink_heads"] / summary["heads"] if summary["heads"] else None
    for cls in ("punctuation", "newline"):
        c = summary["classes"].get(cls, {})
        s[f"_{'punct' if cls == 'punctuation' else cls}_sink_share"] = (c["sink_any"] / c["count"]) if c.get("count") else None
    out = {label: _get(s, path) for label, path in STATS}
    for k in CONTRASTS:
        a, b = _get(s, ("tag", "sink_heads", k)), _get(s, ("tag", "non_sink_heads", k))
        out[f"contrast {k}"] = None if a is None or b is None else a - b
    out["random_cos"] = summary["tag"]["random_cos"]
    return out


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--texts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--split", choices=("calibration", "heldout"), default="heldout")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from sinkcache.analysis import analyze
    from sinkcache.calibration import token_chunks
    from sinkcache.compare.stats import bootstrap_mean
    from sinkcache.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    chunks = token_chunks(tok, args.split, args.tokens, n=args.texts)
    if len(chunks) < args.texts:
        raise SystemExit(f"--texts {args.texts}: the {args.split} split has only {len(chunks)} chunks of {args.tokens} tokens")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "texts.jsonl"
    done = [json.loads(line) for line in store.read_text().splitlines()] if store.exists() else []
    for i in range(len(done), args.texts):
        report = analyze(model, tok, input_ids=chunks[i], max_tokens=args.tokens, model_name=args.model)
        row = {"text": i, **per_text(report.summary)}
        with store.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        print(f"text {i}: first {row['attention on the first token']:.3f}", flush=True)
    rows = done[: args.texts]
    cmd = "python evals/sink_analysis_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Catch, tag, release over {len(rows)} {args.split} texts: {args.model}",
        "",
        f"`{cmd}`; {args.tokens} tokens per text; mean over texts with a 95% bootstrap interval over texts "
        f"(10,000 resamples). Definitions: `sinkcache.analysis` (random |cos| in this dimension: {rows[0]['random_cos']}).",
        "",
        "| statistic | mean [95% CI] | texts |",
        "|---|---|---:|",
    ]
    summary: dict[str, Any] = {}
    labels = [label for label, _ in STATS] + [f"contrast {k}" for k in CONTRASTS]
    for label in labels:
        vals = [r[label] for r in rows if r.get(label) is not None]
        if len(vals) < 2:
            lines.append(f"| {label} | - | {len(vals)} |")
            continue
        iv = bootstrap_mean(vals)
        summary[label] = iv.to_dict()
        shown = label if not label.startswith("contrast") else f"tag {label[9:]}: sink heads - non-sink heads (paired)"
        shown = shown.replace("|", "\\|")  # |cos| inside a markdown table cell
        lines.append(f"| {shown} | {iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}] | {iv.n} |")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
