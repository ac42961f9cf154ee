"""The sweep plan of ``sinkcache compare``: policies, their memory knobs, and the cells they make.

A *cell* is one policy at one memory setting, run over the task suite. Eviction-type policies
(ours, the in-package baselines and kvpress presses) take a budget given as a **fraction of each
request's full KV cache** (so eviction matches a memory fraction per request whatever its length);
quantizers take a bit width; the hybrid takes both. What each cell really holds is measured
(``memory_bytes()`` for ours, the peers' actual tensors) and reported next to the nominal setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: Policy name -> (group, kind, description). kind: "full", "evict" (budget), "quant" (bits),
#: "hybrid" (bits and budget).
POLICIES: dict[str, tuple[str, str, str]] = {
    "full": ("reference", "full", "full cache (DynamicCache-equivalent)"),
    "sink-evict": ("ours", "evict", "sink-aware eviction: auto sinks + recent window (budget/2) + best key-norm score"),
    "sink-evict-tova": ("ours", "evict", "sink-aware eviction scored by the newest query's attention (TOVA-class)"),
    "sink-evict-tova-w32": ("ours", "evict", "sink-aware TOVA eviction with a 32-token recent window (default: min(256, budget/2))"),
    "sink-evict-tova-pooled": ("ours", "evict", "sink-aware TOVA eviction, attention averaged over the layer's heads (kvpress's TOVA score)"),
    "sink-evict-tova-pooled-w32": ("ours", "evict", "the default eviction (tova-pooled) with a 32-token recent window (default: min(256, budget/2))"),
    "sink-evict-vatp-w32": ("ours", "evict", "sink-aware eviction scored by attention times value norm (VATP), pooled over heads, 32-token window"),
    "sink-evict-vatp-wshrink": ("ours", "evict", "VATP eviction with a window of min(32, budget // 8) tokens"),
    "sink-evict-tova-span-w32": ("ours", "evict", "sink-aware tova-pooled eviction, scores max-pooled over 5 neighbouring tokens, 32-token window"),
    "sink-evict-snapkv": ("ours", "evict", "sink-aware eviction scored by the last 32 queries' attention (SnapKV-class)"),
    "sink-evict-h2o": ("ours", "evict", "sink-aware eviction scored by accumulated attention (H2O-class)"),
    "sink-quant": ("ours", "quant", "sink-aware KIVI quantization: auto sinks kept exact"),
    "sink-quant-first": ("ours", "quant", "KIVI quantization with the library's default sinks: the first token kept exact"),
    "sink-quant-refine": ("ours", "quant", "sink-aware KIVI + refinement: first-token sink exact, the most attended 14% of each block +2 bits"),
    "sink-quant-auto-refine": ("ours", "quant", "sink-aware KIVI + refinement: measured (auto) sinks exact, the most attended 14% of each block +2 bits"),
    "sink-hybrid": ("ours", "hybrid", "sink-aware hybrid: KIVI quantization + eviction of whole groups"),
    "recent-evict": ("baseline", "evict", "no-sink eviction: pure recent window"),
    "streamingllm": ("baseline", "evict", "StreamingLLM: first 4 tokens + recent window"),
    "nosink-evict-tova-pooled": ("baseline", "evict", "the default eviction without sinks: tova-pooled scores + recent window, sinks='none'"),
    "kivi": ("baseline", "quant", "plain KIVI quantization (no sink protection)"),
    "nosink-hybrid": ("baseline", "hybrid", "the hybrid without sinks: KIVI quantization + eviction of whole groups"),
    "hf-quanto": ("peer", "quant", "transformers QuantizedCache, optimum-quanto backend"),
    "hf-hqq": ("peer", "quant", "transformers QuantizedCache, HQQ backend"),
    "kvpress-streaming_llm": ("peer", "evict", "kvpress StreamingLLMPress"),
    "kvpress-snapkv": ("peer", "evict", "kvpress SnapKVPress"),
    "kvpress-knorm": ("peer", "evict", "kvpress KnormPress"),
    "kvpress-tova": ("peer", "evict", "kvpress TOVAPress"),
    "kvpress-expected_attention": ("peer", "evict", "kvpress ExpectedAttentionPress"),
}

DEFAULT_POLICIES = tuple(POLICIES)
DEFAULT_BUDGETS = (50.0, 25.0, 12.5)  # percent of each request's full KV
DEFAULT_BITS = (4, 2)
DEFAULT_HYBRID_BITS = (4,)

#: The suite's tasks and the metric each one is scored by (accuracy tasks; ppl separately).
ACCURACY_METRICS: dict[str, str] = {
    "sinkcache_passkey": "exact_match,first_number",
    "sinkcache_niah_multikey": "exact_match,first_number",
    "sinkcache_kv_retrieval": "exact_match,first_number",
    "sinkcache_variable_tracking": "exact_match,first_number",
    "sinkcache_arithmetic_cot": "exact_match,strict_match",
    "sinkcache_facts_mc": "acc,none",
}
PPL_TASK = "sinkcache_docstring_ppl"
PPL_METRIC = "bits_per_byte,none"
SUITE_TASKS = (*ACCURACY_METRICS, PPL_TASK)

#: lm-eval's RULER variants that run offline. A compare task is one variant at one document length,
#: written ``task@length`` (``niah_single_1@1024``): RULER scores each length apart, and so do we.
RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
DEFAULT_RULER_LENGTHS = (1024, 2048)


def ruler_split(task: str) -> tuple[str, int] | None:
    """``("niah_single_1", 1024)`` for ``"niah_single_1@1024"``; None for a suite task."""
    base, sep, length = task.partition("@")
    if not sep or base not in RULER_TASKS or not length.isdigit():
        return None
    return base, int(length)


def ruler_parts(task: str) -> tuple[str, int]:
    """:func:`ruler_split` for a task known to be a RULER task (raises otherwise)."""
    sp = ruler_split(task)
    if sp is None:
        raise ValueError(f"{task!r} is not a RULER task at a length (TASK@LENGTH)")
    return sp


def is_ruler_task(task: str) -> bool:
    return ruler_split(task) is not None


def expand_tasks(tasks: list[str] | tuple[str, ...], ruler_lengths: list[int] | tuple[int, ...] = DEFAULT_RULER_LENGTHS) -> list[str]:
    """The compare tasks that ``--tasks`` names: ``suite`` (the offline suite), ``ruler`` (every
    offline RULER variant at every length of ``ruler_lengths``), a RULER variant (at every length),
    ``variant@length``, or a suite task. Raises on anything else, naming what is allowed."""
    from ..ruler import DOWNLOADING

    bad_len = [n for n in ruler_lengths if isinstance(n, bool) or not isinstance(n, int) or n < 256]
    if bad_len or not ruler_lengths:
        raise ValueError(f"RULER lengths {list(ruler_lengths)!r}: give integers >= 256, e.g. 1024,2048")
    out: list[str] = []
    for t in tasks:
        if t == "suite":
            new = list(SUITE_TASKS)
        elif t in ("ruler", "ruler_offline"):
            new = [f"{b}@{n}" for b in RULER_TASKS for n in ruler_lengths]
        elif t in RULER_TASKS:
            new = [f"{t}@{n}" for n in ruler_lengths]
        elif t in SUITE_TASKS or is_ruler_task(t):
            new = [t]
        elif t.partition("@")[0] in DOWNLOADING:
            raise ValueError(f"task {t!r} cannot run offline: {DOWNLOADING[t.partition('@')[0]]}; offline RULER tasks: {', '.join(RULER_TASKS)}")
        else:
            raise ValueError(
                f"unknown task {t!r}; allowed: suite, ruler, {', '.join(SUITE_TASKS)}, {', '.join(RULER_TASKS)} "
                "(a RULER task at one length: TASK@LENGTH)"
            )
        if any(ruler_parts(x)[1] < 256 for x in new if is_ruler_task(x)):
            raise ValueError(f"task {t!r}: RULER lengths must be >= 256 tokens")
        out += [x for x in new if x not in out]
    return out

#: Knobs shared by our quantizers and the KIVI baseline (the same for both, so only sinks differ).
QUANT_WINDOW = 32
QUANT_GROUP = 32
#: The hybrid's knobs: small, so that 12.5-50% budgets of 300-800-token requests leave evictable groups.
HYBRID_WINDOW = 16
HYBRID_GROUP = 16


@dataclass(frozen=True)
class Cell:
    """One policy at one memory setting over the tasks."""

    policy: str
    budget: float | None = None  # percent of the request's full KV (evict/hybrid/kvpress)
    bits: int | None = None  # quantizers and hybrid
    tasks: tuple[str, ...] = field(default=SUITE_TASKS)

    @property
    def group(self) -> str:
        return POLICIES[self.policy][0]

    @property
    def kind(self) -> str:
        return POLICIES[self.policy][1]

    @property
    def cell_id(self) -> str:
        parts = [self.policy]
        if self.bits is not None:
            parts.append(f"{self.bits}bit")
        if self.budget is not None:
            parts.append(f"b{self.budget:g}")
        if any(is_ruler_task(t) for t in self.tasks):
            parts.append("ruler")  # a separate cell (and file) from the same policy on the suite
        return "_".join(parts)

    @property
    def task_set(self) -> str:
        """``"ruler"`` when the cell runs RULER tasks, else ``"suite"`` (pairs are within a task set)."""
        return "ruler" if any(is_ruler_task(t) for t in self.tasks) else "suite"

    @property
    def setting(self) -> str:
        """Nominal memory setting, for the table."""
        parts = []
        if self.bits is not None:
            parts.append(f"int{self.bits}")
        if self.budget is not None:
            parts.append(f"{self.budget:g}% tokens")
        return " + ".join(parts) or "100%"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(policy=d["policy"], budget=d.get("budget"), bits=d.get("bits"), tasks=tuple(d["tasks"]))


def parse_list(text: str | None, conv=str) -> list:
    if text is None:
        return []
    return [conv(t.strip().rstrip("%")) for t in str(text).split(",") if t.strip()]


def plan(
    policies: list[str] | tuple[str, ...] = DEFAULT_POLICIES,
    budgets: list[float] | tuple[float, ...] = DEFAULT_BUDGETS,
    bits: list[int] | tuple[int, ...] = DEFAULT_BITS,
    hybrid_bits: list[int] | tuple[int, ...] = DEFAULT_HYBRID_BITS,
    tasks: list[str] | tuple[str, ...] = SUITE_TASKS,
    hybrid_budgets: list[float] | tuple[float, ...] | None = None,
) -> list[Cell]:
    """The cells, in run order: the reference first, then ours, baselines and peers per policy."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; allowed: {', '.join(POLICIES)}")
    hybrid_budgets = budgets if hybrid_budgets is None else hybrid_budgets
    for b in (*budgets, *hybrid_budgets):
        if not 1 <= float(b) <= 100:
            hint = f" ({b!r} reads as {float(b):g}%; for {100 * float(b):g}% write {100 * float(b):g})" if 0 < float(b) < 1 else ""
            raise ValueError(f"budget {b!r} must be a percentage of the full KV in [1, 100]{hint}")
    for n in (*bits, *hybrid_bits):
        if int(n) not in (2, 4):
            raise ValueError(f"bits {n!r}: compare sweeps 2 and 4 bits (both ours and the peers support them)")
    bad_tasks = [t for t in tasks if t not in SUITE_TASKS and not is_ruler_task(t)]
    if bad_tasks:
        raise ValueError(
            f"unknown tasks {bad_tasks}; allowed: {', '.join(SUITE_TASKS)}, or TASK@LENGTH for the RULER tasks "
            f"{', '.join(RULER_TASKS)} (expand_tasks turns 'suite' and 'ruler' into these)"
        )
    cells: list[Cell] = []
    for p in policies:
        kind = POLICIES[p][1]
        t = tuple(tasks)
        if p.startswith("kvpress-"):
            # kvpress presses compress during prefill only: streaming perplexity has no prefill.
            t = tuple(x for x in t if x != PPL_TASK)
        if not t:
            continue
        if kind == "full":
            cells.append(Cell(p, tasks=t))
        elif kind == "evict":
            cells.extend(Cell(p, budget=float(b), tasks=t) for b in budgets)
        elif kind == "quant":
            cells.extend(Cell(p, bits=int(n), tasks=t) for n in bits)
        else:
            cells.extend(Cell(p, budget=float(b), bits=int(n), tasks=t) for n in hybrid_bits for b in hybrid_budgets)
    return cells


#: Modules that only report, plot, benchmark or parse arguments: they cannot change a cell's numbers,
#: so editing them does not invalidate finished cells (everything else in the package does).
REPORTING_ONLY = frozenset(
    {
        "compare/report.py", "compare/stats.py", "compare/runner.py", "compare/__init__.py", "cli.py", "plots.py",
        "bench.py", "analysis.py", "_console.py", "compare/ranks.py",
    }
)


def code_fingerprint() -> str:
    """A hash of everything that decides a cell's numbers besides its options: the package's
    ``.py`` files (less :data:`REPORTING_ONLY`), the kvpress worker, and the task definitions and
    data under ``evals/``."""
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent
    evals = pkg.parent / "evals"
    files = sorted(p for p in pkg.rglob("*.py") if p.relative_to(pkg).as_posix() not in REPORTING_ONLY)
    for sub, pattern in (("peers", "*.py"), ("tasks", "*"), ("data", "*.jsonl")):
        if (evals / sub).is_dir():
            files += sorted(p for p in (evals / sub).glob(pattern) if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def run_key(
    model: str, limit: int | None, seed: int, cell: Cell, *, code: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> str:
    """What a finished cell must match to be reused when resuming: the model, limit and seed, the
    cell's full configuration (:func:`~sinkcache.compare.cell.lm_options`: every cache knob), where
    it runs (``device`` kind ``cpu``/``cuda`` and ``dtype``) and the code that produced it
    (:func:`code_fingerprint`)."""
    from .cell import lm_options

    blob = json.dumps(
        {
            "model": model, "limit": limit, "seed": seed, "cell": cell.to_dict(), "options": lm_options(cell),
            "code": code if code is not None else code_fingerprint(), "device": device, "dtype": dtype, "v": 3,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
