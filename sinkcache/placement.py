"""Where a model runs: parse ``--device``/``--dtype``, and read back what a built model really uses.

Tooling only (``sinkcache eval``/``compare``); ``import sinkcache`` does not load it.
"""

from __future__ import annotations

import os
from typing import Any

#: dtype spellings accepted by ``--dtype`` -> the torch name.
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
}
#: Environment variables a ``torchrun``/``accelerate launch`` rank carries; a child that must run
#: alone (one compare cell) is started without them.
DIST_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE",
)


def resolve_device(device: str | None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (``None``/``auto``: CUDA when available, else CPU).

    Raises ValueError naming the value when it cannot run here (no silent fallback to CPU)."""
    import torch

    text = "auto" if device is None else str(device).strip().lower()
    if text in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; allowed here: auto, cpu")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return text
    raise ValueError(f"--device {device!r}: allowed: auto, cpu, cuda, cuda:N")


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The torch dtype name for ``--dtype`` (``None``: bfloat16 on CUDA, float32 on CPU; ``auto``:
    the checkpoint's own dtype, as ``from_pretrained`` reads it)."""
    if dtype is None or not str(dtype).strip():
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    text = str(dtype).strip().lower()
    if text == "auto":
        return "auto"
    if text not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r}: allowed: auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[text]


def rank_device(device: str, local_rank: int) -> str:
    """The device one rank of a launch uses: ``cuda`` -> ``cuda:<local rank>``; others as given."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def dist_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of a ``torchrun``/``accelerate launch`` process; ``(0, 1, 0)`` alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def placement(model: Any) -> dict[str, Any]:
    """What ``model`` really runs on, read from its parameters and the loaded torch/transformers."""
    import torch
    import transformers

    params = list(model.parameters())
    devices = sorted({str(p.device) for p in params})
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.is_floating_point()})
    out: dict[str, Any] = {
        "device": devices[0] if len(devices) == 1 else devices,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if any(d.startswith("cuda") for d in devices):
        out["gpu"] = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices if d.startswith("cuda")})
    return out
