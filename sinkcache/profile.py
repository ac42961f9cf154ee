"""Sink profiles: which token ids act as attention sinks in which layers, measured once offline.

``sinkcache profile MODEL`` (:func:`profile_command`) runs calibration text through the model with
eager attention (see :mod:`sinkcache.analysis`), and for every layer and kv head counts how often
each token id is a sink: its received attention (mean over the next ``span`` queries) is at least
``threshold`` for at least one of the query heads sharing the kv head (``reduce="max"``; ``"mean"``
averages them first, as the runtime detector does). An id is listed for a (layer, kv
head) when it was a sink at least ``min_count`` times and in at least ``min_rate`` of its
occurrences there. The first ``n_first`` tokens are sinks by rule and are not counted.

A cache given a profile (:class:`ProfileSinks`) then marks sinks by token id: no attention is
computed at run time, only a lookup of the ids seen by the cache's forward pre-hook.

Profiles are JSON (:func:`save_profile` / :func:`load_profile`); the built-in models' profiles
ship in ``sinkcache/profiles/<alias>.json`` and load by alias name.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .analysis import attention_pass, default_min_queries, received_from_following, token_class
from .sinks.profile import PROFILE_FORMAT, PROFILE_VERSION, save_profile

DEFAULT_PROFILE_THRESHOLD = 0.1
DEFAULT_PROFILE_SPAN = 64
DEFAULT_MIN_COUNT = 10
DEFAULT_MIN_RATE = 0.2
DEFAULT_CHUNKS = 16
DEFAULT_LENGTH = 1024
DEFAULT_REDUCE = "max"


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@dataclass
class SinkCounts:
    """Raw counts behind a profile (see :func:`measure_sinks`).

    ``occ[l, id]``: scored occurrences of ``id`` (same for every kv head); ``hits[l, h, id]``: how
    many of them were sinks of kv head ``h`` in layer ``l``; ``pos_occ``/``pos_hits``: occurrences,
    and those that were a sink in at least one (layer, kv head).
    """

    occ: torch.Tensor
    hits: torch.Tensor
    pos_occ: torch.Tensor
    pos_hits: torch.Tensor
    layer_types: list[str]
    settings: dict[str, Any]

    def save(self, path: str | Path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> SinkCounts:
        return cls(**torch.load(path, weights_only=False))


def measure_sinks(
    model,
    tokenizer,
    texts: list[str] | list[list[int]],
    *,
    threshold: float = DEFAULT_PROFILE_THRESHOLD,
    span: int = DEFAULT_PROFILE_SPAN,
    n_first: int = 1,
    max_tokens: int = DEFAULT_LENGTH,
    min_queries: int | None = None,
    reduce: str = DEFAULT_REDUCE,
    progress: bool = False,
) -> SinkCounts:
    """Count, per layer / kv head / token id, how often a token is a sink on ``texts``.

    ``texts``: strings (tokenized with the tokenizer's special tokens, cut to ``max_tokens``) or
    lists of token ids (used as given). ``reduce``: how the query heads sharing a kv head are
    combined: ``"max"`` (a sink of any of them; default, since the cache keeps tokens per kv head) or
    ``"mean"`` (their average attention, as :class:`~sinkcache.sinks.AutoSinks` does).
    """
    if not texts:
        raise ValueError("need at least one text")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce={reduce!r}; allowed: max, mean")
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    if span < 1:
        raise ValueError("span must be >= 1")
    cfg = _text_config(model)
    vocab = int(cfg.vocab_size)
    n_layers = int(cfg.num_hidden_layers)
    n_kv = int(cfg.num_key_value_heads)
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    occ = torch.zeros(n_layers, vocab, dtype=torch.long)
    hits = torch.zeros(n_layers, n_kv, vocab, dtype=torch.long)
    pos_occ = torch.zeros(vocab, dtype=torch.long)  # scored occurrences of each id
    pos_hits = torch.zeros(vocab, dtype=torch.long)  # ... that were a sink in at least one (layer, kv head)
    total_tokens = 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        if isinstance(text, str):
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        else:
            ids = torch.as_tensor(text, dtype=torch.long).reshape(1, -1)
        t = ids.shape[1]
        mq = default_min_queries(span, t) if min_queries is None else min_queries
        if t <= n_first + mq:
            continue
        flat = ids[0]
        total_tokens += t
        any_sink = torch.zeros(t, dtype=torch.bool)
        scored = torch.zeros(t, dtype=torch.bool)

        def on_layer(idx, module, weights, hidden, flat=flat, t=t, any_sink=any_sink, scored=scored, mq=mq):
            hq = weights.shape[1]
            group = hq // n_kv
            if reduce == "mean":
                recv = received_from_following(weights[0].view(n_kv, group, t, t).mean(1), span, mq)
            else:
                recv = received_from_following(weights[0], span, mq).view(n_kv, group, t).amax(1)  # [Hk, T]
            valid = ~torch.isnan(recv[0])
            valid[:n_first] = False
            sink = (torch.nan_to_num(recv, nan=0.0) >= threshold) & valid
            occ[idx] += torch.bincount(flat[valid], minlength=vocab)
            for h in range(n_kv):
                hits[idx, h] += torch.bincount(flat[sink[h]], minlength=vocab)
            any_sink.logical_or_(sink.any(0))
            scored.logical_or_(valid)

        attention_pass(model, ids, on_layer)
        pos_occ += torch.bincount(flat[scored], minlength=vocab)
        pos_hits += torch.bincount(flat[any_sink], minlength=vocab)
        if progress:
            print(f"  chunk {i + 1}/{len(texts)}: {t} tokens, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if total_tokens == 0:
        raise ValueError("no text long enough to profile")
    settings = {
        "threshold": threshold,
        "span": span,
        "n_first": n_first,
        "min_queries": min_queries if min_queries is not None else "min(span, max(8, T // 8))",
        "reduce": reduce,
        "texts": len(texts),
        "tokens": total_tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return SinkCounts(occ, hits, pos_occ, pos_hits, layer_types, settings)


def profile_from_counts(
    counts: SinkCounts,
    tokenizer,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    min_rate: float = DEFAULT_MIN_RATE,
    model_name: str = "?",
    model_type: str | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Select the listed ids from ``counts``: an id is listed for (layer, kv head) when it was a
    sink there at least ``min_count`` times and in at least ``min_rate`` of its occurrences."""
    if min_count < 1 or not 0.0 < min_rate <= 1.0:
        raise ValueError("min_count must be >= 1 and min_rate in (0, 1]")
    occ, hits = counts.occ, counts.hits
    n_layers, n_kv, vocab = hits.shape
    listed: list[dict[str, Any]] = []
    all_ids: set[int] = set()
    for layer in range(n_layers):
        heads = []
        for h in range(n_kv):
            ok = (hits[layer, h] >= min_count) & (hits[layer, h].double() >= min_rate * occ[layer].double().clamp(min=1))
            ids_lh = torch.nonzero(ok).flatten().tolist()
            heads.append(ids_lh)
            all_ids.update(ids_lh)
        listed.append({"layer": layer, "type": counts.layer_types[layer], "heads": heads})
    tokens: dict[str, dict[str, Any]] = {}
    any_occ = occ.max(0).values
    layer_rate = hits.max(1).values.double() / occ.double().clamp(min=1)  # [L, V]: best kv head per layer
    for tid in sorted(all_ids):
        text = tokenizer.decode([tid])
        tokens[str(tid)] = {
            "text": text,
            "class": token_class(text, 1),
            "occurrences": int(any_occ[tid]),
            "layers": [layer for layer in range(n_layers) if any(tid in listed[layer]["heads"][h] for h in range(n_kv))],
            "max_rate": round(float(layer_rate[:, tid].max()), 3),
        }
    # class statistics over all scored positions (a sink in any layer / kv head counts)
    class_occ: dict[str, int] = {}
    class_hits: dict[str, int] = {}
    for tid in torch.nonzero(counts.pos_occ).flatten().tolist():
        c = token_class(tokenizer.decode([tid]), 1)
        class_occ[c] = class_occ.get(c, 0) + int(counts.pos_occ[tid])
        class_hits[c] = class_hits.get(c, 0) + int(counts.pos_hits[tid])
    by_class: dict[str, int] = {}
    for info in tokens.values():
        by_class[info["class"]] = by_class.get(info["class"], 0) + 1
    st = counts.settings
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": model_name,
        "model_type": model_type,
        "num_layers": n_layers,
        "num_kv_heads": n_kv,
        "vocab_size": vocab,
        "n_first": st["n_first"],
        "settings": dict(
            threshold=st["threshold"], span=st["span"], min_count=min_count, min_rate=min_rate,
            min_queries=st["min_queries"], reduce=st.get("reduce", "mean"), texts=st["texts"], tokens=st["tokens"],
            source=source, seconds=st["seconds"],
        ),
        "summary": {
            "listed_ids": len(all_ids),
            "listed_ids_by_class": by_class,
            "entries_per_layer": [sum(len(x) for x in lay["heads"]) for lay in listed],
            "scored_occurrences_by_class": class_occ,
            "sink_share_by_class": {
                c: round(class_hits.get(c, 0) / class_occ[c], 4) for c in sorted(class_occ) if class_occ[c]
            },
        },
        "layers": listed,
        "tokens": tokens,
    }


def build_profile(
    model,
    tokenizer,
    texts: list[str] | list[list[int]],
    *,
    threshold: float = DEFAULT_PROFILE_THRESHOLD,
    span: int = DEFAULT_PROFILE_SPAN,
    min_count: int = DEFAULT_MIN_COUNT,
    min_rate: float = DEFAULT_MIN_RATE,
    n_first: int = 1,
    max_tokens: int = DEFAULT_LENGTH,
    min_queries: int | None = None,
    reduce: str = DEFAULT_REDUCE,
    model_name: str | None = None,
    source: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Measure which token ids are sinks, per layer and kv head, on ``texts``; return the profile.

    :func:`measure_sinks` followed by :func:`profile_from_counts` (see both). ``texts``: strings
    or lists of token ids. Returns a JSON-ready dict.
    """
    if min_count < 1 or not 0.0 < min_rate <= 1.0:
        raise ValueError("min_count must be >= 1 and min_rate in (0, 1]")
    counts = measure_sinks(
        model, tokenizer, texts, threshold=threshold, span=span, n_first=n_first, max_tokens=max_tokens,
        min_queries=min_queries, reduce=reduce, progress=progress,
    )
    cfg = _text_config(model)
    name = model_name or str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "?"))
    return profile_from_counts(
        counts, tokenizer, min_count=min_count, min_rate=min_rate, model_name=name,
        model_type=getattr(cfg, "model_type", None), source=source,
    )


# ---------------------------------------------------------------------------------------------
# files


# ---------------------------------------------------------------------------------------------
# CLI entry point (called by sinkcache.cli)


def profile_command(
    model_name: str,
    out: str | Path | None = None,
    *,
    chunks: int = DEFAULT_CHUNKS,
    length: int = DEFAULT_LENGTH,
    threshold: float = DEFAULT_PROFILE_THRESHOLD,
    span: int = DEFAULT_PROFILE_SPAN,
    min_count: int = DEFAULT_MIN_COUNT,
    min_rate: float = DEFAULT_MIN_RATE,
    n_first: int = 1,
    reduce: str = DEFAULT_REDUCE,
    text: str | Path | None = None,
    dtype: str = "float32",
    counts_out: str | Path | None = None,
    progress: bool = True,
) -> int:
    """``sinkcache profile MODEL [--out FILE]``: measure a sink profile and save it. Returns the exit code.

    Calibration text: the calibration split of :mod:`sinkcache.calibration` (stdlib docstrings),
    ``chunks`` chunks of ``length`` tokens; or a UTF-8 file ``text`` cut into such chunks.
    Default output: ``./<model>.profile.json``. ``counts_out``: also save the raw counts
    (:class:`SinkCounts`, torch format) to re-select with other ``min_count``/``min_rate``.
    """
    err = None
    if chunks < 1:
        err = f"--chunks {chunks} must be >= 1"
    elif length < 32:
        err = f"--length {length} must be >= 32"
    elif not 0.0 < threshold <= 1.0 or not 0.0 < min_rate <= 1.0:
        err = "--threshold and --min-rate must be in (0, 1]"
    elif min_count < 1 or span < 1 or n_first < 0:
        err = "--min-count and --span must be >= 1, --n-first >= 0"
    elif reduce not in ("max", "mean"):
        err = f"--reduce {reduce!r}: allowed max, mean"
    if err:
        print(f"sinkcache: error: {err}", file=sys.stderr)
        return 2
    body = None
    if text is not None:
        try:
            body = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"sinkcache: error: cannot read --text {text}: {exc}", file=sys.stderr)
            return 2
    from .calibration import token_chunks
    from .models import load_model

    model, tok = load_model(model_name, dtype=dtype, progress=progress)
    if body is None:
        texts: list[Any] = token_chunks(tok, "calibration", length, n=chunks)
        source = f"sinkcache.calibration 'calibration' split, {len(texts)} x {length} tokens"
    else:
        ids = tok(body, add_special_tokens=False).input_ids
        bos = tok("a").input_ids[0] if getattr(tok, "bos_token_id", None) == tok("a").input_ids[0] else None
        step = length - (1 if bos is not None else 0)
        texts = [([bos] if bos is not None else []) + ids[i : i + step] for i in range(0, len(ids), step)][:chunks]
        texts = [x for x in texts if len(x) > 16]
        source = f"{text}, {len(texts)} chunks of <= {length} tokens"
    if not texts:
        print("sinkcache: error: no calibration text", file=sys.stderr)
        return 2
    if progress:
        print(f"profiling {model_name} on {source}", file=sys.stderr)
    counts = measure_sinks(
        model, tok, texts, threshold=threshold, span=span, n_first=n_first, max_tokens=length, reduce=reduce,
        progress=progress,
    )
    if counts_out is not None:
        counts.save(counts_out)
    prof = profile_from_counts(
        counts, tok, min_count=min_count, min_rate=min_rate, model_name=model_name,
        model_type=getattr(_text_config(model), "model_type", None), source=source,
    )
    path = Path(out) if out is not None else Path(f"{model_name.replace('/', '_')}.profile.json")
    save_profile(prof, path)
    s = prof["summary"]
    print(
        f"{model_name}: {s['listed_ids']} sink ids ({s['listed_ids_by_class']}); "
        f"entries per layer {s['entries_per_layer']}"
    )
    top = sorted(prof["tokens"].items(), key=lambda kv: -len(kv[1]["layers"]))[:12]
    for tid, info in top:
        print(f"  {tid:>7} {info['text']!r:<16} {info['class']:<12} layers {len(info['layers']):>2} "
              f"occurrences {info['occurrences']:>5} max rate {info['max_rate']:.2f}")
    print(f"wrote {path}")
    return 0
