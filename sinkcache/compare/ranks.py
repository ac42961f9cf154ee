"""The ranks of an ``accelerate launch`` (or ``torchrun``) sweep: who runs which job, and the barrier.

Each rank runs its share of the sweep's jobs (fork-group document shards and peer cells, dealt
round-robin) as its own single-process cells; rank 0 waits for all of them, then merges the
shards and writes the one results file.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")


def my_share(items: list[T], rank: int, world: int) -> list[T]:
    """The items rank ``rank`` of ``world`` runs: positions ``rank``, ``rank + world``, ..."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}: need 0 <= rank < world size")
    return [x for i, x in enumerate(items) if i % world == rank]


def barrier() -> None:
    """Wait for every rank (gloo: works for CPU and GPU launches; the group is made on first use,
    with a week's timeout since a rank's share of a grid can run for hours)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()


def close() -> None:
    """Leave the process group (if one was made)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
