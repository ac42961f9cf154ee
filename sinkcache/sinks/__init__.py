"""Sink selectors: which cached tokens are attention sinks (kept exact, never evicted).

One file per selector, all behind :class:`SinkSelector` (``mark()`` returns a ``[B, H or 1, C]``
bool mask for a block of columns a layer is about to compress or evict):

* ``none``    — :class:`NoSinks`: nothing protected (the sink-blind baselines).
* ``first``   — :class:`FirstSinks`: the first real token(s) of each row.
* ``punct``   — :class:`PunctSinks`: first token(s) plus every punctuation/newline token id.
* ``auto``    — :class:`AutoSinks`: first token(s) plus keys measured to draw attention, in hooks.
* ``profile`` — :class:`ProfileSinks`: token ids listed per (layer, kv head) by an offline profile.

Only runtime code lives here; measuring profiles (:mod:`sinkcache.profile`) and the
catch/tag/release analysis (:mod:`sinkcache.analysis`) are tools this package never imports.
"""

from .auto import AutoSinks, make_auto_sinks
from .base import SinkSelector
from .first import FirstSinks
from .none import NoSinks
from .profile import ProfileSinks, load_profile, save_profile
from .punct import PunctSinks, punctuation_token_ids

#: What ``SinkCache(sinks=...)`` accepts by name (``profile=`` selects :class:`ProfileSinks`).
SINK_MODES = ("none", "first", "punct", "auto")

__all__ = [
    "SINK_MODES",
    "SinkSelector",
    "NoSinks",
    "FirstSinks",
    "PunctSinks",
    "AutoSinks",
    "ProfileSinks",
    "make_auto_sinks",
    "load_profile",
    "save_profile",
    "punctuation_token_ids",
]
