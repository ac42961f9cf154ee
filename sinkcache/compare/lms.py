"""lm-eval models for ``sinkcache compare``: one per family, all sharing sinkcache's request protocol.

All three subclass :class:`sinkcache.evaluation.SinkCacheLM`, so every policy is scored by the same
lm-eval task definitions and the same prefill -> compress -> score/generate protocol:

* :class:`FractionLM`: sinkcache's own policies with the eviction budget given as a fraction of
  each request's context (``budget = ceil(frac * tokens)``), so eviction matches a memory fraction.
* :class:`QuantizedPeerLM`: transformers' own ``QuantoQuantizedLayer`` / ``HQQQuantizedLayer`` (what
  ``QuantizedCache(backend=...)`` builds), measured by the bytes of their real tensors.
* :class:`KVPressLM`: NVIDIA kvpress presses, run by ``evals/peers/kvpress_worker.py`` in kvpress's
  own virtualenv (kvpress pins ``transformers<5.3``); this side tokenizes, decodes and scores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..cache import SinkCache
from ..evaluation import SinkCacheLM
from ..policies import HybridPolicy

__all__ = ["FractionLM", "QuantizedPeerLM", "KVPressLM", "PeerQuantCache", "tensor_bytes", "fit_budget"]


#: How a fraction cell's eviction window is set per request (see :func:`fit_budget`).
WINDOW_MODES = ("default", "rest", "shrink")
#: The ``"shrink"`` window's cap: the 32 tokens of the ``-w32`` cells, reached at budgets >= 256.
SHRINK_WINDOW_MAX = 32


def fit_budget(kw: dict[str, Any], frac: float, n_tokens: int, window_mode: str) -> dict[str, Any]:
    """Cache kwargs with ``budget = ceil(frac * n_tokens)`` (raised to the policy's minimum).

    ``window_mode``: ``"default"`` (``kw["window"]`` when set, else the policy's own default
    window), ``"rest"`` (the window takes
    the whole budget except the ``n_first`` sinks of ``sinks="first"``: pure recent window /
    StreamingLLM), ``"shrink"`` (``min(32, budget // 8)``, at least 1: a fixed 32-token window
    is half of a 64-token budget, which left a 512-token prompt at 12.5% half the scored slots
    of kvpress's TOVA, which protects only the last token).
    """
    kw = dict(kw)
    if window_mode not in WINDOW_MODES:
        raise ValueError(f"window_mode={window_mode!r}; allowed: {', '.join(WINDOW_MODES)}")
    budget = max(1, math.ceil(frac * n_tokens))
    if kw["policy"] == "evict":
        sinks = kw.get("sinks")
        n_first = 1 if kw.get("n_first") is None else int(kw["n_first"])  # 0 stays 0
        if sinks == "none":
            reserved = 0
        elif sinks == "first":
            reserved = n_first
        else:
            reserved = max(n_first, 1) + 1  # room for the first token(s) + at least one measured sink
        # A cell's own fixed window (e.g. 32) must fit with the sinks and one scored slot; unset
        # (None) is the policy's own default, min(256, budget // 2).
        own = int(kw.get("window") or 0) if window_mode == "default" else 0
        budget = max(budget, own + reserved + 1)
        if window_mode == "rest":
            kw["window"] = budget - reserved
        elif window_mode == "shrink":
            kw["window"] = min(SHRINK_WINDOW_MAX, max(1, budget // 8))
    elif kw["policy"] == "hybrid":
        # Unset knobs are the policy's own defaults (window 128, group 64), not 0.
        window = HybridPolicy.window if kw.get("window") is None else int(kw["window"])
        group = HybridPolicy.group_size if kw.get("group_size") is None else int(kw["group_size"])
        budget = max(budget, window + 2 * group - 1)
    kw["budget"] = budget
    return kw


class FractionLM(SinkCacheLM):
    """``SinkCacheLM`` whose eviction budget is a fraction of each request's tokens.

    Args:
        budget_frac: fraction in (0, 1] of the request's context (prefilled tokens; the whole text
            for perplexity) kept by ``evict``/``hybrid``. ``None``: ``budget`` as given.
        window_mode: ``"default"`` or ``"rest"`` (see :func:`fit_budget`).
    """

    def __init__(self, *args: Any, budget_frac: float | None = None, window_mode: str = "default", **kwargs: Any) -> None:
        if budget_frac is not None and not 0 < float(budget_frac) <= 1:
            raise ValueError(f"budget_frac={budget_frac!r} must be in (0, 1]")
        self.budget_frac = None if budget_frac is None else float(budget_frac)
        self.window_mode = window_mode
        self._n_ctx = 4096
        if self.budget_frac is not None and kwargs.get("budget") is not None:
            raise ValueError("pass budget= or budget_frac=, not both")
        if self.budget_frac is not None:
            kwargs["budget"] = 4096  # validates the other knobs; each request gets its own budget
        super().__init__(*args, **kwargs)

    @property
    def kv_memory(self) -> dict[str, Any]:
        out = super().kv_memory
        if self.budget_frac is not None:
            out["cache_requested"].update(budget=None, budget_frac=self.budget_frac, window_mode=self.window_mode)
        return out

    def make_cache(self) -> SinkCache:
        kw = self.cache_kwargs
        if self.budget_frac is None or kw["policy"] not in ("evict", "hybrid"):
            return super().make_cache()
        fitted = fit_budget({**kw, "budget": None}, self.budget_frac, self._n_ctx, self.window_mode)
        for _ in range(4):
            try:
                return SinkCache(**fitted, model=self.model, tokenizer=self.tokenizer)
            except ValueError as exc:
                # A budget below the policy's minimum for this request (e.g. a hybrid needs room for
                # its sink groups): raise it to the minimum the error names. Memory is measured, so
                # the table shows what the request really held.
                m = re.search(r"budget >= (\d+)", str(exc))
                if m is None or int(m.group(1)) <= int(fitted["budget"]):
                    raise
                fitted["budget"] = int(m.group(1))
        return SinkCache(**fitted, model=self.model, tokenizer=self.tokenizer)

    def _score_batch(self, contexts, rows):
        self._n_ctx = max(len(c) for c in contexts) - 1
        return super()._score_batch(contexts, rows)

    def stream_loglikelihood(self, tokens, chunk_size=None):
        self._n_ctx = len(tokens) + 1
        return super().stream_loglikelihood(tokens, chunk_size)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        self._n_ctx = int(context.shape[1]) - 1
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


# --------------------------------------------------------------------------------------- quantized peers


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj``: plain tensors, tensor subclasses that flatten into inner
    tensors (optimum-quanto's packed ``QTensor``s), and tuples/lists/dicts of them (HQQ's meta)."""
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = flatten()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class PeerQuantCache(Cache):
    """transformers' quantized KV layers, built per layer type like ``QuantizedCache``.

    ``QuantizedCache`` itself refuses models with sliding-window layers (Gemma 3); this builds the
    same ``QuantoQuantizedLayer``/``HQQQuantizedLayer`` for the full-attention layers and
    transformers' ``DynamicSlidingWindowLayer`` for sliding ones (as ``DynamicCache`` does). For a
    model with only full-attention layers it is exactly ``QuantizedCache(backend, config, nbits)``.
    """

    def __init__(self, backend: str, config: Any, nbits: int) -> None:
        from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

        layer_cls = {"quanto": QuantoQuantizedLayer, "hqq": HQQQuantizedLayer}[backend]
        cfg = config.get_text_config(decoder=True)
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        layers: list[Any] = []
        for t in types:
            if t == "full_attention":
                layers.append(layer_cls(nbits=nbits))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
        super().__init__(layers=layers)
        self.full = [t == "full_attention" for t in types]
        self.backend = backend
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def describe(self) -> dict[str, Any]:
        """The quantized layers' settings, read back from the layers themselves."""
        q = next((layer for layer, full in zip(self.layers, self.full, strict=True) if full), None)
        return {
            "cache": "transformers QuantizedCache layers",
            "layer_class": type(q).__name__ if q is not None else None,
            "backend": self.backend,
            "nbits": getattr(q, "nbits", None),
            "residual_length": getattr(q, "residual_length", None),
            "q_group_size": getattr(q, "q_group_size", None),
            "axis_key": getattr(q, "axis_key", None),
            "axis_value": getattr(q, "axis_value", None),
            "layers": len(self.layers),
            "sliding_layers": self.full.count(False),
        }

    def compress(self) -> None:
        """Nothing pending: the layers quantize inside ``update``."""

    def detach(self) -> None:
        """No hooks to remove."""

    def memory_bytes(self) -> int:
        total = 0
        layer: Any
        for layer in self.layers:
            for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
                val = getattr(layer, name, None)
                if isinstance(val, torch.Tensor) and val.dim() < 4 and type(val) is torch.Tensor:
                    continue  # the empty placeholder of an emptied residual
                total += tensor_bytes(val)
        return total

    def dense_bytes(self) -> int:
        total = 0
        layer: Any
        for layer, full in zip(self.layers, self.full, strict=True):
            if not full:
                total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
                continue
            if not layer.is_initialized:
                continue
            item = torch.empty((), dtype=layer.dtype).element_size()
            batch = layer.keys.shape[0] if layer.keys.dim() == 4 else 1
            total += 2 * batch * self.kv_heads * self.head_dim * layer.cumulative_length * item
        return total


class QuantizedPeerLM(SinkCacheLM):
    """Requests run through :class:`PeerQuantCache` (transformers' quanto / HQQ quantized layers).

    Multiple-choice continuations are scored one at a time (each with its own prefill): the
    quantized layers have no batch selection.
    """

    def __init__(self, *args: Any, backend: str = "quanto", nbits: int = 4, **kwargs: Any) -> None:
        self.quant_backend, self.nbits = backend, int(nbits)
        super().__init__(*args, policy="full", sinks="none", **kwargs)
        self._validated = self.make_cache().describe()

    def make_cache(self) -> Any:
        return PeerQuantCache(self.quant_backend, self.model.config, self.nbits)

    @property
    def kv_memory(self) -> dict[str, Any]:
        out = super().kv_memory
        out["cache_requested"] = {"backend": self.quant_backend, "nbits": self.nbits}
        return out

    def _pad_quantum(self) -> int:
        return 1

    def _score_batch(self, contexts, rows):
        out = []
        for g, item in rows:
            out.extend(super()._score_batch([contexts[g]], [(0, item)]))
        return out


# --------------------------------------------------------------------------------------- kvpress peer


#: Where ``make peers`` creates the kvpress virtualenv (kvpress pins transformers<5.3).
KVPRESS_VENV = Path.home() / ".cache" / "sinkcache" / "venvs" / "kvpress"


def kvpress_python() -> Path:
    """The kvpress virtualenv's Python: ``$SINKCACHE_KVPRESS_PYTHON``, else ``make peers``'s venv."""
    env = os.environ.get("SINKCACHE_KVPRESS_PYTHON")
    return Path(env) if env else KVPRESS_VENV / "bin" / "python"


def worker_script() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "evals" / "peers" / "kvpress_worker.py"


class KVPressLM(SinkCacheLM):
    """Requests run by a kvpress press in the kvpress virtualenv; tokenizing and scoring stay here.

    Args:
        press: ``streaming_llm``, ``snapkv``, ``knorm``, ``tova`` or ``expected_attention``.
        ratio: kvpress ``compression_ratio`` (the fraction of the prefilled context removed).
        checkpoint: a checkpoint dir the worker loads with ``from_pretrained``.
        log: file for the worker's stderr.
    """

    def __init__(self, *args: Any, press: str, ratio: float, checkpoint: str | Path, log: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, policy="full", sinks="none", **kwargs)
        self.peer = {"package": "kvpress", "press": press, "compression_ratio": ratio}
        self._validated = dict(self.peer)
        py = kvpress_python()
        if not py.exists():
            raise FileNotFoundError(
                f"kvpress virtualenv python {py} not found: run `make peers` in a sinkcache checkout to create it "
                "(evals/peers/README.md), or point $SINKCACHE_KVPRESS_PYTHON at a Python that has kvpress"
            )
        env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        env.pop("PYTHONPATH", None)
        self._log = open(log or os.devnull, "a")  # noqa: SIM115  (lives as long as the worker)
        self.proc = subprocess.Popen(
            [
                str(py), str(worker_script()), "--model", str(checkpoint), "--press", press, "--ratio", str(ratio),
                "--device", str(self.model.device), "--dtype", str(self.model.dtype).removeprefix("torch."),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        hello = self._recv()
        self.worker_versions = hello.get("versions", {})
        self.worker_press = hello.get("press")  # the press the worker really built
        self.worker_placement = hello.get("placement")  # where the worker's model really runs
        self._stop_cache: dict[tuple[str, ...], list[int]] = {}

    def _pad_quantum(self) -> int:
        return 1

    def _send(self, req: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._recv()
        if "error" in reply:
            raise RuntimeError(f"kvpress worker: {reply['error']}")
        return reply

    def _recv(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kvpress worker exited (status {self.proc.poll()}); see its log")
        return json.loads(line)

    def close(self) -> int:
        """Stop the worker; returns its peak RSS in bytes."""
        rss = 0
        if self.proc.poll() is None:
            rss = int(self._send({"op": "exit"}).get("peak_rss_bytes", 0))
            self.proc.wait(timeout=60)
        self._log.close()
        return rss

    def _record_reply(self, reply: dict, kind: str) -> None:
        for mem, dense in zip(reply["memory"], reply["dense"], strict=True):
            self.kv_log.add(self._task, kind, mem, dense)
        # What the worker reports it built (press class and ratio), else what this side asked for.
        self.kv_log.built(dict(self.worker_press or {"unverified": True, **self.peer}))

    @property
    def kv_memory(self) -> dict[str, Any]:
        out = super().kv_memory
        out["cache_requested"] = dict(self.peer)
        return out

    def _score_batch(self, contexts, rows):
        out: list[tuple[float, bool]] = []
        for g, ctx in enumerate(contexts):
            items = [item for gg, item in rows if gg == g]
            conts = [[ctx[-1]] + cont[:-1] for (_, _, cont) in items]
            reply = self._send({"op": "score", "ctx": list(ctx[:-1]), "conts": conts, "targets": [c for (_, _, c) in items]})
            self._record_reply(reply, "loglikelihood")
            out.extend((float(lp), bool(gr)) for lp, gr in reply["results"])
        # rows are grouped by context in order, as SinkCacheLM builds them
        return out

    def stream_loglikelihood(self, tokens, chunk_size=None):
        raise NotImplementedError("kvpress presses compress only during prefill; streaming perplexity is not run")

    def _stop_ids(self, stop: list[str] | None) -> list[int]:
        """Token ids whose text contains a stop string (plus EOS): the worker stops on them; lm-eval
        then cuts the decoded text at the first stop string, as it does for every model."""
        key = tuple(stop or ())
        if key not in self._stop_cache:
            tok = self.tokenizer
            ids = {int(self.eot_token_id)}
            if key:
                vocab = len(tok)
                texts = tok.batch_decode([[i] for i in range(vocab)])
                ids.update(i for i, s in enumerate(texts) if any(k in s for k in key))
            self._stop_cache[key] = sorted(ids)
        return self._stop_cache[key]

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if context.shape[0] != 1:
            raise ValueError("the kvpress peer runs with batch_size=1")
        ids = context[0].tolist()
        mask = generation_kwargs.get("attention_mask")
        if mask is not None:
            ids = [t for t, m in zip(ids, mask[0].tolist(), strict=True) if m]
        max_new = int(max_length) - int(context.shape[1])
        reply = self._send({"op": "generate", "ctx": ids[:-1], "last": ids[-1], "max_new": max_new, "stop_ids": self._stop_ids(stop)})
        self._record_reply(reply, "generate_until")
        gen = torch.tensor([reply["tokens"]], dtype=context.dtype, device=context.device)
        return torch.cat([context, gen], dim=1)

