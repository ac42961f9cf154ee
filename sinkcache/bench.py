"""``sinkcache bench``: prefill time, decode speed, KV bytes and peak RSS per cache, against DynamicCache.

For every context length and repetition the benchmark

1. prefills ``DynamicCache`` once (the baseline's prefill time and first greedy token);
2. for every other cache, in an order rotated each repetition:
   a. decodes ``decode_tokens`` greedy tokens from the baseline's prefilled state, then crops the
      baseline back to the prompt (the **A** of an A B A B pair: a baseline decode right before
      every measured cache, so slow drifts in machine load hit both alike);
   b. builds the cache, prefills the same prompt into it and decodes the same number of tokens
      (the **B**).

Decode is timed per step, separately from prefill. Ratios are medians over repetitions of the
cache divided by medians of the baseline measured next to it. KV bytes are what the cache holds
after the last decode step (packed codes, scales/zeros, full-precision sinks and window,
metadata); ``kv_x16`` compares against a 16-bit ``DynamicCache`` (2 bytes per element) as well as
the model-dtype one. Peak RSS is per cell, in process: Linux's peak-RSS counter (``VmHWM``) is
reset through ``/proc/self/clear_refs`` before each cell and read after it; the delta is over the
RSS at the cell's start (the model's weights are not in it).

All numbers come from one process on whatever machine runs it; the JSON records the machine, the
load average before and after, and the thread count.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Contexts and sizes of ``--quick`` (a few minutes on 2 CPU cores) and of the full run.
QUICK = dict(contexts=(512, 2048), decode_tokens=16, reps=2)
FULL = dict(contexts=(512, 1024, 2048, 4096), decode_tokens=16, reps=2)
#: Caches of ``--quick`` and of the full run (``--caches`` picks any of :func:`default_specs`).
QUICK_CACHES = ("evict", "int4", "int2", "quanto4")
FULL_CACHES = ("evict", "evict-nosink", "int4", "int4-profile", "int4-nosink", "int2", "hybrid2", "quanto4", "quanto2")
#: Budget (tokens per layer) of the evicting policies: below every long context, so eviction
#: must show a flat decode cost once the context exceeds it.
BUDGET = 1024
BASELINE = "dynamic"


@dataclass(frozen=True)
class CacheSpec:
    """One cache configuration to measure.

    ``kind``: ``"dynamic"`` (``DynamicCache``), ``"sinkcache"`` (``SinkCache(**options)``) or
    ``"quanto"`` (transformers' ``QuantizedCache(backend="quanto", nbits=options["nbits"])``).
    """

    name: str
    label: str
    kind: str
    options: dict = field(default_factory=dict)

    def build(self, model: Any, tokenizer: Any = None):
        """A fresh cache for ``model``."""
        from transformers import DynamicCache, QuantizedCache

        if self.kind == "dynamic":
            return DynamicCache(config=model.config)
        if self.kind == "quanto":
            return QuantizedCache(backend="quanto", config=model.config, **self.options)
        if self.kind == "sinkcache":
            from .cache import SinkCache

            return SinkCache(model=model, tokenizer=tokenizer, **self.options)
        raise ValueError(f"cache kind {self.kind!r} is unknown; allowed: dynamic, sinkcache, quanto")


def default_specs(budget: int = BUDGET, profile: str | None = None) -> list[CacheSpec]:
    """The baseline, every policy in its sink-aware and sink-blind form, and quanto as a peer.

    ``profile``: a built-in sink profile name; adds ``int4-profile`` (sinks chosen by token id from
    the profile: sink-aware without the runtime attention measurement of ``sinks="auto"``).
    """
    from .refine import Refinement  # imports torch: not at module top (``sinkcache --help`` stays torch-free)

    specs = [
        CacheSpec(BASELINE, "DynamicCache (baseline)", "dynamic"),
        CacheSpec("full", "SinkCache full", "sinkcache", dict(policy="full")),
        CacheSpec("evict", f"evict budget {budget}, first-token sink", "sinkcache", dict(policy="evict", budget=budget)),
        CacheSpec("evict-nosink", f"evict budget {budget}, no sinks", "sinkcache", dict(policy="evict", budget=budget, sinks="none")),
        # the demo's eviction row: measured sinks (against "evict", first-token sink, it is what auto costs)
        CacheSpec("evict-auto", f"evict budget {budget}, measured sinks", "sinkcache", dict(policy="evict", budget=budget, sinks="auto")),
        CacheSpec("int4", "quantize int4, first-token sink", "sinkcache", dict(policy="quantize", bits=4)),
        CacheSpec("int4-profile", "quantize int4, sinks from profile", "sinkcache", dict(policy="quantize", bits=4, profile=profile)),
        CacheSpec("int4-nosink", "quantize int4, no sinks (KIVI)", "sinkcache", dict(policy="quantize", bits=4, sinks="none")),
        CacheSpec("int2", "quantize int2, first-token sink", "sinkcache", dict(policy="quantize", bits=2)),
        CacheSpec("int2-nosink", "quantize int2, no sinks (KIVI)", "sinkcache", dict(policy="quantize", bits=2, sinks="none")),
        CacheSpec("int4-auto", "quantize int4, measured sinks", "sinkcache", dict(policy="quantize", bits=4, sinks="auto")),
        CacheSpec("int2-auto", "quantize int2, measured sinks", "sinkcache", dict(policy="quantize", bits=2, sinks="auto")),
        CacheSpec("int2-refine", "quantize int2, first-token sink, 14% of each block refined by attention (+2 bits)", "sinkcache",
                  dict(policy="quantize", bits=2, refine=0.14)),
        CacheSpec("int4-refine", "quantize int4, first-token sink, 14% of each block refined by attention (+2 bits)", "sinkcache",
                  dict(policy="quantize", bits=4, refine=0.14)),
        # Ranked by key norm: no query hooks, so (int2-refine - int2-refine-keynorm) is what the hooks cost.
        CacheSpec("int2-refine-keynorm", "quantize int2, first-token sink, 14% of each block refined by key norm (+2 bits)",
                  "sinkcache", dict(policy="quantize", bits=2, refine=Refinement(0.14, score="keynorm"))),
        CacheSpec("hybrid2", f"hybrid int2 budget {budget}, first-token sink", "sinkcache", dict(policy="hybrid", bits=2, budget=budget)),
        CacheSpec("quanto4", "transformers QuantizedCache quanto int4", "quanto", dict(nbits=4)),
        CacheSpec("quanto2", "transformers QuantizedCache quanto int2", "quanto", dict(nbits=2)),
    ]
    return [s for s in specs if s.name != "int4-profile" or profile is not None]


def _spec_meta(specs: Sequence[CacheSpec]) -> dict[str, dict]:
    """What each spec asked for, JSON-safe (an option object such as ``Refinement`` by its repr)."""
    plain = (int, float, str, bool, type(None))
    return {
        s.name: {"label": s.label, "kind": s.kind, "options": {k: v if isinstance(v, plain) else repr(v) for k, v in s.options.items()}}
        for s in specs
    }


# ---- memory ---------------------------------------------------------------------------------


def tensor_bytes(t: Any) -> int:
    """Bytes of a tensor, walking tensor subclasses (quanto's packed tensors) down to real storage."""
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def kv_bytes(cache: Any) -> int:
    """KV bytes a cache holds: ``SinkCache.memory_bytes()``, else every tensor attribute of every layer."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    return sum(tensor_bytes(v) for layer in cache.layers for v in vars(layer).values())


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter for this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next cell's RSS starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- one measurement -------------------------------------------------------------------------


@dataclass
class Run:
    """One prefill + decode of one cache at one context (times in seconds, bytes in bytes)."""

    cache: str
    context: int
    rep: int
    prefill_s: float
    step_s: list[float]
    kv_bytes: int
    peak_rss: int
    rss_delta: int
    tokens: list[int]
    baseline_step_s: list[float] = field(default_factory=list)
    built: dict = field(default_factory=dict)  # the cache as built (read back from the object)

    @property
    def decode_tps(self) -> float:
        """Steady decode tokens/s: every step but the first (see :func:`steady_tps`)."""
        return steady_tps(self.step_s)


def steady_tps(step_s: Sequence[float]) -> float:
    """Tokens/s of the steps after the first. The first decode step is where a compressing cache
    quantizes or evicts the whole prompt (one forward late, see ``CompressingLayer.compress``), so
    it is reported apart (``first_step_ms``) rather than averaged into steady decode."""
    steady = list(step_s[1:]) or list(step_s)
    return len(steady) / sum(steady)


def _decode(model: Any, cache: Any, first: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """Greedy-decode ``n`` tokens from ``first`` ``[B, 1]``; per-step seconds and row 0's tokens.

    Each step is timed until its token is on the host (``.cpu()`` waits for a CUDA device), so the
    clock stops when the step has really run."""
    steps, toks, tok = [], [], first
    for _ in range(n):
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        row0 = int(tok[0, 0].cpu())
        steps.append(time.perf_counter() - t0)
        toks.append(row0)
    return steps, toks


def _prefill(model: Any, cache: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Prefill ``ids`` ``[B, T]``; seconds (until the first tokens are on the host) and those tokens ``[B, 1]``."""
    t0 = time.perf_counter()
    # logits_to_keep=1: like generate(), do not build [context, vocab] logits nobody reads.
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].argmax(-1)
    first.cpu()
    return time.perf_counter() - t0, first


def _rewind(cache: Any, length: int) -> None:
    """Crop a ``DynamicCache`` back to ``length`` tokens (transformers 5.23 takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def measure(model: Any, spec: CacheSpec, ids: torch.Tensor, decode_tokens: int, tokenizer: Any = None, rep: int = 0) -> tuple[Run, Any, torch.Tensor]:
    """Prefill ``ids`` ``[1, context]`` into a fresh ``spec`` cache and decode; returns the run, the cache, the first token."""
    _trim()
    reset = _reset_peak()
    rss0 = _rss()
    cache = spec.build(model, tokenizer)
    prefill_s, first = _prefill(model, cache, ids)
    steps, toks = _decode(model, cache, first, decode_tokens)
    peak = _peak_rss() if reset else 0
    run = Run(spec.name, ids.shape[1], rep, prefill_s, steps, kv_bytes(cache), peak, max(peak - rss0, 0) if reset else 0, toks)
    run.built = built_config(cache)
    return run, cache, first


def built_config(cache: Any) -> dict:
    """What ``cache`` is, read back from the object (``SinkCache.describe()``; the class and the
    quantized layers' settings for transformers' caches)."""
    if hasattr(cache, "describe"):
        return dict(cache.describe())
    out: dict = {"class": type(cache).__name__}
    layer = next(iter(getattr(cache, "layers", []) or []), None)
    if layer is not None:
        out["layer_class"] = type(layer).__name__  # QuantoQuantizedLayer / HQQQuantizedLayer: the backend
    for name in ("nbits", "q_group_size", "residual_length"):
        if layer is not None and hasattr(layer, name):
            out[name] = getattr(layer, name)
    return out


def built_label(cfg: dict) -> str:
    """A row label made from the built cache, so it cannot disagree with what ran."""
    if "policy" not in cfg:
        bits = f" int{cfg['nbits']}" if "nbits" in cfg else ""
        backend = str(cfg.get("layer_class", "")).lower()
        name = next((b for b in ("quanto", "hqq") if b in backend), cfg.get("class", "?"))
        return f"{name}{bits}"
    parts = [cfg["policy"]]
    if cfg.get("bits") is not None:
        parts.append(f"int{cfg['bits']}")
    if cfg.get("budget") is not None:
        parts.append(f"budget {cfg['budget']}")
    if cfg.get("score") and cfg["policy"] == "evict":
        parts.append(f"score {cfg['score']}")
    refine = cfg.get("refine")
    if refine:
        parts.append(f"refine {refine['share']:g} (+{refine['bits']} bits, {refine['score']})")
    if cfg["policy"] != "full":
        sinks = cfg.get("sinks")
        parts.append("no sinks" if sinks == "none" else f"sinks {sinks}" + (f" ({cfg['sink_selector']})" if sinks == "auto" else ""))
    return ", ".join(parts)


# ---- the sweep -------------------------------------------------------------------------------


def check_specs(specs: Sequence[CacheSpec], model: Any, tokenizer: Any = None) -> None:
    """Build every cache once, before anything is measured: an option a cache rejects (e.g. a
    hybrid budget too small for its sinks) fails in seconds, naming the cache, instead of after
    the caches before it were measured (and their results lost)."""
    for spec in specs:
        try:
            cache = spec.build(model, tokenizer)
        except ValueError as e:
            raise ValueError(f"cache {spec.name!r}: {e}") from None
        if hasattr(cache, "detach"):
            cache.detach()  # sinks="auto" and attention scorers hook the model


def run_bench(
    model: Any,
    prompt_ids: torch.Tensor,
    *,
    contexts: Sequence[int],
    specs: Sequence[CacheSpec],
    reps: int,
    decode_tokens: int,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = print,
) -> list[Run]:
    """Measure every spec at every context (``prompt_ids`` ``[1, >= max(contexts)]``), interleaved with the baseline.

    ``specs`` must start with the ``dynamic`` baseline. Returns every run (the baseline's too).
    """
    if not specs or specs[0].kind != "dynamic":
        raise ValueError("the first spec must be the DynamicCache baseline (kind='dynamic')")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be [1, tokens], got {tuple(prompt_ids.shape)}")
    if max(contexts) > prompt_ids.shape[1]:
        raise ValueError(f"context {max(contexts)} exceeds the {prompt_ids.shape[1]} prompt tokens available")
    if reps < 1 or decode_tokens < 1:
        raise ValueError(f"reps={reps} and decode_tokens={decode_tokens} must be >= 1")
    check_specs(specs, model, tokenizer)
    base, others = specs[0], list(specs[1:])
    runs: list[Run] = []
    with torch.inference_mode():
        # Warm-up (not recorded): first-call allocations and lazy initialisation would otherwise be
        # charged to whichever cell runs first.
        measure(model, base, prompt_ids[:, : min(contexts)], 2, tokenizer)
        for ctx in contexts:
            ids = prompt_ids[:, :ctx]
            for rep in range(reps):
                brun, bcache, first = measure(model, base, ids, decode_tokens, tokenizer, rep)
                runs.append(brun)
                _rewind(bcache, ctx)
                k = rep % len(others) if others else 0
                for spec in others[k:] + others[:k]:  # rotate, so no cache always runs right after a model load
                    # A: the baseline decodes next to this cache, from its own prefilled state.
                    steps, _ = _decode(model, bcache, first, decode_tokens)
                    _rewind(bcache, ctx)
                    # B: the cache under test.
                    run, cache, _ = measure(model, spec, ids, decode_tokens, tokenizer, rep)
                    run.baseline_step_s = steps
                    runs.append(run)
                    del cache
                    if log:
                        log(
                            f"ctx {ctx:6d} rep {rep} {spec.name:14s} prefill {run.prefill_s:7.2f}s  decode "
                            f"{run.decode_tps:6.1f} tok/s (baseline {steady_tps(steps):6.1f})  "
                            f"KV {run.kv_bytes / 2**20:7.1f} MiB"
                        )
                del bcache
    return runs


# ---- summary ---------------------------------------------------------------------------------


def _med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(runs: Sequence[Run], specs: Sequence[CacheSpec], dtype_bytes: int) -> list[dict]:
    """One row per (context, cache): medians and ratios to the baseline measured alongside.

    Ratios: ``prefill_x`` = time / baseline time (lower is better); ``decode_x`` = tokens/s /
    baseline tokens/s (higher is better); ``kv_x`` = baseline bytes / bytes ("x smaller");
    ``kv_x16`` = the same against a 16-bit DynamicCache; ``rss_x`` = peak RSS delta / baseline's.
    """
    rows = []
    labels = {s.name: s.label for s in specs}
    contexts = sorted({r.context for r in runs})
    for ctx in contexts:
        base = [r for r in runs if r.context == ctx and r.cache == specs[0].name]
        b_prefill = _med([r.prefill_s for r in base])
        b_kv = _med([r.kv_bytes for r in base])
        b_rss = _med([r.rss_delta for r in base])
        b_tokens = base[0].tokens if base else []
        for spec in specs:
            rs = [r for r in runs if r.context == ctx and r.cache == spec.name]
            if not rs:
                continue
            if spec.name == specs[0].name:
                # The baseline's decode speed: every A run of this context (its own B is the first decode).
                paired = [steady_tps(r.step_s) for r in rs]
                paired += [steady_tps(r.baseline_step_s) for r in runs if r.context == ctx and r.baseline_step_s]
                tps, b_tps = _med(paired), _med(paired)
                first_ms = _med([1e3 * r.step_s[0] for r in rs])
                b_first_ms = first_ms
            else:
                tps = _med([r.decode_tps for r in rs])
                b_tps = _med([steady_tps(r.baseline_step_s) for r in rs])
                first_ms = _med([1e3 * r.step_s[0] for r in rs])
                b_first_ms = _med([1e3 * r.baseline_step_s[0] for r in rs])
            kv = _med([r.kv_bytes for r in rs])
            n = min(len(b_tokens), len(rs[0].tokens))
            agree = sum(a == b for a, b in zip(b_tokens[:n], rs[0].tokens[:n])) / n if n else float("nan")
            rows.append(
                dict(
                    context=ctx,
                    cache=spec.name,
                    label=built_label(rs[0].built) if rs[0].built else labels[spec.name],
                    built=rs[0].built,
                    reps=len(rs),
                    prefill_s=_med([r.prefill_s for r in rs]),
                    prefill_x=_med([r.prefill_s for r in rs]) / b_prefill,
                    decode_tps=tps,
                    decode_x=tps / b_tps,
                    ms_per_token=_med([1e3 * s for r in rs for s in (r.step_s[1:] or r.step_s)]),
                    first_step_ms=first_ms,
                    first_step_x=first_ms / b_first_ms,
                    kv_bytes=kv,
                    kv_x=b_kv / kv,
                    kv_x16=b_kv * 2 / dtype_bytes / kv,
                    peak_rss=_med([r.peak_rss for r in rs]),
                    rss_delta=_med([r.rss_delta for r in rs]),
                    rss_x=_med([r.rss_delta for r in rs]) / b_rss if b_rss else float("nan"),
                    agree=agree,
                )
            )
    return rows


def machine_info(threads: int) -> dict[str, Any]:
    """What ran this: platform, cores, torch, threads, load average now."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(meta: dict[str, Any]) -> str:
    """The markdown line saying where and how a run was made (machine, threads, load, command, time)."""
    m = meta["machine"]
    return (
        f"Machine: {m['machine']}, {m['cpus']} CPUs, torch {m['torch']}, {m['threads']} torch thread(s); "
        f"load average {meta['load_before']} before, {meta['load_after']} after. "
        f"Command: `{meta['command']}`; {meta['seconds']:.0f} s."
    )


def to_markdown(rows: Sequence[dict], meta: dict[str, Any]) -> str:
    """The results table (markdown), with the run's settings and machine stated above it."""
    lines = [
        f"# sinkcache bench: {meta['model']} ({meta['dtype']}, {meta.get('device', 'cpu')}), {meta['decode_tokens']} decode tokens, "
        f"{meta['reps']} reps",
        "",
        machine_line(meta),
        "",
        "Medians over repetitions; `x` columns are ratios to `DynamicCache` measured in the same run "
        "(decode: the baseline decoded right before each cache, A B A B). Decode tok/s and ms/token are "
        "steady decode (every step but the first); the first decode step, where a compressing cache "
        "quantizes or evicts the whole prompt, is its own column. Decode `x` > 1 is faster; "
        "KV `x` is how many times smaller (vs the model-dtype cache, and vs a 16-bit one at 2 bytes/element). "
        "Peak RSS: growth over the cell's starting RSS (VmHWM reset per cell, in process). "
        "`agree`: share of greedy tokens equal to DynamicCache's.",
        "",
        "| context | cache | prefill s | x | first step ms | x | decode tok/s | x | ms/token | KV MiB | KV x smaller | vs 16-bit | peak RSS +MiB | agree |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['label']} | {r['prefill_s']:.2f} | {r['prefill_x']:.2f} | "
            f"{r['first_step_ms']:.0f} | {r['first_step_x']:.2f} | {r['decode_tps']:.1f} | "
            f"{r['decode_x']:.2f} | {r['ms_per_token']:.1f} | {r['kv_bytes'] / 2**20:.1f} | {r['kv_x']:.2f} | "
            f"{r['kv_x16']:.2f} | {r['rss_delta'] / 2**20:.0f} | {r['agree']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_scaling(rows: Sequence[dict], path: Path, budget: int = BUDGET, caches: Sequence[str] | None = None) -> Path:
    """``decode_cost_vs_context.png``: median decode ms/token against context, one line per cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(caches) if caches else list(dict.fromkeys(r["cache"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        pts = sorted((r["context"], r["ms_per_token"], r["label"]) for r in rows if r["cache"] == name)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pts[0][2])
    ax.axvline(budget, color="grey", linestyle=":", label=f"eviction budget ({budget})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode ms / token (median)")
    ax.set_title("Per-token decode cost vs context")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(runs: Sequence[Run], rows: Sequence[dict], meta: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (meta, summary rows, every run), ``results.md`` and the scaling plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "decode_cost_vs_context.png"}
    payload = {"meta": meta, "summary": list(rows), "runs": [asdict(r) for r in runs]}
    paths["json"].write_text(json.dumps(payload, indent=1))
    paths["md"].write_text(to_markdown(rows, meta))
    scaling = [n for n in (BASELINE, "evict", "evict-nosink", "int4", "int2", "hybrid2", "quanto4") if any(r["cache"] == n for r in rows)]
    plot_scaling(rows, paths["png"], meta.get("budget", BUDGET), scaling)
    return paths


def bench(
    model_name: str = "smollm2-135m",
    *,
    quick: bool = False,
    contexts: Sequence[int] | None = None,
    caches: Sequence[str] | None = None,
    reps: int | None = None,
    decode_tokens: int | None = None,
    budget: int = BUDGET,
    dtype: str | None = None,
    device: str | None = None,
    threads: int = 1,
    out_dir: str | Path = "evals/results/bench",
    command: str = "",
    log: Callable[[str], None] | None = print,
    throughput_mib: float | None = None,
    max_batch: int = 64,
) -> dict[str, Any]:
    """Load ``model_name``, run the sweep on held-out text, write the results; returns meta, rows and paths.

    ``device``: default CUDA when available, else CPU; ``dtype``: default bfloat16 on CUDA, float32
    on CPU. ``throughput_mib``: instead of the per-context sweep, measure decode throughput at this
    fixed KV budget (:mod:`sinkcache.throughput`) at the first of ``contexts``."""
    from .calibration import split_text
    from .models import load_model

    preset = QUICK if quick else FULL
    caches = tuple(caches or (QUICK_CACHES if quick else FULL_CACHES))
    contexts = tuple(contexts or preset["contexts"])  # type: ignore[arg-type]
    reps = int(reps or preset["reps"])  # type: ignore[call-overload]
    decode_tokens = int(decode_tokens or preset["decode_tokens"])  # type: ignore[call-overload]
    from .sinks.profile import PROFILE_DIR

    prof_path = PROFILE_DIR / f"{model_name}.json"
    specs = default_specs(budget, model_name if prof_path.exists() else None)
    if caches:
        unknown = sorted(set(caches) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"unknown cache(s) {', '.join(unknown)}; allowed: {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name == BASELINE or s.name in caches]
    from .placement import placement, resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tok = load_model(model_name, dtype=dtype, progress=False)
        model.to(torch.device(device))  # type: ignore[arg-type]
        ids = tok(split_text("heldout"), return_tensors="pt")["input_ids"].to(device)
        load_before = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        if throughput_mib is not None:
            from . import throughput

            trows = throughput.fixed_memory_throughput(
                model, ids, specs, kv_budget_bytes=int(throughput_mib * 2**20), context=contexts[0],
                decode_tokens=decode_tokens, max_batch=max_batch, tokenizer=tok, log=log,
            )
        else:
            runs = run_bench(model, ids, contexts=contexts, specs=specs, reps=reps, decode_tokens=decode_tokens, tokenizer=tok, log=log)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before_threads)
    param = next(model.parameters())
    where = placement(model)  # device, dtype and versions read back from the model that ran
    if throughput_mib is not None:
        tmeta = {
            "model": model_name, **where, "kv_budget_mib": throughput_mib, "context": contexts[0],
            "decode_tokens": decode_tokens, "max_batch": max_batch,
            "caches": _spec_meta(specs),
            "machine": machine_info(threads), "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "seconds": seconds,
            "command": command or "sinkcache bench --throughput-mib",
        }
        return {"meta": tmeta, "throughput": trows, "paths": throughput.write(trows, tmeta, out_dir)}
    dtype_bytes = param.element_size()
    rows = summarize(runs, specs, dtype_bytes)
    meta = {
        "model": model_name,
        **where,
        "contexts": list(contexts),
        "reps": reps,
        "decode_tokens": decode_tokens,
        "budget": budget,
        "caches": _spec_meta(specs),
        "machine": machine_info(threads),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": seconds,
        "command": command or "sinkcache bench",
        "peak_rss_method": "in process: VmHWM reset via /proc/self/clear_refs before each cell, minus RSS at cell start",
    }
    paths = write_results(runs, rows, meta, out_dir)
    return {"meta": meta, "rows": rows, "paths": paths}


def format_rows(rows: Sequence[dict]) -> str:
    """A compact console table of the summary rows (the ratios the issue asks to print)."""
    head = f"{'ctx':>6} {'cache':14s} {'prefill s':>9} {'x':>5} {'1st ms':>7} {'x':>5} {'tok/s':>7} {'x':>5} {'KV MiB':>8} {'x':>6} {'x16':>6} {'RSS+MiB':>8} {'agree':>5}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['context']:6d} {r['cache']:14s} {r['prefill_s']:9.2f} {r['prefill_x']:5.2f} "
            f"{r['first_step_ms']:7.0f} {r['first_step_x']:5.2f} {r['decode_tps']:7.1f} "
            f"{r['decode_x']:5.2f} {r['kv_bytes'] / 2**20:8.1f} {r['kv_x']:6.2f} {r['kv_x16']:6.2f} "
            f"{r['rss_delta'] / 2**20:8.0f} {r['agree']:5.2f}"
        )
    return "\n".join(lines)
