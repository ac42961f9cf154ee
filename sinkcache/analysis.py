"""Sink analysis: which tokens soak up attention, in which layers and heads, and what they write.

:func:`analyze` runs one forward pass with eager attention (switched on for the call only) and
reads each layer's attention weights in a forward hook on its attention module, so only one
layer's ``[heads, T, T]`` matrix exists at a time (about 38 MB for 9 heads and 1,024 tokens).

Definitions (all per layer x query head, on one text of ``T`` tokens; defaults in brackets):

* **received attention** of key ``s``: mean attention it gets from the next ``span`` [64] queries
  ``s+1 .. s+span``. Keys with fewer than ``min_queries`` followers are not scored (default
  ``min(span, max(8, T // 8))``: the full span on long texts, so the last tokens, whose few
  followers attend to them for locality, do not pass for sinks). A local window, so a delimiter that only serves its own segment still counts.
* **sink**: the first token always; any other key whose received attention is at least
  ``threshold`` [0.1].
* **mass** on a set of keys: attention the queries ``t >= skip`` [16] put on them, averaged over
  those queries (``first_mass``, ``sink_mass``, and per class).
* **sink head**: a head putting at least ``head_threshold`` [0.3] of its attention on its sinks
  (first token included).
* **class** of a token: ``first`` (position 0), ``newline`` (decodes to text containing a
  newline), ``punctuation`` (punctuation/symbols only, see :func:`sinkcache.sinks.punct.punctuation_token_ids`)
  or ``other``.
* **segment** of a non-first sink ``s``: the run of queries ``s+1, s+2, ...`` for which ``s`` is
  the head's top non-first sink (the sink that query attends to most, first token excluded).
* **tag** of a head with respect to a sink ``s`` over caught tokens ``C``: the head's output
  through its slice of ``o_proj`` (``y_t = W_o[:, h] (A_h V)_t``) for ``t`` in ``C``; reported are
  the share of its (centred) variance along the top principal direction (``pc_share``) and the
  |cosine| between that direction and the sink's value vector through the same slice
  (``u = W_o[:, h] v_s``, ``pc_cos``), plus the |cosine| between the mean output and ``u``
  (``mean_cos``). Sink heads use their main sink (the first token over all queries, or the
  non-first sink whose segment draws the most attention); non-sink heads use the first token over
  all queries, and, as a matched contrast, every segment of the layer's sink heads.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .attention import attention_modules
from .sinks.punct import is_punct_text

TOKEN_CLASSES = ("first", "punctuation", "newline", "other")

DEFAULT_SPAN = 64
DEFAULT_THRESHOLD = 0.1
DEFAULT_HEAD_THRESHOLD = 0.3
DEFAULT_SKIP = 16
DEFAULT_MIN_QUERIES = None  # min(span, max(8, T // 8)), see default_min_queries()
DEFAULT_MIN_CAUGHT = 8
DEFAULT_MAX_TOKENS = 1024


# ---------------------------------------------------------------------------------------------
# token classes


def token_class(text: str, position: int) -> str:
    """Class of a token decoded to ``text`` at ``position`` (0 = first token of the text)."""
    if position == 0:
        return "first"
    if "\n" in text:
        return "newline"
    if text.strip() and is_punct_text(text):
        return "punctuation"
    return "other"


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded on its own (special tokens kept)."""
    return [tokenizer.decode([int(i)]) for i in ids]


# ---------------------------------------------------------------------------------------------
# running the model with attention weights visible to hooks


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch ``model`` to eager attention for the duration (restored afterwards)."""
    before = model.config._attn_implementation
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


LayerCallback = Callable[[int, Any, torch.Tensor, torch.Tensor], None]


def attention_pass(model, input_ids: torch.Tensor, on_layer: LayerCallback, attention_mask=None) -> None:
    """One no-cache forward of ``input_ids`` ``[B, T]`` with eager attention.

    ``on_layer(layer_idx, attention_module, weights [B, H, T, T] float32, hidden_states [B, T, D])``
    is called inside each attention module's forward hook; the weights are freed after it returns.
    Only the last position's logits are computed.
    """
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with q_proj/k_proj")
    errors: list[BaseException] = []

    def make(idx: int):
        def hook(module, args, kwargs, output):
            if errors:
                return None
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                errors.append(RuntimeError(f"layer {idx}: attention weights unavailable (not eager?)"))
                return None
            hs = kwargs.get("hidden_states", args[0] if args else None)
            try:
                with torch.no_grad():
                    on_layer(idx, module, weights.detach().float(), hs.detach())
            except BaseException as exc:  # re-raised after the forward
                errors.append(exc)
            return None

        return hook

    handles = [m.register_forward_hook(make(i), with_kwargs=True) for i, m in mods]
    try:
        with eager_attention(model), torch.no_grad():
            kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": 1}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            model(input_ids=input_ids.to(model.device), **kwargs)
    finally:
        for h in handles:
            h.remove()
    if errors:
        raise errors[0]


def default_min_queries(span: int, t: int) -> int:
    """Followers a key needs to be scored: the full ``span`` on long texts, fewer on short ones."""
    return max(1, min(span, max(8, t // 8)))


def received_from_following(att: torch.Tensor, span: int | None, min_queries: int) -> torch.Tensor:
    """Mean attention each key receives from the next ``span`` queries.

    ``att`` ``[..., T, T]`` (query, key). Returns ``[..., T]``; NaN where a key has fewer than
    ``min_queries`` following queries. ``span=None``: all following queries.
    """
    t = att.shape[-1]
    csum = att.cumsum(dim=-2)  # [..., T(query), T(key)]: sum over queries <= q
    s = torch.arange(t, device=att.device)
    end = s + (t if span is None else span)
    end = end.clamp(max=t - 1)
    n = (end - s).to(att.dtype)
    got = csum[..., end, s] - csum[..., s, s]
    out = got / n.clamp(min=1)
    return out.masked_fill(n < min_queries, float("nan"))


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    """Result of :func:`analyze`; ``to_dict()`` is what ``report.json`` holds."""

    model: str
    settings: dict[str, Any]
    tokens: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "summary": self.summary,
            "tokens": self.tokens,
            "layers": self.layers,
        }

    def heads(self) -> Iterator[dict[str, Any]]:
        for layer in self.layers:
            yield from layer["heads"]

    def matrix(self, key: str) -> list[list[float]]:
        """Layer x head matrix of a per-head number (``first_mass``, ``sink_mass``, ...)."""
        return [[float(h[key]) for h in layer["heads"]] for layer in self.layers]

    def save(self, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``report.json`` (+ ``heatmap.png`` and ``tokens.png``) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False, default=_json_default) + "\n")
        if plots:
            from .plots import plot_heatmap, plot_token_strip

            paths["heatmap"] = plot_heatmap(self, out / "heatmap.png")
            paths["tokens"] = plot_token_strip(self, out / "tokens.png")
        return paths

    def summary_table(self) -> str:
        """A short per-layer table plus the model-level numbers."""
        s = self.summary
        lines = [
            f"model {self.model}: {s['tokens']} tokens, {s['layers']} layers x {s['heads_per_layer']} heads; "
            f"sink = received >= {self.settings['threshold']} (next {self.settings['span']} queries), "
            f"sink head = >= {self.settings['head_threshold']} of attention on sinks",
            f"{'layer':>5} {'type':>8} {'first':>6} {'punct':>6} {'newl':>6} {'other':>6} {'sinkhd':>6} "
            f"{'#sinks':>6}  top non-first sinks",
        ]
        for layer in self.layers:
            heads = layer["heads"]
            n = len(heads)

            def avg(key: str, heads=heads, n=n) -> float:
                return sum(h[key] for h in heads) / n

            tops = ", ".join(f"{_short(t['text'])}@{t['position']}" for t in layer["top_sinks"][:3])
            lines.append(
                f"{layer['layer']:>5} {layer['type'][:8]:>8} {avg('first_mass'):6.2f} {avg('punctuation_mass'):6.2f} "
                f"{avg('newline_mass'):6.2f} {avg('other_mass'):6.2f} {sum(h['sink_head'] for h in heads):>3}/{n:<2} "
                f"{len(layer['sink_positions']):>6}  {tops}"
            )
        att = s["attention_share"]
        lines.append(
            "attention share (all heads, queries >= skip): "
            + ", ".join(f"{k} {v:.3f}" for k, v in att.items())
        )
        lines.append(
            f"sink heads: {s['sink_heads']}/{s['heads']} ({s['sink_heads_by_main_sink']}); "
            f"tokens that are a sink in >= 1 head: "
            + ", ".join(f"{k} {v['sink_any']}/{v['count']}" for k, v in s["classes"].items())
        )
        tg = s["tag"]
        lines.append(
            "tag (top-PC variance share / |cos(PC, W_o v_sink)|): "
            f"sink heads {_fmt(tg['sink_heads']['pc_share'])} / {_fmt(tg['sink_heads']['pc_cos'])}, "
            f"non-sink heads {_fmt(tg['non_sink_heads']['pc_share'])} / {_fmt(tg['non_sink_heads']['pc_cos'])}, "
            f"segment sinks {_fmt(tg['segment_sink_heads']['pc_share'])} / {_fmt(tg['segment_sink_heads']['pc_cos'])} "
            f"vs same segments in non-sink heads {_fmt(tg['segment_contrast']['pc_share'])} / "
            f"{_fmt(tg['segment_contrast']['pc_cos'])}; random |cos| ~ {tg['random_cos']:.3f}"
        )
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _short(text: str, n: int = 10) -> str:
    r = repr(text)[1:-1]
    return r if len(r) <= n else r[: n - 1] + "~"


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)


# ---------------------------------------------------------------------------------------------
# per-layer statistics


def _top_direction(yc: torch.Tensor, iters: int = 200, tol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """Top right singular vector of ``yc`` ``[n, D]`` and its squared singular value.

    Power iteration on ``yc^T yc`` (a full SVD is ~100x slower on a busy CPU and gives the same
    direction up to sign)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(yc.shape[1], generator=g, dtype=yc.dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = yc.T @ (yc @ v)
        new = float(w.norm())
        if new == 0.0:
            return v, 0.0
        v = w / new
        if abs(new - lam) <= tol * new:
            lam = new
            break
        lam = new
    return v, float((yc @ v).square().sum())


def _tag(y: torch.Tensor, u: torch.Tensor) -> dict[str, float | None]:
    """Tag numbers for head outputs ``y`` ``[n, D]`` against direction ``u`` ``[D]``."""
    if y.shape[0] < 2:
        return {"pc_share": None, "pc_cos": None, "mean_cos": None, "n": int(y.shape[0])}
    yc = (y - y.mean(0, keepdim=True)).double()
    var = float((yc * yc).sum())
    un = u.double().norm()
    share = pc_cos = None
    if var > 0:
        pc, top = _top_direction(yc)
        share = top / var
        pc_cos = float((pc @ u.double()).abs() / un) if un > 0 else None
    m = y.double().mean(0)
    mean_cos = float((m @ u.double()).abs() / (m.norm() * un)) if un > 0 and m.norm() > 0 else None
    return {"pc_share": _clean(share), "pc_cos": _clean(pc_cos), "mean_cos": _clean(mean_cos), "n": int(y.shape[0])}


def _layer_stats(
    idx: int,
    module,
    weights: torch.Tensor,
    hidden: torch.Tensor,
    classes: list[str],
    cfg: dict[str, Any],
) -> dict[str, Any]:
    a = weights[0]  # [H, T, T]
    hq, t, _ = a.shape
    hs = hidden[0:1]
    d = module.head_dim
    hk = module.k_proj.out_features // d
    group = hq // hk
    skip = cfg["skip"]
    cls = list(classes)
    recv = received_from_following(a, cfg["span"], cfg["min_queries"])  # [H, T]
    recv_all = received_from_following(a, None, cfg["min_queries"])
    recv[:, 0] = float("nan")  # the first token is a sink by definition; scored separately
    is_sink = torch.nan_to_num(recv, nan=0.0) >= cfg["threshold"]  # [H, T]
    q = a[:, skip:, :]  # queries that count for masses
    first_mass = q[:, :, 0].mean(-1)  # [H]
    class_idx = {c: torch.tensor([x == c for x in cls], dtype=torch.bool) for c in TOKEN_CLASSES}
    class_mass = {c: (q * (is_sink & class_idx[c]).unsqueeze(1).to(q.dtype)).sum(-1).mean(-1) for c in TOKEN_CLASSES if c != "first"}
    sink_mass = first_mass + sum(class_mass.values())

    # head outputs through o_proj and sink value vectors
    v = module.v_proj(hs).view(1, t, hk, d).transpose(1, 2)[0].float()  # [Hk, T, d]
    if getattr(module, "v_norm", None) is not None:
        v = module.v_norm(v)
    w_o = module.o_proj.weight.float()  # [D, H*d]
    v_rep = v.repeat_interleave(group, dim=0)  # [H, T, d]
    o = torch.matmul(a, v_rep)  # [H, T, d]

    def head_out(h: int, rows: torch.Tensor) -> torch.Tensor:
        return o[h, rows] @ w_o[:, h * d : (h + 1) * d].T  # [n, D]

    def value_dir(h: int, s: int) -> torch.Tensor:
        return w_o[:, h * d : (h + 1) * d] @ v_rep[h, s]

    all_queries = torch.arange(skip, t)
    heads: list[dict[str, Any]] = []
    sink_head_refs: list[tuple[int, int, torch.Tensor]] = []  # (head, sink, caught rows) for segment sinks
    for h in range(hq):
        sinks = torch.nonzero(is_sink[h]).flatten()
        # top non-first sink of every query, then the segments
        seg_info: dict[int, tuple[int, int]] = {}
        caught_count: dict[int, int] = {}
        if sinks.numel():
            att_s = a[h][:, sinks]  # [T, S]; zero where the sink is in the future
            best_val, best = att_s.max(-1)
            top = torch.where(best_val > 0, sinks[best], torch.full_like(best, -1))  # [T]
            tl = top.tolist()
            for s in sinks.tolist():
                e = s + 1
                while e < t and tl[e] == s:
                    e += 1
                seg_info[s] = (s + 1, e)
            counts = torch.bincount(top[top >= 0], minlength=t)
            caught_count = {s: int(counts[s]) for s in sinks.tolist()}
        sink_list = []
        for s in sinks.tolist():
            start, end = seg_info[s]
            sink_list.append(
                {
                    "position": s,
                    "class": cls[s],
                    "received": _clean(float(recv[h, s])),
                    "received_all": _clean(float(recv_all[h, s])),
                    "segment": [start, end],
                    "caught": caught_count.get(s, 0),
                }
            )
        sink_head = bool(sink_mass[h] >= cfg["head_threshold"])
        # main sink and its caught tokens
        nonfirst_mass = float(sink_mass[h] - first_mass[h])
        ref_pos, rows = 0, all_queries
        if sink_head and nonfirst_mass > float(first_mass[h]):
            best_s, best_draw = None, 0.0
            for s in sinks.tolist():
                start, end = seg_info[s]
                if end - start >= cfg["min_caught"]:
                    draw = float(a[h, start:end, s].sum())
                    if draw > best_draw:
                        best_s, best_draw = s, draw
            if best_s is not None:
                ref_pos = best_s
                rows = torch.arange(*seg_info[best_s])
        tag = _tag(head_out(h, rows), value_dir(h, ref_pos)) if rows.numel() else None
        if sink_head and ref_pos != 0:
            sink_head_refs.append((h, ref_pos, rows))
        heads.append(
            {
                "layer": idx,
                "head": h,
                "kv_head": h // group,
                "first_mass": _clean(float(first_mass[h])),
                "punctuation_mass": _clean(float(class_mass["punctuation"][h])),
                "newline_mass": _clean(float(class_mass["newline"][h])),
                "other_mass": _clean(float(class_mass["other"][h])),
                "sink_mass": _clean(float(sink_mass[h])),
                "sink_head": sink_head,
                "n_sinks": int(sinks.numel()) + 1,
                "main_sink": {"position": ref_pos, "class": cls[ref_pos]},
                "tag": tag,
                "sinks": sorted(sink_list, key=lambda x: -(x["received"] or 0.0))[: cfg["max_sinks_listed"]],
            }
        )
    # matched contrast: the sink heads' segments, seen by this layer's non-sink heads
    contrast = []
    non_sink = [h for h in range(hq) if not heads[h]["sink_head"]]
    for h, s, rows in sink_head_refs:
        for h2 in non_sink:
            c = _tag(head_out(h2, rows), value_dir(h2, s))
            contrast.append({"sink_head": h, "head": h2, "sink": s, **c})
    # layer-level: union of sinks over heads, with the strongest received attention
    any_sink = is_sink.any(0)
    strength = torch.nan_to_num(recv, nan=0.0).max(0).values
    sink_pos: list[int] = torch.nonzero(any_sink).flatten().tolist()
    top_pos = sorted(sink_pos, key=lambda p: -float(strength[p]))[:10]
    return {
        "layer": idx,
        "type": getattr(module, "layer_type", None) or ("sliding_attention" if getattr(module, "is_sliding", False) else "full_attention"),
        "heads": heads,
        "sink_positions": sink_pos,
        "sink_heads_per_position": {str(p): int(is_sink[:, p].sum()) for p in sink_pos},
        "top_sinks": [
            {"position": p, "text": cfg["texts"][p], "received": _clean(float(strength[p])), "class": cls[p]} for p in top_pos
        ],
        "segment_contrast": contrast,
        "_heads_sinking": is_sink.sum(0),  # [T], removed before the report is returned
        "_max_received": strength,
    }


# ---------------------------------------------------------------------------------------------
# entry point


def analyze(
    model,
    tokenizer,
    text: str | None = None,
    *,
    input_ids: torch.Tensor | list[int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    span: int = DEFAULT_SPAN,
    threshold: float = DEFAULT_THRESHOLD,
    head_threshold: float = DEFAULT_HEAD_THRESHOLD,
    skip: int = DEFAULT_SKIP,
    min_queries: int | None = DEFAULT_MIN_QUERIES,
    min_caught: int = DEFAULT_MIN_CAUGHT,
    max_sinks_listed: int = 32,
    model_name: str | None = None,
) -> Report:
    """Analyse attention sinks of ``model`` on one text (or ``input_ids``), first ``max_tokens`` tokens.

    See the module docstring for every definition. The model's attention implementation is
    switched to eager for the call and restored.
    """
    if (text is None) == (input_ids is None):
        raise ValueError("pass exactly one of text= or input_ids=")
    if input_ids is None:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    else:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)[:, :max_tokens]
    t = ids.shape[1]
    if t < 4:
        raise ValueError(f"need at least 4 tokens, got {t}")
    if not 0.0 < threshold <= 1.0 or not 0.0 < head_threshold <= 1.0:
        raise ValueError("threshold and head_threshold must be in (0, 1]")
    if min_queries is None:
        min_queries = default_min_queries(span, t)
    if span < 1 or min_queries < 1:
        raise ValueError("span and min_queries must be >= 1")
    skip = max(0, min(skip, t // 4))
    id_list = [int(i) for i in ids[0]]
    texts = token_texts(tokenizer, id_list)
    classes = [token_class(x, i) for i, x in enumerate(texts)]
    cfg = {
        "span": span,
        "threshold": threshold,
        "head_threshold": head_threshold,
        "skip": skip,
        "min_queries": min_queries,
        "min_caught": min_caught,
        "max_sinks_listed": max_sinks_listed,
    }
    layers: dict[int, dict[str, Any]] = {}

    def on_layer(idx, module, weights, hidden):
        layers[idx] = _layer_stats(idx, module, weights, hidden, classes, dict(cfg, texts=texts))

    start = time.perf_counter()
    attention_pass(model, ids, on_layer)
    seconds = time.perf_counter() - start
    ordered = [layers[i] for i in sorted(layers)]
    heads_sinking = torch.stack([lay.pop("_heads_sinking") for lay in ordered])  # [L, T]
    max_recv = torch.stack([lay.pop("_max_received") for lay in ordered])  # [L, T]
    n_heads_total = sum(len(lay["heads"]) for lay in ordered)
    tokens = [
        {
            "position": i,
            "id": id_list[i],
            "text": texts[i],
            "class": classes[i],
            "sink_heads": int(heads_sinking[:, i].sum()) if i else n_heads_total,
            "sink_layers": int((heads_sinking[:, i] > 0).sum()) if i else len(ordered),
            "max_received": _clean(float(max_recv[:, i].max())) if i else None,
        }
        for i in range(t)
    ]
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    cfg_model = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    settings = dict(
        cfg, tokens=t, hidden_size=int(cfg_model.hidden_size), attention="eager (hooked)", forward_seconds=round(seconds, 2)
    )
    report = Report(model=str(name), settings=settings, tokens=tokens, layers=ordered)
    report.summary = summarize(report)
    return report


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def summarize(report: Report) -> dict[str, Any]:
    """Model-level numbers: attention shares, sink heads, sink classes, tag statistics."""
    heads = list(report.heads())
    n = len(heads)
    share = {
        "first": _mean([h["first_mass"] for h in heads]),
        "punctuation_sinks": _mean([h["punctuation_mass"] for h in heads]),
        "newline_sinks": _mean([h["newline_mass"] for h in heads]),
        "other_sinks": _mean([h["other_mass"] for h in heads]),
    }
    share["all_sinks"] = round(sum(v or 0.0 for v in share.values()), 4)
    by_main: dict[str, int] = {}
    for h in heads:
        if h["sink_head"]:
            c = h["main_sink"]["class"]
            by_main[c] = by_main.get(c, 0) + 1
    classes: dict[str, dict[str, Any]] = {}
    for c in TOKEN_CLASSES:
        toks = [tk for tk in report.tokens if tk["class"] == c]
        classes[c] = {
            "count": len(toks),
            "sink_any": sum(tk["sink_heads"] > 0 for tk in toks),
            "sink_in_5pct_heads": sum(tk["sink_heads"] >= 0.05 * n for tk in toks),
        }
    sink_tags = [h["tag"] for h in heads if h["sink_head"] and h["tag"]]
    seg_tags = [h["tag"] for h in heads if h["sink_head"] and h["tag"] and h["main_sink"]["position"] != 0]
    first_tags = [h["tag"] for h in heads if h["sink_head"] and h["tag"] and h["main_sink"]["position"] == 0]
    non_tags = [h["tag"] for h in heads if not h["sink_head"] and h["tag"]]
    contrast = [c for lay in report.layers for c in lay["segment_contrast"]]
    d = report.settings.get("hidden_size")

    def tag_summary(tags: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "heads": len(tags),
            "pc_share": _mean([x["pc_share"] for x in tags]),
            "pc_cos": _mean([x["pc_cos"] for x in tags]),
            "mean_cos": _mean([x["mean_cos"] for x in tags]),
        }

    per_layer = []
    for lay in report.layers:
        hs = lay["heads"]
        per_layer.append(
            {
                "layer": lay["layer"],
                "type": lay["type"],
                "first_mass": _mean([h["first_mass"] for h in hs]),
                "sink_mass": _mean([h["sink_mass"] for h in hs]),
                "sink_heads": sum(h["sink_head"] for h in hs),
                "sink_positions": len(lay["sink_positions"]),
            }
        )
    return {
        "tokens": len(report.tokens),
        "layers": len(report.layers),
        "heads_per_layer": len(report.layers[0]["heads"]) if report.layers else 0,
        "heads": n,
        "sink_heads": sum(h["sink_head"] for h in heads),
        "sink_heads_by_main_sink": by_main,
        "attention_share": share,
        "classes": classes,
        "tag": {
            "sink_heads": tag_summary(sink_tags),
            "first_sink_heads": tag_summary(first_tags),
            "segment_sink_heads": tag_summary(seg_tags),
            "non_sink_heads": tag_summary(non_tags),
            "segment_contrast": tag_summary(contrast),
            "random_cos": round(math.sqrt(2.0 / (math.pi * d)), 4) if d else 0.0,
        },
        "per_layer": per_layer,
    }


# ---------------------------------------------------------------------------------------------
# CLI entry points (called by sinkcache.cli)


def _err(msg: str) -> int:
    print(f"sinkcache: error: {msg}", file=sys.stderr)
    return 2


def detect_command(
    model_name: str,
    text: str | None = None,
    prompt: str | None = None,
    out_dir: str | Path = "sink-report",
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    threshold: float = DEFAULT_THRESHOLD,
    head_threshold: float = DEFAULT_HEAD_THRESHOLD,
    span: int = DEFAULT_SPAN,
    dtype: str = "float32",
    plots: bool = True,
    progress: bool = True,
) -> int:
    """``sinkcache detect MODEL --text FILE | --prompt STR --out DIR``. Returns the exit code.

    ``text`` is a path to a UTF-8 text file; ``prompt`` a string. Without either, the first
    ``max_tokens`` tokens of the held-out calibration text are used. Writes ``report.json``,
    ``heatmap.png`` and ``tokens.png`` into ``out_dir`` and prints the summary table.
    """
    if text is not None and prompt is not None:
        return _err("pass --text FILE or --prompt STR, not both")
    if max_tokens < 4:
        return _err(f"--max-tokens {max_tokens} must be >= 4")
    if not 0.0 < threshold <= 1.0 or not 0.0 < head_threshold <= 1.0:
        return _err("--threshold and --head-threshold must be in (0, 1]")
    body: str | None
    source: str
    if text is not None:
        try:
            body = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return _err(f"cannot read --text {text}: {exc}")
        source = str(text)
        if not body.strip():
            return _err(f"--text {text} is empty")
    elif prompt is not None:
        if not prompt.strip():
            return _err("--prompt is empty")
        body, source = prompt, "prompt"
    else:
        body, source = None, "held-out stdlib docstrings (sinkcache.calibration)"
    from .models import load_model

    model, tok = load_model(model_name, dtype=dtype, progress=progress)
    if body is None:
        from .calibration import token_chunks

        chunks = token_chunks(tok, "heldout", max_tokens, n=1)
        if not chunks:
            return _err("no held-out text available")
        ids = torch.tensor([chunks[0]])
    else:
        ids = tok(body, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 4:
        return _err(f"the text has {ids.shape[1]} tokens; need at least 4")
    report = analyze(
        model, tok, input_ids=ids, threshold=threshold, head_threshold=head_threshold, span=span, model_name=model_name
    )
    report.settings["source"] = source
    paths = report.save(out_dir, plots=plots)
    print(report.summary_table())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
