"""``sinkcache demo``: what sink-aware KV compression buys, measured on seeded retrieval questions.

The questions are fixed before any policy runs: ``n`` pass-key questions (a 5-digit key hidden at
evenly spaced depths of a ``context``-token made-up report, seed ``seed``), answered greedily. A
question counts only if the full cache answers it (a compressed cache cannot be blamed for what the
model never knew); every row is then scored on exactly those questions.

Rows (each cache built by this module, its settings read back from the built object):

* the full cache (the reference);
* ``SinkCache()`` as shipped (int4, first-token sink);
* int2 with the first-token sink, and int2 with no sink (plain KIVI) — the sink is the difference;
* sink-aware eviction (measured sinks, attention-scored) and StreamingLLM (first 4 tokens + the
  recent window) at the same budget, a percentage of each prompt;
* transformers' ``QuantizedCache`` (quanto backend) at int4 and int2, the peer a user would pick
  otherwise (left out, with a note, when optimum-quanto is not installed).

Bytes are the caches' own accounting (``memory_bytes()``) after each answer, averaged over questions.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._console import format_bytes, format_table

#: Chosen before looking at which policy wins (and kept): see the module docstring.
DEFAULT_QUESTIONS = 8
DEFAULT_CONTEXT = 512
DEFAULT_BUDGET_PERCENT = 25.0
DEFAULT_SEED = 0
MAX_NEW_TOKENS = 8

_TOWNS = ("Ashford", "Belden", "Corvin", "Dunmore", "Elston", "Farrow", "Glenhaven", "Harlow", "Istvan Bay")
_PEOPLE = ("Ada Kessler", "Bruno Maalouf", "Chiara Lind", "Dmitri Ostrov", "Elena Voss", "Farid Nasser")
_PRODUCTS = ("tableware", "lamp shades", "window panes", "laboratory flasks", "mosaic tiles", "perfume bottles")


@dataclass(frozen=True)
class Question:
    """One retrieval question: the prompt text, the key it hides and where (0..1 of the report)."""

    text: str
    answer: str
    depth: float


def _paragraph(rng: random.Random, year: int) -> str:
    return (
        f"In {year}, the Veltrana Glassworks Cooperative sold {rng.randint(1200, 9800):,} crates of "
        f"{rng.choice(_PRODUCTS)} through its warehouse in {rng.choice(_TOWNS)}. The workshop was led by "
        f"{rng.choice(_PEOPLE)}, who introduced {rng.randint(2, 9)} new colours and trained "
        f"{rng.randint(10, 60)} apprentices."
    )


def questions(tok: Any, n: int = DEFAULT_QUESTIONS, context: int = DEFAULT_CONTEXT, seed: int = DEFAULT_SEED) -> list[tuple[Question, Any]]:
    """``n`` deterministic pass-key questions of about ``context`` tokens each, with their inputs.

    Depths are spread evenly over (0, 1); keys, reports and depths depend on ``seed`` only.
    """
    if n < 1 or context < 64:
        raise ValueError(f"questions: n={n} must be >= 1 and context={context} >= 64")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        depth = (i + 0.5) / n
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        paras: list[str] = []
        year = 1950 + rng.randint(0, 30)
        while True:
            paras.append(_paragraph(rng, year))
            year += 1
            body = paras[:]
            body.insert(round(depth * len(body)), needle)
            text = (
                "There is an important piece of information hidden inside a long report. Find it and "
                "memorize it.\n\n" + "\n\n".join(body) + "\n\nWhat is the pass key? The pass key is"
            )
            enc = tok(text, return_tensors="pt")
            if enc["input_ids"].shape[1] >= context:
                out.append((Question(text=text, answer=key, depth=depth), enc))
                break
    return out


@dataclass
class Row:
    """One demo row: how to build its cache for a prompt of ``n`` tokens."""

    label: str
    group: str  # reference / ours / baseline / peer
    build: Callable[[int], Any]
    correct: int = 0
    asked: int = 0
    bytes: list[int] = field(default_factory=list)
    full_bytes: list[int] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    built: dict[str, Any] = field(default_factory=dict)


def demo_rows(model: Any, tok: Any, budget_percent: float = DEFAULT_BUDGET_PERCENT, score: str | None = None) -> tuple[list[Row], list[str]]:
    """The demo's rows (full cache first) and notes on rows left out."""
    from . import SinkCache
    from .compare.lms import fit_budget
    from .scores import DEFAULT_SCORE

    if not 0 < budget_percent <= 100:
        raise ValueError(f"budget_percent={budget_percent!r} must be in (0, 100]")
    frac = budget_percent / 100.0
    score = DEFAULT_SCORE if score is None else score
    pct = f"{budget_percent:g}%"

    def sink(**kw: Any) -> Callable[[int], Any]:
        return lambda n: SinkCache(**kw, model=model, tokenizer=tok)

    def evict(kw: dict[str, Any], mode: str) -> Callable[[int], Any]:
        return lambda n: SinkCache(**fit_budget(kw, frac, n, mode), model=model, tokenizer=tok)

    rows = [
        Row("full cache", "reference", sink(policy="full")),
        Row("SinkCache() default: int4, first-token sink", "ours", sink()),
        Row("int2, first-token sink", "ours", sink(policy="quantize", bits=2)),
        Row("int2, no sink (KIVI)", "baseline", sink(policy="quantize", bits=2, sinks="none")),
        Row(f"evict {pct}: measured sinks, {score} scores", "ours", evict({"policy": "evict", "sinks": "auto", "score": score}, "default")),
        Row(f"evict {pct}: StreamingLLM (first 4 + recent)", "baseline", evict({"policy": "evict", "sinks": "first", "n_first": 4, "score": "keynorm"}, "rest")),
    ]
    notes = []
    try:
        import optimum.quanto  # noqa: F401

        from .compare.lms import PeerQuantCache

        def quanto(bits: int) -> Callable[[int], Any]:
            return lambda n: PeerQuantCache("quanto", model.config, bits)

        for bits in (4, 2):
            rows.append(Row(f"transformers QuantizedCache, quanto int{bits}", "peer", quanto(bits)))
    except ImportError:
        notes.append("transformers' QuantizedCache rows left out: optimum-quanto is not installed (pip install optimum-quanto)")
    return rows, notes


def _answer(model: Any, enc: Any, cache: Any) -> tuple[list[int], float]:
    """Greedy answer from a cache that holds all prompt tokens but the last (as ``sinkcache eval``
    does: the first answer token is already predicted against the compressed prompt)."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, past_key_values=cache, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist(), time.perf_counter() - t0


def _prefill(model: Any, enc: Any, cache: Any) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=enc["input_ids"][:, :-1], attention_mask=enc["attention_mask"][:, :-1], past_key_values=cache, use_cache=True)
    return time.perf_counter() - t0


def _describe(cache: Any) -> dict[str, Any]:
    d = cache.describe() if hasattr(cache, "describe") else {}
    keys = ("policy", "bits", "budget", "window", "sinks", "n_first", "score", "backend", "nbits")
    return {k: d[k] for k in keys if d.get(k) is not None}


def _shared_prefill(model: Any, enc: Any, caches: Sequence[Any]) -> Any:
    """One recorded forward of the prompt for every SinkCache row (:class:`~sinkcache.fork.SharedPrefill`):
    what each would have computed itself, so only the quanto rows prefill again."""
    from .fork import SharedPrefill, fresh_detector, prefill_needs

    detector, queries, refine_queries = prefill_needs(caches)
    shared = SharedPrefill(model, detector=fresh_detector(detector), score_queries=queries, refine_queries=refine_queries)
    _prefill(model, enc, shared.cache)
    return shared


def run_demo(
    model: Any, tok: Any, qs: Sequence[tuple[Question, Any]], rows: list[Row], progress: bool = True
) -> tuple[list[Question], float]:
    """Answer every question with every row; returns the questions kept (the full cache answers
    them) and the seconds spent on prompt forwards. Rows are filled in place."""
    from tqdm.auto import tqdm

    kept: list[Question] = []
    prefill_s = 0.0
    bar = tqdm(total=len(qs) * len(rows), desc="demo", unit="answer", file=sys.stderr, disable=not progress)
    for q, enc in qs:
        n = int(enc["input_ids"].shape[1])
        caches = [r.build(n) for r in rows]
        shared_ix = [i for i, r in enumerate(rows) if r.group != "peer"]
        t0 = time.perf_counter()
        shared = _shared_prefill(model, enc, [caches[i] for i in shared_ix])
        prefill_s += time.perf_counter() - t0
        try:
            for i, (row, cache) in enumerate(zip(rows, caches, strict=True)):
                if i in shared_ix:
                    shared.fork_into(cache)
                    cache.compress()
                else:
                    prefill_s += _prefill(model, enc, cache)
                ids, sec = _answer(model, enc, cache)
                right = q.answer in str(tok.decode(ids, skip_special_tokens=True))
                if i == 0:
                    full = int(cache.memory_bytes())
                    if not right:
                        break  # the model does not know it: the other rows are not asked
                    kept.append(q)
                row.built = _describe(cache)
                row.asked += 1
                row.correct += int(right)
                row.bytes.append(int(cache.memory_bytes()))
                row.full_bytes.append(full)
                row.tokens, row.seconds = row.tokens + len(ids), row.seconds + sec
        finally:
            shared.close()
            for c in caches:
                c.detach()
        bar.update(len(rows))
    bar.close()
    return kept, prefill_s


def plot_demo(rows: Sequence[Row], path: str | Path, title: str) -> Path:
    """Accuracy vs KV bytes (% of the full cache), one point per row."""
    from .plots import _pyplot

    plt = _pyplot()
    colors = {"reference": "#000000", "ours": "#d62728", "baseline": "#7f7f7f", "peer": "#1f77b4"}
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    for r in rows:
        if not r.asked:
            continue
        x = 100.0 * sum(r.bytes) / max(1, sum(r.full_bytes))
        y = r.correct / r.asked
        ax.scatter([x], [y], color=colors[r.group], s=60, zorder=3)
        below = r.group == "peer"  # peers sit left of ours at the same accuracy: label them underneath
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(6, -12 if below else 4), fontsize=8)
    ax.set_xlabel("KV cache held, % of the full cache (measured bytes)")
    ax.set_ylabel("questions answered (of those the full cache answers)")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlim(0, 110)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in colors.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(rows: Sequence[Row], kept: int, asked: int) -> str:
    """The demo's table (one line per row) and how to read it."""
    table = []
    for r in rows:
        mem = sum(r.bytes) / max(1, len(r.bytes))
        full = sum(r.full_bytes) / max(1, len(r.full_bytes))
        table.append(
            [
                r.label,
                f"{r.correct}/{r.asked}" if r.asked else "-",
                format_bytes(int(mem)) if r.bytes else "-",
                f"{100 * mem / full:.0f}%" if r.bytes else "-",
                f"{full / mem:.1f}x" if r.bytes and mem else "-",
                f"{r.tokens / r.seconds:.1f}" if r.seconds else "-",
            ]
        )
    head = ["cache", "right", "KV bytes", "% of full", "ratio", "tok/s"]
    built = "\n".join(
        f"  {r.label}: " + ", ".join(f"{k}={v}" for k, v in r.built.items()) for r in rows if r.built
    )
    return (
        format_table(head, table, align="lrrrrr")
        + ("\n\nbuilt (read back from each cache's describe(), last question):\n" + built if built else "")
        + f"\n\nright: of the {kept} questions the full cache answers ({asked} asked; a 5-digit pass key hidden in a "
        "long report); KV bytes: mean held after each answer; tok/s: answer tokens per second (the prompt's "
        "forward, shared by the SinkCache rows, is timed apart)."
    )
