"""sinkcache: sink-aware KV-cache compression for Hugging Face transformers."""

from .cache import SinkCache
from .policies import EvictPolicy, FullPolicy, HybridPolicy, Policy, QuantizePolicy, make_policy
from .sinks import FirstSinks, NoSinks, PunctSinks, SinkSelector, punctuation_token_ids

__version__ = "0.1.0"

__all__ = [
    "SinkCache",
    "Policy",
    "FullPolicy",
    "EvictPolicy",
    "QuantizePolicy",
    "HybridPolicy",
    "make_policy",
    "SinkSelector",
    "NoSinks",
    "FirstSinks",
    "PunctSinks",
    "punctuation_token_ids",
    "__version__",
]
