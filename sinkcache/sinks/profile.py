"""``profile=``: sinks by token id per (layer, kv head), from a profile measured once offline.

A profile (JSON; built by ``sinkcache profile MODEL``, :mod:`sinkcache.profile`) lists, for every
layer and kv head, the token ids that acted as sinks there on calibration text. At run time this
selector only looks ids up (no attention is computed); loading and saving profiles lives here so
that the runtime core never imports the measuring tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..context import TokenContext
from .base import SinkSelector

PROFILE_FORMAT = "sinkcache-profile"
PROFILE_VERSION = 1
PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


def shipped_profile_path(name: str) -> Path | None:
    """Path of the profile shipped for built-in alias ``name`` (``smollm2-135m``), or None."""
    key = name.strip().lower().replace("_", "-")
    p = PROFILE_DIR / f"{key}.json"
    return p if p.is_file() else None


def save_profile(profile: dict[str, Any], path: str | Path) -> Path:
    """Write ``profile`` as JSON (creating parent directories)."""
    _validate(profile)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(profile, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def load_profile(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A profile from a dict, a JSON file, or the name of a built-in model with a shipped profile."""
    if isinstance(source, dict):
        return _validate(source)
    p = Path(source)
    if not p.is_file():
        shipped = shipped_profile_path(str(source))
        if shipped is None:
            known = sorted(x.stem for x in PROFILE_DIR.glob("*.json")) if PROFILE_DIR.is_dir() else []
            raise ValueError(
                f"profile {str(source)!r}: no such file, and no shipped profile of that name "
                f"(shipped: {', '.join(known) or 'none'})"
            )
        p = shipped
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read profile {p}: {exc}") from exc
    return _validate(data)


def _validate(profile: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not a sinkcache profile (expected format={PROFILE_FORMAT!r})")
    if int(profile.get("version", 0)) > PROFILE_VERSION:
        raise ValueError(f"profile version {profile.get('version')} is newer than this sinkcache ({PROFILE_VERSION})")
    layers = profile.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and isinstance(x.get("heads"), list) for x in layers):
        raise ValueError("profile has no valid 'layers' list")
    return profile


class ProfileSinks(SinkSelector):
    """Sinks by token id from a profile: the first ``n_first`` tokens always, then, in layer ``l``
    and kv head ``h``, every token whose id the profile lists for ``(l, h)``.

    Args:
        profile: a profile dict, a JSON path or a built-in alias with a shipped profile.
        n_first: leading tokens that are always sinks (default: the profile's ``n_first``).
        max_sinks: cap per (row, kv head, layer), as for other selectors.

    Marks are ``[B, kv_heads, C]`` when the layer's key heads match the profile, else the union of
    the layer's lists ``[B, 1, C]``. Layers the profile does not cover get only the first-token rule.
    """

    name = "profile"
    needs_ids = True

    def __init__(self, profile: str | Path | dict[str, Any], n_first: int | None = None, max_sinks: int | None = None):
        data = load_profile(profile)
        nf = int(data.get("n_first", 1)) if n_first is None else n_first
        super().__init__(n_first=nf, max_sinks=max_sinks)
        self.profile = data
        self.model = data.get("model")
        self._per_head: dict[int, list[torch.Tensor]] = {}
        self._union: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(data["layers"]):
            idx = int(layer.get("layer", i))
            heads = [torch.tensor(sorted(int(x) for x in h), dtype=torch.long) for h in layer["heads"]]
            self._per_head[idx] = heads
            self._union[idx] = torch.unique(torch.cat(heads)) if heads else torch.empty(0, dtype=torch.long)

    def ids_for(self, layer_idx: int) -> list[list[int]]:
        """The listed ids of ``layer_idx``, one list per kv head."""
        return [h.tolist() for h in self._per_head.get(layer_idx, [])]

    def mark(self, layer_idx: int, cols: torch.Tensor, ctx: TokenContext, keys: torch.Tensor, attention=None):
        b, hk = keys.shape[0], keys.shape[1]
        first = self.first_mask(cols, ctx, b)
        union = self._union.get(layer_idx)
        if union is None or union.numel() == 0:
            return first
        ids = ctx.ids_at(cols, b)
        if ids is None:
            return first
        ids = ids.to(keys.device)
        pad = ctx.pad_counts(b, cols.device)
        real = (cols.view(1, -1) >= pad.view(-1, 1)).unsqueeze(1).to(keys.device)
        heads = self._per_head[layer_idx]
        if len(heads) == hk:
            listed = torch.stack([torch.isin(ids, h.to(keys.device)) for h in heads], dim=1)  # [B, Hk, C]
        else:
            listed = torch.isin(ids, union.to(keys.device)).unsqueeze(1)
        return first.to(keys.device) | (listed & real)

    def __repr__(self) -> str:
        n = sum(h.numel() for hs in self._per_head.values() for h in hs)
        return (
            f"ProfileSinks(model={self.model!r}, n_first={self.n_first}, max_sinks={self.max_sinks}, "
            f"entries={n}, layers={len(self._per_head)})"
        )
