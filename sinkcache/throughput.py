"""``sinkcache bench --throughput-mib``: decode throughput at a fixed KV memory budget.

The claim users care about is not "the cache is N times smaller" but "the same memory serves N
times more sequences, this much faster in total". For a KV budget and a context length, each cache:

1. is **probed** at batch 1: prefill ``context`` tokens, decode ``decode_tokens``, read the bytes it
   holds (``kv_bytes``: what the cache object reports or holds, walked down to real storage);
2. gets the **largest batch** whose probed bytes fit the budget (``budget // per_sequence``, capped
   at ``max_batch``, the cap recorded when it binds);
3. is **measured** at that batch: one batched prefill (timed apart), then ``decode_tokens`` greedy
   steps; throughput is ``batch * steady steps / their time`` (the first decode step, where a
   compressing cache quantizes the prompt, is reported apart, as in :mod:`sinkcache.bench`).

The bytes actually held at that batch are read back and recorded (``kv_bytes``, ``fits``): a row
whose cache outgrew the budget says so. Ratios are to ``DynamicCache`` from the same run. The batch
rows are different windows of the same held-out text, so no two sequences are identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench import (
    BASELINE,
    CacheSpec,
    _decode,
    _prefill,
    built_config,
    built_label,
    check_specs,
    kv_bytes,
    machine_line,
    steady_tps,
)


@dataclass
class ThroughputRow:
    """One cache at the budget (bytes in bytes, times in seconds)."""

    cache: str
    label: str
    per_sequence_bytes: int  # probed at batch 1 after context + decode_tokens tokens
    batch: int  # largest batch that fits (0: not even one sequence fits)
    capped: bool  # the batch was limited by max_batch, not by memory
    kv_bytes: int = 0  # held at `batch` after the last step (read back from the cache)
    fits: bool = True  # kv_bytes <= budget
    prefill_s: float = 0.0
    first_step_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0  # batch * steady decode steps / seconds
    x: float = float("nan")  # tokens_per_s / DynamicCache's
    built: dict = field(default_factory=dict)


def batch_windows(prompt_ids: torch.Tensor, batch: int, context: int) -> torch.Tensor:
    """``[batch, context]`` distinct windows of ``prompt_ids`` ``[1, n]`` (wrapping around the text)."""
    n = prompt_ids.shape[1]
    if n < context:
        raise ValueError(f"context {context} exceeds the {n} prompt tokens available")
    stride = max(1, (n - context) // max(batch, 1)) if n > context else 0
    rows = []
    for i in range(batch):
        start = (i * stride) % (n - context + 1)
        rows.append(prompt_ids[0, start : start + context])
    return torch.stack(rows)


def _run(model: Any, spec: CacheSpec, ids: torch.Tensor, decode_tokens: int, tokenizer: Any) -> tuple[Any, float, list[float]]:
    """Prefill ``ids`` ``[B, T]`` into a fresh cache and decode greedily; the cache, prefill seconds, step seconds."""
    cache = spec.build(model, tokenizer)
    prefill, first = _prefill(model, cache, ids)
    steps, _ = _decode(model, cache, first, decode_tokens)
    return cache, prefill, steps


def fixed_memory_throughput(
    model: Any,
    prompt_ids: torch.Tensor,
    specs: Sequence[CacheSpec],
    *,
    kv_budget_bytes: int,
    context: int,
    decode_tokens: int = 16,
    max_batch: int = 64,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = print,
) -> list[ThroughputRow]:
    """One :class:`ThroughputRow` per spec (``specs[0]`` must be the ``DynamicCache`` baseline)."""
    if not specs or specs[0].kind != "dynamic":
        raise ValueError("the first spec must be the DynamicCache baseline (kind='dynamic')")
    if kv_budget_bytes <= 0 or max_batch < 1 or decode_tokens < 2:
        raise ValueError(
            f"kv_budget_bytes={kv_budget_bytes} must be > 0, max_batch={max_batch} >= 1 and "
            f"decode_tokens={decode_tokens} >= 2 (the first step is reported apart)"
        )
    check_specs(specs, model, tokenizer)
    device = next(model.parameters()).device
    rows: list[ThroughputRow] = []
    with torch.inference_mode():
        _run(model, specs[0], batch_windows(prompt_ids, 1, min(context, 64)).to(device), 2, tokenizer)  # warm-up
        for spec in specs:
            probe, _, _ = _run(model, spec, batch_windows(prompt_ids, 1, context).to(device), decode_tokens, tokenizer)
            per = kv_bytes(probe)
            built = built_config(probe)
            del probe
            fit = kv_budget_bytes // per if per else max_batch
            batch = int(min(fit, max_batch))
            row = ThroughputRow(spec.name, built_label(built) if built else spec.label, per, batch, fit > max_batch, built=built)
            if batch > 0:
                cache, row.prefill_s, steps = _run(model, spec, batch_windows(prompt_ids, batch, context).to(device), decode_tokens, tokenizer)
                row.kv_bytes = kv_bytes(cache)
                row.fits = row.kv_bytes <= kv_budget_bytes
                row.first_step_s, row.step_s = steps[0], steps[1:]
                row.tokens_per_s = batch * steady_tps(steps)
                del cache
            rows.append(row)
            if log:
                log(
                    f"{spec.name:14s} {per / 2**20:8.1f} MiB/sequence -> batch {batch:3d}{' (cap)' if row.capped else ''}  "
                    f"{row.tokens_per_s:8.1f} tok/s  KV held {row.kv_bytes / 2**20:8.1f} MiB"
                )
    base = rows[0].tokens_per_s
    for r in rows:
        r.x = r.tokens_per_s / base if base else float("nan")
    return rows


def to_markdown(rows: Sequence[ThroughputRow], meta: dict[str, Any]) -> str:
    lines = [
        f"# Throughput at a fixed KV budget: {meta['model']} ({meta['dtype']}, {meta['device']}), "
        f"{meta['kv_budget_mib']:g} MiB of KV, {meta['context']}-token prompts, {meta['decode_tokens']} decode tokens",
        "",
        machine_line(meta),
        "",
        "Per sequence: KV bytes after prompt + decode at batch 1. Batch: the largest that fits the budget "
        f"(capped at {meta['max_batch']}). tok/s: batch x steady decode steps (the first step apart) / seconds; "
        "`x`: against DynamicCache in the same run. KV held: read back from the cache at that batch.",
        "",
        "| cache | MiB / sequence | batch | KV held MiB | fits | prefill s | first step ms | decode tok/s | x DynamicCache |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.per_sequence_bytes / 2**20:.1f} | {r.batch}{' (cap)' if r.capped else ''} | "
            f"{r.kv_bytes / 2**20:.1f} | {'yes' if r.fits else 'NO'} | {r.prefill_s:.1f} | {1e3 * r.first_step_s:.0f} | "
            f"{r.tokens_per_s:.1f} | {r.x:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[ThroughputRow], path: Path, meta: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    names = [f"{r.label} (batch {r.batch})" for r in rows]
    ax.barh(names[::-1], [r.tokens_per_s for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("decode tokens / s (all sequences)")
    ax.set_title(f"Throughput in {meta['kv_budget_mib']:g} MiB of KV, {meta['context']}-token prompts", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(rows: Sequence[ThroughputRow], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``throughput.json``, ``throughput.md`` and ``throughput.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "throughput.json", "md": out / "throughput.md", "png": out / "throughput.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    paths["md"].write_text(to_markdown(rows, meta))
    plot(rows, paths["png"], meta)
    return paths


__all__ = ["BASELINE", "ThroughputRow", "batch_windows", "fixed_memory_throughput", "to_markdown", "write"]
