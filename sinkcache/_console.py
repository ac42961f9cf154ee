"""Small text-formatting helpers for the command line (no third-party dependencies)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def format_bytes(n: float) -> str:
    """``13145040`` -> ``"12.5 MiB"`` (binary units, one decimal)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters (newlines folded, ``...`` when cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 3, 0)] + "..."


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one ``l``/``r`` per column (default: all left)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=False)]
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _summarise_list(values: Sequence[Any]) -> str:
    nums = [float(v) for v in values]
    if not nums:
        return "[]"
    mean = sum(nums) / len(nums)
    return f"mean {mean:.2f}, min {min(nums):g}, max {max(nums):g} over {len(nums)} layers"


def format_stats(stats: Mapping[str, Any]) -> str:
    """``cache.stats()`` as aligned ``key: value`` lines, with readable bytes and ratios."""
    lines = []
    width = max((len(k) for k in stats), default=0)
    for key, value in stats.items():
        if key.endswith("bytes") and isinstance(value, int):
            shown = f"{format_bytes(value)} ({value:,} bytes)"
        elif key.endswith("ratio") and isinstance(value, float):
            shown = f"{value:.2f}x"
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            shown = _summarise_list(value)
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        else:
            shown = str(value)
        lines.append(f"{key.rjust(width)}: {shown}")
    return "\n".join(lines)
