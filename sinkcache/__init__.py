"""sinkcache: sink-aware KV-cache compression for Hugging Face transformers.

The public names are loaded on first use (PEP 562), so ``sinkcache --help`` and ``--version``
answer without importing torch and transformers (several seconds); ``from sinkcache import
SinkCache`` works as usual.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "SinkCache": "cache",
    "Policy": "policies",
    "FullPolicy": "policies",
    "EvictPolicy": "policies",
    "QuantizePolicy": "policies",
    "HybridPolicy": "policies",
    "make_policy": "policies",
    "Refinement": "refine",
    "SinkSelector": "sinks",
    "NoSinks": "sinks",
    "FirstSinks": "sinks",
    "PunctSinks": "sinks",
    "punctuation_token_ids": "sinks",
}

__all__ = [
    "SinkCache",
    "Policy",
    "FullPolicy",
    "EvictPolicy",
    "QuantizePolicy",
    "HybridPolicy",
    "make_policy",
    "Refinement",
    "SinkSelector",
    "NoSinks",
    "FirstSinks",
    "PunctSinks",
    "punctuation_token_ids",
    "__version__",
]

if TYPE_CHECKING:
    from .cache import SinkCache
    from .policies import EvictPolicy, FullPolicy, HybridPolicy, Policy, QuantizePolicy, make_policy
    from .refine import Refinement
    from .sinks import FirstSinks, NoSinks, PunctSinks, SinkSelector, punctuation_token_ids


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sinkcache' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
