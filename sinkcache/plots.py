"""Figures for a sink :class:`~sinkcache.analysis.Report` (matplotlib, Agg backend, files only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .analysis import Report

CLASS_COLORS = {"first": "#d62728", "punctuation": "#1f77b4", "newline": "#2ca02c", "other": "#7f7f7f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(report: Report, path: str | Path) -> Path:
    """Layer x head heatmaps: attention on the first token, on other sinks, and in total."""
    plt = _pyplot()
    panels = [
        ("first_mass", "on the first token"),
        ("nonfirst", "on other sinks\n(punct./newline/other)"),
        ("sink_mass", "on all sinks"),
    ]
    first = report.matrix("first_mass")
    total = report.matrix("sink_mass")
    data = {
        "first_mass": first,
        "sink_mass": total,
        "nonfirst": [[t - f for t, f in zip(tr, fr, strict=True)] for tr, fr in zip(total, first, strict=True)],
    }
    n_layers = len(first)
    n_heads = len(first[0]) if first else 0
    width = max(10.0, 2.0 + 3 * (0.45 * n_heads + 1.0))
    fig, axes = plt.subplots(1, 3, figsize=(width, 1.8 + 0.22 * n_layers), squeeze=False)
    ylabels = [f"{lay['layer']}{' s' if 'sliding' in str(lay['type']) else ''}" for lay in report.layers]
    im = None
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        im = ax.imshow(data[key], aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
        ax.set_title(f"attention {title}", fontsize=8)
        ax.set_xlabel("head")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers), ylabels)
        ax.tick_params(labelsize=7)
        for li, layer in enumerate(report.layers):
            for hi, head in enumerate(layer["heads"]):
                if head["sink_head"] and key == "sink_mass":
                    ax.text(hi, li, "*", ha="center", va="center", color="white", fontsize=7)
    axes[0][0].set_ylabel("layer (s = sliding window)" if any(" s" in y for y in ylabels) else "layer")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean attention per query")
    fig.suptitle(
        f"{report.model}: attention on sinks ({report.summary.get('tokens', '?')} tokens; * = sink head)", fontsize=10
    )
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_token_strip(report: Report, path: str | Path, max_tokens: int = 512, per_row: int = 32) -> Path:
    """The text as a grid of tokens; fill = share of (layer, head) pairs for which it is a sink,
    edge colour = token class."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    toks = report.tokens[:max_tokens]
    n_heads = max(1, report.summary.get("heads", 1))
    rows = (len(toks) + per_row - 1) // per_row
    fig, ax = plt.subplots(figsize=(per_row * 0.55, 0.6 + rows * 0.32))
    cmap = plt.get_cmap("Reds")
    for i, tk in enumerate(toks):
        r, c = divmod(i, per_row)
        frac = min(1.0, (tk["sink_heads"] / n_heads) ** 0.5)  # sqrt: a sink of one head still shows
        ax.add_patch(
            Rectangle(
                (c, -r), 0.96, 0.9, facecolor=cmap(0.08 + 0.92 * frac), edgecolor=CLASS_COLORS[tk["class"]],
                linewidth=0.9 if tk["class"] != "other" else 0.3,
            )
        )
        label = repr(tk["text"])[1:-1]
        label = label if len(label) <= 6 else label[:5] + "~"
        ax.text(c + 0.48, -r + 0.45, label, ha="center", va="center", fontsize=4.2,
                color="white" if frac > 0.5 else "black")
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows + 0.9, 1.0)
    ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, facecolor="white", edgecolor=col, linewidth=1.2) for col in CLASS_COLORS.values()]
    ax.legend(handles, list(CLASS_COLORS), loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=6, frameon=False)
    shown = f"first {len(toks)} of {len(report.tokens)} tokens" if len(toks) < len(report.tokens) else f"{len(toks)} tokens"
    ax.set_title(f"{report.model}: sink tokens ({shown}; darker = sink in more heads (sqrt scale))", fontsize=9, loc="left")
    out = Path(path)
    fig.savefig(out, dpi=140, bbox_inches="tight")
    plt.close(fig)
    return out
