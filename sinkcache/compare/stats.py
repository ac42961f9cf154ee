"""How sure a difference is: paired bootstrap confidence intervals over documents.

Two policies scored on the *same* documents are compared per document (``b[i] - a[i]``), which
removes the between-document variance that dominates unpaired intervals. A difference is called a
win or a loss only when its interval excludes zero (:func:`verdict`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A mean with its percentile-bootstrap interval (``level`` e.g. 0.95) over ``n`` documents."""

    mean: float
    low: float
    high: float
    n: int
    level: float
    iters: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] (n={self.n})"


def bootstrap_mean(values: Sequence[float], *, iters: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean of ``values`` (documents resampled with replacement).

    Raises on fewer than 2 values (no interval exists) and on a ``level`` outside (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1), e.g. 0.95")
    if iters < 100:
        raise ValueError(f"iters={iters!r} is too few for a percentile interval; use >= 100")
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.ndim != 1 or x.numel() < 2:
        raise ValueError(f"need >= 2 paired values for an interval, got {x.numel()}")
    if not torch.isfinite(x).all():
        raise ValueError("values contain NaN or inf")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (iters, x.numel()), generator=gen)
    means = x[idx].mean(dim=1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Interval(float(x.mean()), float(lo), float(hi), int(x.numel()), level, iters)


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, iters: int = 10_000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval of ``mean(b - a)`` over documents scored by both (same order, same documents)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same documents: {len(a)} vs {len(b)} values")
    return bootstrap_mean([y - x for x, y in zip(a, b)], iters=iters, level=level, seed=seed)


def verdict(diff: Interval, *, higher_is_better: bool, negligible: float = 0.0) -> str:
    """``"win"`` / ``"loss"`` for ``b`` against ``a`` only when the interval excludes zero, else ``"tie"``.

    ``negligible``: an interval lying wholly inside ``(-negligible, +negligible)`` is a ``"tie"``
    even when it excludes zero. Two caches that keep the same tokens can differ by float rounding
    (a different summation order), and a 1e-7 bits/byte difference resolved over hundreds of
    documents is not a loss anyone can observe.
    """
    if negligible < 0:
        raise ValueError(f"negligible={negligible!r} must be >= 0")
    if not diff.excludes_zero() or max(abs(diff.low), abs(diff.high)) < negligible:
        return "tie"
    better = diff.mean > 0 if higher_is_better else diff.mean < 0
    return "win" if better else "loss"


def _check(iters: int, level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1), e.g. 0.95")
    if iters < 100:
        raise ValueError(f"iters={iters!r} is too few for a percentile interval; use >= 100")


def _percentiles(stats: torch.Tensor, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(stats, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def stratified_mean(
    per_task: Mapping[str, Sequence[float]], *, iters: int = 10_000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval of a suite score, the mean over tasks of each task's mean over its documents.

    Documents are resampled within each task (a task never borrows another's documents), so the
    interval reflects how many documents each task has. ``n`` is the total number of documents.
    Pass per-document differences of two cells to get a paired interval of their suite difference
    (the suite score is linear in the documents' values).
    """
    _check(iters, level)
    tasks = [t for t, v in per_task.items() if len(v)]
    if not tasks:
        raise ValueError("no documents")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(iters, dtype=torch.float64)
    point, n = 0.0, 0
    for t in tasks:
        x = torch.as_tensor(list(per_task[t]), dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError(f"task {t}: values contain NaN or inf")
        idx = torch.randint(0, x.numel(), (iters, x.numel()), generator=gen)
        total += x[idx].mean(dim=1)
        point += float(x.mean())
        n += x.numel()
    if n < 2:
        raise ValueError(f"need >= 2 documents for an interval, got {n}")
    lo, hi = _percentiles(total / len(tasks), level)
    return Interval(point / len(tasks), lo, hi, n, level, iters)


def ratio_of_sums(
    num: Sequence[float], den: Sequence[float], *, iters: int = 10_000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval of ``sum(num) / sum(den)`` with documents resampled in pairs (e.g. bits per byte:
    ``num`` = a document's negative log2-likelihood, ``den`` = its bytes). With ``num`` the
    per-document difference of two cells on the same texts, it is the paired bits/byte difference."""
    _check(iters, level)
    a = torch.as_tensor(list(num), dtype=torch.float64)
    b = torch.as_tensor(list(den), dtype=torch.float64)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"need >= 2 paired (num, den) values, got {a.numel()} and {b.numel()}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (iters, a.numel()), generator=gen)
    lo, hi = _percentiles(a[idx].sum(1) / b[idx].sum(1), level)
    return Interval(float(a.sum() / b.sum()), lo, hi, int(a.numel()), level, iters)
