"""Rotary position re-rotation for ``positions="shifted"`` eviction (StreamingLLM).

Keys arrive post-RoPE at their true positions. To keep every query-key distance within the
budget (inside the model's trained range however long the stream), the evicting layer stores keys
*un-rotated* and, at each step, rotates the held ones to contiguous positions that end right before
the new tokens. Cos/sin come from the model's own rotary module, so RoPE scaling variants
(``attention_scaling``, per-layer-type frequencies as in Gemma 3) are handled as the model does.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """Cos/sin of a model's rotary embedding for arbitrary positions.

    Args:
        module: the model's rotary embedding module (``model.model.rotary_emb``).
        layer_type: passed to modules that keep one frequency set per layer type (Gemma 3).
    """

    def __init__(self, module: torch.nn.Module, layer_type: str | None = None) -> None:
        self.module = module
        self.layer_type = layer_type
        scale = getattr(module, f"{layer_type}_attention_scaling", None) if layer_type else None
        self.scale = float(scale if scale is not None else getattr(module, "attention_scaling", 1.0))

    @classmethod
    def from_model(cls, model, layer_type: str | None = None) -> Rotary:
        for mod in model.modules():
            if type(mod).__name__.endswith("RotaryEmbedding"):
                needs_type = hasattr(mod, "layer_types")
                return cls(mod, layer_type if needs_type else None)
        raise ValueError(f"positions='shifted' needs a RoPE model; {type(model).__name__} has no rotary embedding module")

    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[B, T]`` -> cos, sin ``[B, T, D]`` in ``like``'s dtype (scaling included)."""
        args = (like, positions.to(like.device))
        out = self.module(*args, self.layer_type) if self.layer_type else self.module(*args)
        return out[0].to(like.dtype), out[1].to(like.dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply RoPE at ``positions`` ``[B, T]`` to un-rotated ``x`` ``[B, H, T, D]``."""
        cos, sin = self.cos_sin(positions, x)
        return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`rotate`: RoPE is a rotation times ``scale``, so apply R^T and divide by scale^2."""
        cos, sin = self.cos_sin(positions, x)
        return (x * cos.unsqueeze(1) - rotate_half(x) * sin.unsqueeze(1)) / (self.scale**2)
