"""Find the attention sinks of a prompt and save the layer x head heatmap and the token strip.

Run:  python examples/visualize_sinks.py [--model smollm2-135m] [--out sink-plots] [--max-tokens 256]
Shows: sinkcache.analysis.analyze() on one text, and the two plots `sinkcache detect` writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkcache.analysis import analyze
from sinkcache.calibration import split_text
from sinkcache.models import load_model
from sinkcache.plots import plot_heatmap, plot_token_strip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="sink-plots")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt", default=None, help="text to analyse (default: held-out stdlib docstrings)")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    text = args.prompt or split_text("heldout")[:20000]
    report = analyze(model, tok, text, max_tokens=args.max_tokens, model_name=args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heat = plot_heatmap(report, out / "sink_heatmap.png")
    strip = plot_token_strip(report, out / "sink_tokens.png")
    print(f"wrote {heat} and {strip}")


if __name__ == "__main__":
    main()
