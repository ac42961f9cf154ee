"""lm-evaluation-harness integration: the ``sinkcache`` model and :func:`run_eval`.

Importing this module registers an lm-eval model called ``sinkcache`` (lm-eval has no plugin entry
point, so the ``lm_eval`` command only knows it when something imports this module). Three ways in:

* Python: ``import sinkcache.evaluation`` then ``lm_eval.simple_evaluate(model="sinkcache", ...)``,
  or simply :func:`run_eval`.
* Command line: ``python -m sinkcache.evaluation --model sinkcache --model_args
  pretrained=smollm2-135m,policy=quantize,bits=2 --tasks sinkcache_suite --limit 20`` accepts every
  ``lm_eval`` option; it registers the model and adds ``--include_path evals/tasks`` (the offline
  suite) unless you pass your own.
* Data parallel: ``accelerate launch -m sinkcache.evaluation --model sinkcache ...``.

:class:`SinkCacheLM` subclasses lm-eval's ``HFLM`` and routes every request through a fresh
:class:`~sinkcache.SinkCache`:

* ``loglikelihood`` / ``multiple_choice``: the context (all but its last token) is prefilled into
  the cache, compressed (``cache.compress()``), and the continuation is scored in a second forward
  against the compressed cache. Requests that share a context share one prefill.
* ``loglikelihood_rolling`` (perplexity): the text is streamed through one cache in chunks of
  ``chunk_size`` tokens, compressing after every chunk.
* ``generate_until``: the context is prefilled and compressed the same way, then ``generate``
  continues from the compressed cache, which keeps compressing while it decodes.

Left-padded batches give the same answers as batch size 1 (the cache is given ``model=`` so it sees
the padding mask); for quantizing policies, rows are only batched together when their padding is a
whole number of quantization groups, so every row's groups hold the same tokens as unbatched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

# Import the built-in model table first: lm-eval only auto-imports it when its registry is empty,
# so registering ours first would hide "hf", "vllm", ... from get_model().
import lm_eval.models  # noqa: F401  (side effect: registers the lazy built-in models)
import torch
import torch.nn.functional as F
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from . import __version__
from .cache import SinkCache
from .policies import HybridPolicy, QuantizePolicy, make_policy

logger = logging.getLogger(__name__)

__all__ = [
    "SinkCacheLM",
    "run_eval",
    "print_report",
    "default_tasks_dir",
    "task_manager",
    "CACHE_ARG_NAMES",
    "main",
]

#: Model arguments that configure the cache (everything else goes to ``HFLM``).
CACHE_ARG_NAMES = (
    "policy", "bits", "budget", "window", "group_size", "sinks", "n_first", "max_sinks", "positions", "score", "profile",
    "refine",
)

#: Environment variable naming the offline task folder (default: ``evals/tasks`` of this checkout).
TASKS_ENV = "SINKCACHE_EVAL_TASKS"


def default_tasks_dir() -> Path:
    """The offline task suite: ``$SINKCACHE_EVAL_TASKS`` or ``evals/tasks`` next to this package."""
    env = os.environ.get(TASKS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parent.parent / "evals" / "tasks").resolve()


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None, **kwargs: Any):
    """An lm-eval ``TaskManager`` that also knows the offline suite (``sinkcache_*`` tasks)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        include_path = default_tasks_dir()
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(
                f"task folder {p} does not exist; point ${TASKS_ENV} (or include_path=) at sinkcache's evals/tasks"
            )
    return TaskManager(include_path=[str(p) for p in paths], **kwargs)


# --------------------------------------------------------------------------------------- helpers


class _OwnTaskMetadataHint(logging.Filter):
    """Drop lm-eval's "Custom kwargs can be passed to `--metadata`" warning for the offline suite:
    it is printed for every task with a ``custom_dataset`` (ours load local files and take no
    metadata); other tasks (RULER's, which do take ``--metadata``) keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("sinkcache_") and "Custom kwargs can be passed" in msg)


logging.getLogger("lm_eval.api.task").addFilter(_OwnTaskMetadataHint())


def _none(value: Any) -> Any:
    """lm-eval passes model_args as strings ("none" becomes None already); treat "" as None too."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    return value


def _opt_int(name: str, value: Any) -> int | None:
    value = _none(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an integer") from None
    if as_int != value and str(as_int) != str(value).strip():
        raise ValueError(f"{name}={value!r} must be an integer")
    return as_int


def _opt_share(name: str, value: Any) -> float | None:
    """A refinement share: ``None``/"none"/"0" -> ``None`` (off); else a number (range checked by the policy)."""
    value = _none(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]") from None
    return None if as_float == 0 else as_float


def cache_options(
    *,
    policy: Any = "full",
    bits: Any = None,
    budget: Any = None,
    window: Any = None,
    group_size: Any = None,
    sinks: Any = "first",
    n_first: Any = None,
    max_sinks: Any = None,
    positions: Any = None,
    score: Any = None,
    profile: Any = None,
    refine: Any = None,
) -> dict[str, Any]:
    """Translate lm-eval model arguments (strings, or what lm-eval's parser made of them) into
    ``SinkCache`` keyword arguments, raising on anything that would not mean what it says.

    * ``sinks``: lm-eval parses ``sinks=none`` into ``None``, so ``None`` (and ``""``) mean
      ``"none"``; every other value must be one of :data:`~sinkcache.sinks.SINK_MODES`.
    * ``n_first`` / ``max_sinks`` / ``bits`` / ...: ``None`` keeps the cache's own default; ``0``
      is ``0``.
    * ``policy``: a name; ``None`` is an error (there is no "no policy").
    """
    from .scores import SCORE_NAMES
    from .sinks import SINK_MODES

    if policy is None or (isinstance(policy, str) and not policy.strip()):
        raise ValueError(f"policy={policy!r}: pass one of full, evict, quantize, hybrid")
    if isinstance(sinks, str):
        sinks = sinks.strip().lower() or "none"
    sinks = "none" if sinks is None else sinks
    if sinks not in SINK_MODES and sinks != "profile":
        raise ValueError(f"sinks={sinks!r} is unknown; allowed: {', '.join(SINK_MODES)} (or profile=PATH)")
    profile = _none(profile)
    if profile is not None:
        if sinks not in ("first", "profile"):  # "first" is the default, i.e. not given
            raise ValueError(f"profile= selects sinks by token id; it cannot be combined with sinks={sinks!r}")
        sinks = "profile"
    elif sinks == "profile":
        raise ValueError("sinks=profile needs profile=PATH (or a built-in model name)")
    pos = _none(positions)
    sc = _none(score)
    if sc is not None and str(sc).strip().lower() not in SCORE_NAMES:
        raise ValueError(f"score={sc!r} is unknown; allowed: {', '.join(SCORE_NAMES)}")
    return {
        "policy": str(policy).strip(),
        "bits": _opt_int("bits", bits),
        "budget": _opt_int("budget", budget),
        "window": _opt_int("window", window),
        "group_size": _opt_int("group_size", group_size),
        "sinks": sinks,
        "n_first": _opt_int("n_first", n_first),
        "max_sinks": _opt_int("max_sinks", max_sinks),
        "positions": None if pos is None else str(pos),
        "score": None if sc is None else str(sc).strip().lower(),
        "profile": profile,
        "refine": _opt_share("refine", refine),
    }


def _check_cache_kwargs(kw: dict[str, Any]) -> None:
    """Build the cache without a model: runs every argument check that needs no model.
    ``"punct"`` needs the tokenizer, so it is probed as ``"auto"`` (same cap and budget checks)."""
    probe = dict(kw)
    if probe["policy"] == "full":
        probe["sinks"] = "none"  # what a full cache is built with (sinks cannot matter)
        if probe.get("profile") is not None:
            probe["profile"] = None
    if probe.get("sinks") == "punct":
        probe["sinks"] = "auto"
    if probe.get("positions") == "shifted":
        # Re-rotation needs the model's RoPE; the value itself is checked by make_policy here.
        make_policy(probe["policy"], **{k: probe.get(k) for k in ("bits", "budget", "window", "group_size", "positions", "score")})
        probe["positions"] = None
    if probe.get("refine") is not None:
        # Attention-ranked refinement needs the model's attention modules; share and policy are checked here.
        from .refine import Refinement

        probe["refine"] = Refinement(probe["refine"], score="keynorm")
    if probe.get("score") not in (None, "keynorm"):
        # Attention scorers need the model's attention modules; the name and the policy are checked here.
        make_policy(probe["policy"], **{k: probe.get(k) for k in ("bits", "budget", "window", "group_size", "positions", "score")})
        probe["score"] = None
    SinkCache(**probe).detach()


def _hflm_arg_names() -> set[str]:
    import inspect

    return {n for n, p in inspect.signature(HFLM.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}


#: Our own (non-cache) model arguments.
_OWN_ARG_NAMES = ("pretrained", "chunk_size", "dtype", "attn_implementation", "device", "tokenizer", "batch_size", "max_batch_size")


def _check_hflm_kwargs(kwargs: dict[str, Any]) -> None:
    """``HFLM`` swallows unknown keyword arguments; a typo (``bit=2``) must not run another cache."""
    allowed = _hflm_arg_names()
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        import difflib

        names = sorted(set(CACHE_ARG_NAMES) | set(_OWN_ARG_NAMES) | allowed)
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"model '{SinkCacheLM._name()}' got unknown argument(s) {', '.join(hints)}; cache arguments: "
            f"{', '.join(CACHE_ARG_NAMES)}; other arguments: {', '.join(n for n in names if n not in CACHE_ARG_NAMES)}"
        )


def merge_configs(configs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record for many built-cache descriptions: a field's value when they all agree, else
    ``{"min", "max", "mean"}`` for numbers or the sorted distinct values for anything else."""
    if not configs:
        return {}
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for c in configs for k in c))
    for k in keys:
        vals = [c.get(k) for c in configs]
        distinct = {json.dumps(v, sort_keys=True, default=str) for v in vals}
        if len(distinct) == 1:
            out[k] = vals[0]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            nums: list[int | float] = [v for v in vals if isinstance(v, (int, float))]
            out[k] = {"min": min(nums), "max": max(nums), "mean": sum(nums) / len(nums), "n": len(nums)}
        else:
            out[k] = sorted(distinct)
    return out


def _resolve_device(device: str | None) -> str:
    from .placement import resolve_device

    return resolve_device(device)


def _model_dtype(dtype: str | torch.dtype | None, device: str) -> str | torch.dtype:
    """The dtype the lm-eval model loads with: what ``sinkcache eval`` picks (bfloat16 on CUDA,
    float32 on CPU) when none is given, so ``--model_args`` and the CLI load the same model."""
    if isinstance(dtype, torch.dtype):
        return dtype
    from .placement import resolve_dtype

    return resolve_dtype(_none(dtype), device)


class _KVLog:
    """Per-request KV-cache footprint: bytes held vs. what a full (``DynamicCache``) cache holds."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, float, float]] = []  # (task, request type, memory, dense)
        self.configs: list[dict[str, Any]] = []  # each request's built cache (see SinkCache.describe)
        # streaming perplexity: (task, mean bytes attended per scored token, same for a full cache, peak)
        self.attended: list[tuple[str, float, float, float]] = []

    def add(self, task: str, kind: str, memory: float, dense: float, n: int = 1) -> None:
        self.records.extend([(task, kind, float(memory), float(dense))] * n)

    def built(self, config: dict[str, Any]) -> None:
        self.configs.append(config)

    def add_attended(self, task: str, mean_memory: float, mean_dense: float, peak: float) -> None:
        self.attended.append((task, float(mean_memory), float(mean_dense), float(peak)))

    def reset(self) -> None:
        self.records.clear()
        self.configs.clear()
        self.attended.clear()

    @staticmethod
    def _summary(records: Sequence[tuple[str, str, float, float]]) -> dict[str, Any]:
        n = len(records)
        mem = sum(r[2] for r in records) / n if n else 0.0
        dense = sum(r[3] for r in records) / n if n else 0.0
        return {
            "requests": n,
            "mean_memory_bytes": mem,
            "mean_dense_bytes": dense,
            "ratio_vs_full": (mem / dense) if dense else 1.0,
            "compression": (dense / mem) if mem else 1.0,
        }

    def summary(self) -> dict[str, Any]:
        out = self._summary(self.records)
        per_task: dict[str, list] = defaultdict(list)
        for r in self.records:
            per_task[r[0]].append(r)
        out["per_task"] = {t: self._summary(rs) for t, rs in sorted(per_task.items())}
        att: dict[str, list] = defaultdict(list)
        for a in self.attended:
            att[a[0]].append(a)
        for t, rs in att.items():
            mem = sum(r[1] for r in rs) / len(rs)
            dense = sum(r[2] for r in rs) / len(rs)
            # What attention really used while scoring (the final state alone understates it: a
            # token scored early in a chunk attends a less compressed past than the last one).
            out["per_task"].setdefault(t, {}).update(
                attended_mean_bytes=mem,
                attended_dense_bytes=dense,
                attended_ratio_vs_full=(mem / dense) if dense else 1.0,
                attended_peak_bytes=max(r[3] for r in rs),
            )
        return out


# --------------------------------------------------------------------------------------- the model


@register_model("sinkcache")
class SinkCacheLM(HFLM):
    """lm-eval ``HFLM`` whose every request runs through a fresh, compressing :class:`SinkCache`.

    Args:
        pretrained: a sinkcache alias (``smollm2-135m``), a GGUF file, a local checkpoint dir or a
            Hub id (all resolved by :func:`sinkcache.models.load_model`), or a loaded model object
            (then pass ``tokenizer=`` too).
        policy, bits, budget, window, group_size, sinks, n_first, max_sinks, positions, score, profile, refine:
            the cache (see :class:`~sinkcache.SinkCache`; ``refine`` is a share, attention-ranked). ``policy="full"`` keeps everything and
            is the reference (built with ``sinks="none"``: nothing is compressed, so no sink can
            matter). ``sinks=None`` means ``"none"``: lm-eval turns the model argument
            ``sinks=none`` into ``None`` before it reaches this class.
        chunk_size: tokens per forward when streaming text for perplexity
            (``loglikelihood_rolling``).
        dtype: model dtype name or ``torch.dtype`` (default: bfloat16 on CUDA, float32 on CPU, as
            ``sinkcache eval``; ``auto``: the checkpoint's own).
        attn_implementation: passed to ``load_model``.
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (default: CUDA when available). Under
            ``accelerate launch`` each process uses its own device.
        tokenizer: a tokenizer object or path (default: the model's).
        batch_size: requests per forward (an int; ``auto`` means 1). On CPU, 1 is fastest.
        **kwargs: other ``HFLM`` arguments (``max_length``, ``add_bos_token``, ``prefix_token_id``,
            ``think_end_token``, ...). A name that is neither raises ``ValueError`` listing the
            allowed names (``HFLM`` would silently ignore it: ``bit=2`` would run 4-bit).

    After a run, :attr:`kv_memory` holds the mean bytes per request that the caches held and what
    a full cache would have held (also reported in lm-eval's results under ``config.sinkcache``).
    """

    def __init__(
        self,
        pretrained: Any = "smollm2-135m",
        *,
        policy: str = "full",
        bits: int | None = None,
        budget: int | None = None,
        window: int | None = None,
        group_size: int | None = None,
        sinks: str | None = "first",
        n_first: int | None = None,
        max_sinks: int | None = None,
        positions: str | None = None,
        score: str | None = None,
        profile: Any = None,
        refine: float | None = None,
        chunk_size: int = 128,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = 64,
        **kwargs: Any,
    ) -> None:
        cache_kwargs = cache_options(
            policy=policy, bits=bits, budget=budget, window=window, group_size=group_size, sinks=sinks,
            n_first=n_first, max_sinks=max_sinks, positions=positions, score=score, profile=profile, refine=refine,
        )
        _check_hflm_kwargs(kwargs)
        _check_cache_kwargs(cache_kwargs)  # bad knobs fail before the (slow) model load
        chunk = _opt_int("chunk_size", chunk_size)
        if chunk is None or chunk < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
        for unsupported in ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel"):
            if kwargs.get(unsupported):
                raise ValueError(f"model '{self._name()}' does not support {unsupported}=")
            kwargs.pop(unsupported, None)
        for ignored in ("revision", "trust_remote_code", "use_fast_tokenizer", "gguf_file", "subfolder", "backend"):
            if kwargs.pop(ignored, None) not in (None, False, "", "main", "default", True):
                logger.warning("sinkcache model: %s= is ignored (the model is loaded by sinkcache.models)", ignored)

        accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator, InitProcessGroupKwargs

            accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
            device = str(accelerator.device)
        device = _resolve_device(device)
        dtype = _model_dtype(dtype, device)

        if isinstance(pretrained, str):
            from .models import load_model

            model, tok = load_model(
                pretrained,
                dtype=dtype,
                attn_implementation=_none(attn_implementation),
                progress=accelerator is None or accelerator.is_local_main_process,
            )
            model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to() confuses mypy
            name = pretrained
        else:
            model, tok = pretrained, None
            name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
        if tokenizer is not None:
            if isinstance(tokenizer, str):
                tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
            else:
                tok = tokenizer
        if tok is None:
            raise ValueError("pass tokenizer= when pretrained= is a model object")
        model.eval()

        bs = batch_size
        if isinstance(bs, str) and bs.startswith("auto"):
            logger.warning("sinkcache model: batch_size=%s is not supported; using 1", bs)
            bs = 1
        with _quiet_hflm_init():
            super().__init__(
                pretrained=model,
                tokenizer=tok,
                batch_size=int(bs or 1),
                max_batch_size=max_batch_size,
                **kwargs,
            )
        self.pretrained = name
        self.cache_kwargs = cache_kwargs
        self.chunk_size = chunk
        self.kv_log = _KVLog()
        self._task = "?"
        if accelerator is not None and accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        SinkCacheLM._live.add(self)
        probe = self.make_cache()  # validate sinks/max_sinks/budget against this model and tokenizer
        self._validated = self.describe_cache(probe)
        probe.detach()

    @staticmethod
    def _name() -> str:
        return "sinkcache"

    # ---- cache ------------------------------------------------------------------------------------
    def make_cache(self) -> SinkCache:
        """A fresh cache for one request (or one batch), attached to the model."""
        if self.cache_kwargs["policy"] == "full":
            # Nothing is compressed, so no sink can matter: skip the attention-observing hooks that
            # sinks="auto" would install (they cost a few percent of every forward).
            return SinkCache("full", sinks="none", model=self.model)
        return SinkCache(**self.cache_kwargs, model=self.model, tokenizer=self.tokenizer)

    def _pad_quantum(self) -> int:
        """Rows are batched only when their left padding is a multiple of this (see module doc)."""
        policy = self.make_policy()
        if isinstance(policy, (QuantizePolicy, HybridPolicy)):
            return policy.group_size
        return 1

    def make_policy(self):
        kw = self.cache_kwargs
        return make_policy(
            kw["policy"], bits=kw["bits"], budget=kw["budget"], window=kw["window"], group_size=kw["group_size"],
            positions=kw["positions"], score=kw["score"], refine=kw.get("refine"),
        )

    def _record(self, cache: Any, rows: int, kind: str) -> None:
        mem = cache.memory_bytes()  # runs pending compression first
        dense = cache.dense_bytes()
        self.kv_log.add(self._task, kind, mem / rows, dense / rows, n=rows)
        self.kv_log.built(self.describe_cache(cache))

    def describe_cache(self, cache: Any) -> dict[str, Any]:
        """What a request's cache really was (read back from the object; see ``SinkCache.describe``)."""
        return cache.describe()

    @property
    def built_cache(self) -> dict[str, Any]:
        """The caches this model really built: one value per field when every request agreed,
        ``{"min", "max", "mean"}`` (numbers) or a sorted list (others) where they differed (e.g.
        a per-request budget). Before any request: the cache built at construction."""
        return merge_configs(self.kv_log.configs or [self._validated])

    @property
    def kv_memory(self) -> dict[str, Any]:
        """Mean KV bytes per request held by the caches and by a full cache, overall and per task,
        with the cache really built (``cache``) and the options asked for (``cache_requested``)."""
        out = self.kv_log.summary()
        out["cache"] = self.built_cache
        out["cache_requested"] = dict(self.cache_kwargs)
        return out

    @contextlib.contextmanager
    def _forward_ctx(self):
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            yield

    #: Every constructed model (weakly): ``python -m sinkcache.evaluation`` reports their KV memory.
    _live: weakref.WeakSet = weakref.WeakSet()

    #: Set by :class:`~sinkcache.fork_lm.ForkLM` while this model serves as one of its members: the
    #: prompt's forward was recorded once and is loaded into this model's cache instead of rerun.
    _shared: Any = None

    def _prefill(self, cache: SinkCache, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Feed ``ids`` ``[B, T]`` (left-padded per ``mask``) into ``cache`` and compress it."""
        if ids.shape[1] == 0:
            return
        shared = self._shared
        if shared is not None:
            if not shared.matches(ids, mask):
                raise RuntimeError("the shared prefill recorded other tokens than this request's")
            shared.fork_into(cache)
        else:
            self._prefill_forward(cache, ids, mask)
        cache.compress()

    def _prefill_forward(self, cache: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The prompt's forward into ``cache`` (no compression)."""
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        with self._forward_ctx():
            self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )

    # ---- per-task bookkeeping -----------------------------------------------------------------------
    def _by_task(self, requests: list, fn: Callable[[list], list]) -> list:
        """Run ``fn`` on the requests of each task in turn (so KV memory is tracked per task)."""
        order: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            order[getattr(req, "task_name", None) or "?"].append(i)
        out: list = [None] * len(requests)
        try:
            for task, idx in order.items():
                self._task = task
                res = fn([requests[i] for i in idx])
                for i, r in zip(idx, res, strict=True):
                    out[i] = r
        finally:
            self._task = "?"
            self._gather_kv()
        return out

    def _gather_kv(self) -> None:
        if self.world_size <= 1:
            return
        gathered = self.gather_object(self.kv_log.records, dst=0)
        if self.rank == 0 and gathered is not None:
            self.kv_log.records = [r for part in gathered for r in part]
        else:
            self.kv_log.records = []

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_task(requests, lambda reqs: HFLM.loglikelihood(self, reqs, disable_tqdm=disable_tqdm))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._by_task(requests, lambda reqs: self._rolling(reqs, disable_tqdm=disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_task(requests, lambda reqs: self._generate_bucketed(reqs, disable_tqdm=disable_tqdm))

    # ---- loglikelihood ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score continuations against the compressed context.

        ``requests``: ``[((context, continuation) | None, context_enc, continuation_enc), ...]``.
        Per batch: prefill ``context[:-1]`` (left-padded), ``compress()``, then one forward of
        ``[context[-1]] + continuation[:-1]`` per request (right-padded) against the cache.
        """
        # Group requests by (truncated) context: one prefill serves every continuation of a context.
        groups: dict[tuple[int, ...], list[tuple[int, Any, list[int]]]] = {}
        for i, (key, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("empty continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            ctx_t = tuple(whole[: len(whole) - len(cont)])
            if not ctx_t:
                raise ValueError("empty context (lm-eval should have inserted the prefix token)")
            groups.setdefault(ctx_t, []).append((i, key, list(cont)))

        q = self._pad_quantum()
        bs = int(override_bs or self.batch_size or 1)
        buckets: dict[tuple[int, int], list[tuple[int, ...]]] = defaultdict(list)
        for ctx_t in groups:
            p = len(ctx_t) - 1
            buckets[(p % q, int(p == 0))].append(ctx_t)
        batches: list[list[tuple[int, ...]]] = []
        for keys in buckets.values():
            keys.sort(key=lambda c: (-len(c), c))
            batches.extend(keys[j : j + bs] for j in range(0, len(keys), bs))
        batches.sort(key=lambda b: -len(b[0]))

        res: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0), desc="Running loglikelihood requests")
        for batch in batches:
            rows = [(g, item) for g, ctx_t in enumerate(batch) for item in groups[ctx_t]]
            scored = self._score_batch(batch, rows)
            for (_, (i, key, _cont)), answer in zip(rows, scored, strict=True):
                res[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            pbar.update(len(rows))
        pbar.close()
        return res

    def _prompt_batch(self, contexts: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``contexts[:-1]`` left-padded: ids and mask ``[B, T]`` on the device (the prefill)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        plen = max(len(c) - 1 for c in contexts)
        ids = torch.full((len(contexts), plen), pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), plen), dtype=torch.long)
        for g, c in enumerate(contexts):
            n = len(c) - 1
            if n:
                ids[g, plen - n :] = torch.tensor(c[:-1])
                mask[g, plen - n :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _score_batch(self, contexts: list[tuple[int, ...]], rows: list) -> list[tuple[float, bool]]:
        dev = self.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = self._prompt_batch(contexts)
        plen = ids.shape[1]
        cache = self.make_cache()
        try:
            self._prefill(cache, ids, mask)
            sel = torch.tensor([g for g, _ in rows], dtype=torch.long, device=dev)
            if plen and (len(rows) != len(contexts) or bool((sel != torch.arange(len(contexts), device=dev)).any())):
                cache.batch_select_indices(sel)
            seqs = [[contexts[g][-1]] + cont[:-1] for g, (_, _, cont) in rows]
            qlen = max(len(s) for s in seqs)
            ids2 = torch.full((len(rows), qlen), pad_id, dtype=torch.long)
            mask2 = torch.zeros((len(rows), qlen), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids2[r, : len(s)] = torch.tensor(s)
                mask2[r, : len(s)] = 1
            ids2, mask2 = ids2.to(dev), mask2.to(dev)
            full_mask = torch.cat([mask.index_select(0, sel), mask2], dim=1)
            pos = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -qlen:]
            with self._forward_ctx():
                logits = self.model(
                    input_ids=ids2,
                    attention_mask=full_mask,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                ).logits
            logp = F.log_softmax(logits.to(self.softmax_dtype or torch.float32), dim=-1)
            out = []
            for r, (_, (_, _, cont)) in enumerate(rows):
                lp = logp[r, : len(cont)]
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                out.append((float(lp.gather(-1, target.unsqueeze(-1)).sum()), greedy))
            self._record(cache, len(rows), "loglikelihood")
        finally:
            cache.detach()
        return out

    # ---- rolling loglikelihood (perplexity) ---------------------------------------------------------------
    def _rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=(disable_tqdm or self.rank != 0), desc="Running loglikelihood_rolling requests"):
            (string,) = req.args
            total = self.stream_loglikelihood(self.tok_encode(string))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def stream_loglikelihood(self, tokens: Sequence[int], chunk_size: int | None = None) -> float:
        """Log-likelihood of ``tokens`` (after the prefix token), streamed through one compressing
        cache ``chunk_size`` tokens at a time: each chunk is scored against the compressed past."""
        chunk = int(chunk_size or self.chunk_size)
        seq = [self.prefix_token_id] + list(tokens)
        if len(seq) < 2:
            return 0.0
        cache = self.make_cache()
        total = 0.0
        att_mem = att_dense = peak = 0.0
        try:
            inputs, targets = seq[:-1], seq[1:]
            for start in range(0, len(inputs), chunk):
                ids = torch.tensor([inputs[start : start + chunk]], dtype=torch.long, device=self.device)
                tgt = torch.tensor(targets[start : start + chunk], dtype=torch.long, device=self.device)
                pos = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
                past_mem, past_dense = cache.memory_bytes(), cache.dense_bytes()  # compressed already
                with self._forward_ctx():
                    logits = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
                logp = F.log_softmax(logits[0].to(self.softmax_dtype or torch.float32), dim=-1)
                total += float(logp.gather(-1, tgt.unsqueeze(-1)).sum())
                # The j-th token of the chunk attends the compressed past plus j+1 exact chunk tokens.
                c = int(ids.shape[1])
                per_tok = (cache.dense_bytes() - past_dense) / c
                att_mem += c * past_mem + per_tok * c * (c + 1) / 2
                att_dense += c * past_dense + per_tok * c * (c + 1) / 2
                peak = max(peak, past_mem + per_tok * c)
                cache.compress()
            self._record(cache, 1, "loglikelihood_rolling")
            n = len(inputs)
            self.kv_log.add_attended(self._task, att_mem / n, att_dense / n, peak)
        finally:
            cache.detach()
        return total

    # ---- generation -------------------------------------------------------------------------------------
    def _generate_bucketed(self, requests, disable_tqdm: bool = False) -> list[str]:
        q = self._pad_quantum()
        if q == 1 or int(self.batch_size) == 1:
            return HFLM.generate_until(self, requests, disable_tqdm=disable_tqdm)
        # Batch only contexts whose lengths agree modulo the quantization group (see module doc).
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            n = int(self.tok_batch_encode([req.args[0]])[0].shape[1])
            buckets[n % q].append(i)
        out: list = [None] * len(requests)
        for idx in buckets.values():
            res = HFLM.generate_until(self, [requests[i] for i in idx], disable_tqdm=disable_tqdm)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(context)
        cache = self.make_cache()
        try:
            # Prefill all but the last context token and compress, so that even the first generated
            # token is predicted against the compressed context.
            self._prefill(cache, context[:, :-1], mask[:, :-1])
            out = super()._model_generate(
                context, max_length, stop, attention_mask=mask, past_key_values=cache, **generation_kwargs
            )
            self._record(cache, context.shape[0], "generate_until")
        finally:
            cache.detach()
        return out

    # ---- reporting ---------------------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        """Model facts for lm-eval's results (no Hub lookups), plus the cache and its KV memory."""
        model = self._model
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(getattr(model, "dtype", "")),
            "model_revision": None,
            "model_sha": "",
            "sinkcache": self.kv_memory,
        }


@contextlib.contextmanager
def _quiet_hflm_init():
    """HFLM warns twice that a model object was passed; that is how this class always works."""
    log = logging.getLogger("lm_eval.models.huggingface")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


# --------------------------------------------------------------------------------------- run_eval


def _versions() -> dict[str, str]:
    import lm_eval

    out = {
        "sinkcache": __version__,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(Exception):
        import datasets

        out["datasets"] = datasets.__version__
    out.update(_source_fingerprint())
    return out


def _source_fingerprint() -> dict[str, str]:
    """Which sinkcache code produced a result: a hash of the package's ``.py`` files (changes with
    any uncommitted edit) and, in a git checkout, the commit and whether the package is modified."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    out = {"sinkcache_source_sha256": h.hexdigest()[:16]}
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(root.parent)]
        run = dict(capture_output=True, text=True, timeout=10, check=True)
        out["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], **run).stdout.strip()  # type: ignore[call-overload]
        dirty = subprocess.run([*git, "status", "--porcelain", "--", str(root)], **run).stdout.strip()  # type: ignore[call-overload]
        out["git_package_modified"] = "yes" if dirty else "no"
    return out


def _all_local(tasks: Iterable[str]) -> bool:
    """Every task is the offline suite's or an offline RULER variant: nothing may use the network."""
    from .ruler import OFFLINE_TASKS

    return all(str(t).startswith("sinkcache") or str(t) in OFFLINE_TASKS for t in tasks)


def check_task_names(tasks: Sequence[str], tm: Any) -> None:
    """Raise ``ValueError`` naming every task ``tm`` does not know (with close matches), so a typo
    fails in seconds instead of after the model has loaded. YAML paths pass through."""
    import difflib

    known = set(tm.all_tasks)
    bad = [t for t in tasks if t not in known and not Path(t).is_file()]
    if not bad:
        return
    parts = []
    for t in bad:
        close = difflib.get_close_matches(t, known, n=3, cutoff=0.6)
        parts.append(f"{t!r}" + (f" (close: {', '.join(close)})" if close else ""))
    raise ValueError(
        f"unknown task{'s' if len(bad) > 1 else ''} {'; '.join(parts)}; allowed: sinkcache_suite or one of its "
        "sinkcache_* tasks (offline), ruler_offline, or any lm-eval task or group name"
    )


def _only_suite(tasks: Iterable[str]) -> bool:
    """Only the offline suite's tasks: lm-eval's ~14,700 built-in ones need not be indexed."""
    return all(str(t).startswith("sinkcache") for t in tasks)


def _scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {"metric,filter": value}}`` without aliases and stderr (those stay in ``lm_eval``)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        out[task] = {
            k: v
            for k, v in metrics.items()
            if k not in ("alias", "sample_len") and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return out


def _env_report_once() -> None:
    """Make torch's environment report, which lm-eval records on every ``simple_evaluate``, run once
    per process. It shells out to pip, nvidia-smi, ... (~7 s on the 2-core CI machine), and a
    compare shard evaluates once per policy: 13 policies paid ~90 s for the same text."""
    import functools

    import torch.utils.collect_env as collect_env

    if not hasattr(collect_env.get_pretty_env_info, "cache_info"):  # not wrapped yet
        collect_env.get_pretty_env_info = functools.lru_cache(maxsize=1)(collect_env.get_pretty_env_info)


def _simple_evaluate(lm, tasks, *, num_fewshot, batch_size, limit, task_manager, log_samples, apply_chat_template, seed, bootstrap_iters, progress, samples=None):
    import lm_eval

    _env_report_once()
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        samples=samples,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=str(lm.device),
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=int(bootstrap_iters),
        verbosity="ERROR" if not progress else None,
    )


def run_eval(
    model_name: str,
    tasks: str | Sequence[str] = ("sinkcache_suite",),
    *,
    policy: str = "full",
    bits: int | None = None,
    budget: int | None = None,
    window: int | None = None,
    group_size: int | None = None,
    sinks: str | None = "first",
    n_first: int | None = None,
    max_sinks: int | None = None,
    positions: str | None = None,
    score: str | None = None,
    profile: Any = None,
    refine: float | None = None,
    limit: int | float | None = None,
    output: str | Path | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    chunk_size: int = 128,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    seed: int = 0,
    bootstrap_iters: int = 1000,
    model: Any = None,
    tokenizer: Any = None,
    num_threads: int | None = None,
    progress: bool = True,
    ruler_lengths: Sequence[int] = (1024, 2048),
    policies: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_name`` under one cache policy with lm-eval; return (and write) a JSON report.

    Args:
        model_name: sinkcache alias, GGUF file, checkpoint dir or Hub id (see ``load_model``).
        tasks: task or group names, e.g. ``["sinkcache_suite"]`` (the offline suite) or Hub tasks
            such as ``["gsm8k", "arc_challenge"]`` (those need Hub access). A comma-separated string
            works too.
        policy, bits, budget, window, group_size, sinks, n_first, max_sinks, positions, score, profile, refine:
            the cache (as for :class:`SinkCacheLM`; ``sinks="none"`` means no sinks).
        limit: documents per task (an int) or a fraction (< 1); ``None`` = all.
        output: write the report here as JSON (parent folders are created).
        batch_size: requests per forward (1 is fastest on CPU).
        device: ``cpu``/``cuda``/... (default: CUDA when available).
        dtype: model dtype (``float32``, ``bfloat16``, ``float16``; default: bfloat16 on CUDA,
            float32 on CPU).
        chunk_size: tokens per forward for streaming perplexity.
        num_fewshot: override the tasks' few-shot count.
        include_path: extra task folder(s); default ``evals/tasks`` (``$SINKCACHE_EVAL_TASKS``).
        apply_chat_template: format prompts with the model's chat template.
        log_samples: keep per-document outputs (under ``lm_eval["samples"]``).
        seed: lm-eval's random/numpy/torch/few-shot seed.
        bootstrap_iters: lm-eval's stderr setting: means (``exact_match``, ``acc``) get their
            closed-form stderr whenever this is > 0; only a few metrics (f1, bleu, ...) are
            bootstrapped, with this many draws. 0 = no stderr at all.
        model, tokenizer: an already loaded model and tokenizer to use instead of loading
            ``model_name`` (``model_name`` is then only a label).
        num_threads: ``torch.set_num_threads`` for the run (default: torch's choice). On a busy
            machine 1 thread can beat 2 by a wide margin.
        progress: print progress lines and lm-eval's progress bars.
        ruler_lengths: document lengths (tokens) for lm-eval's RULER tasks. ``ruler_offline`` names
            the variants that run offline (:mod:`sinkcache.ruler`); the model's tokenizer is saved
            to a local folder and given to them, as they require. Offline (``HF_HUB_OFFLINE=1``),
            the variants that download are skipped with a one-line reason (``skipped_tasks``).
        policies: several policies (``["full", "quantize", "evict"]``) scored from one prefill per
            request (:class:`~sinkcache.fork_lm.ForkLM`; the same scores as separate runs). Each
            policy takes the cache knobs it uses (``bits`` for quantize/hybrid, ``budget`` for
            evict/hybrid, ...); ``policy`` is then ignored. Returns ``{"policies": {name: report}}``.

    Returns:
        ``{"config", "versions", "scores", "memory", "time_s", "n_samples", "lm_eval"}`` where
        ``scores`` is ``{task: {"metric,filter": value}}``, ``memory`` holds the mean KV bytes per
        request (``mean_memory_bytes``, ``mean_dense_bytes`` for a full cache, ``ratio_vs_full``,
        ``compression``, ``per_task``) and ``lm_eval`` the harness's own result tables.
    """

    task_list = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    task_list = [t for t in task_list if t]
    if not task_list:
        raise ValueError("no tasks given")
    from . import ruler

    skipped: dict[str, str] = {}
    if any(ruler.is_ruler(t) for t in task_list):
        ruler.check_available()
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        task_list, skipped = ruler.expand(task_list, offline=offline)
        if not task_list:
            raise ValueError(f"every task needs a download: {', '.join(f'{k} ({v})' for k, v in skipped.items())}")
    if _all_local(task_list):
        # Everything is local: never let datasets/hub try the network.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Indexing lm-eval's ~14,700 built-in tasks takes seconds (tens on a busy CPU): skip it when
    # only the offline suite is asked for. Names are checked here, before the model loads.
    tm = task_manager(include_path, include_defaults=not _only_suite(task_list))
    check_task_names(task_list, tm)

    def say(msg: str) -> None:
        if progress:
            print(f"sinkcache eval: {msg}", file=sys.stderr, flush=True)

    cache_args: dict[str, Any] = {
        "policy": policy,
        "bits": bits,
        "budget": budget,
        "window": window,
        "group_size": group_size,
        "sinks": sinks,
        "n_first": n_first,
        "max_sinks": max_sinks,
        "positions": positions,
        "score": score,
        "profile": profile,
        "refine": refine,
    }
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    from .placement import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    say(f"loading {model_name} (policy={policy}, {', '.join(f'{k}={v}' for k, v in cache_args.items() if v is not None and k != 'policy')})")
    lm = SinkCacheLM(
        pretrained=model if model is not None else model_name,
        tokenizer=tokenizer,
        chunk_size=chunk_size,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        **(cache_args if not policies else {"policy": "full"}),  # with policies: the members hold the caches
    )
    runner: Any = lm
    if policies:
        from .fork_lm import ForkLM
        from .policies import POLICY_KNOBS

        bad = [q for q in policies if q not in POLICY_KNOBS]
        if bad:
            raise ValueError(f"policies {bad} are unknown; allowed: {', '.join(POLICY_KNOBS)}")
        own = ("policy", "bits", "budget", "window", "group_size", "positions", "score", "refine")
        shared = {k: v for k, v in cache_args.items() if k not in own}
        members = {
            q: SinkCacheLM(
                pretrained=lm.model, tokenizer=lm.tokenizer, chunk_size=chunk_size, device=str(lm.device), batch_size=batch_size,
                policy=q, **{k: cache_args[k] for k in POLICY_KNOBS[q]}, **(shared if q != "full" else {}),
            )
            for q in dict.fromkeys(policies)
        }
        runner = ForkLM(members)
    t_load = time.perf_counter() - t0
    for t, why in skipped.items():
        say(f"skipping {t}: {why} (offline)")
    tm_kwargs: dict[str, Any] = {}
    if any(ruler.is_ruler(t) for t in task_list):
        tok_dir = ruler.tokenizer_path(lm.tokenizer, model_name if model is None else getattr(lm.tokenizer, "name_or_path", model_name))
        tm_kwargs["metadata"] = ruler.metadata(tok_dir, list(ruler_lengths))
        # RULER sizes its documents with the model's tokenizer: a task manager that carries it.
        tm = task_manager(include_path, include_defaults=not _only_suite(task_list), **tm_kwargs)
    say(f"model ready in {t_load:.1f} s; running {', '.join(task_list)}" + (f" (limit {limit})" if limit is not None else ""))
    t1 = time.perf_counter()
    with ruler.quiet_punkt():
        tasks_arg: list[Any] = list(task_list)
        samples = None
        if "metadata" in tm_kwargs and isinstance(limit, int):
            # RULER lays documents out length by length: take the first `limit` of each length.
            from lm_eval.tasks import get_task_dict

            tdict = get_task_dict(task_list, tm)
            samples = ruler.samples_per_length(tdict, limit)
            tasks_arg = list(ruler.leaf_tasks(tdict).values())  # loaded once (RULER generates its data)
        evaluate = lambda m: _simple_evaluate(  # noqa: E731
            m,
            tasks_arg,
            samples=samples,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            limit=None if samples is not None else limit,
            task_manager=tm,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            seed=seed,
            bootstrap_iters=bootstrap_iters,
            progress=progress,
        )
        if policies:
            all_results = runner.run_all(evaluate)
        else:
            all_results = {"": evaluate(lm)}
    elapsed = time.perf_counter() - t1
    if any(r is None for r in all_results.values()):  # non-zero rank under data parallelism
        return {}
    say(f"done in {elapsed:.1f} s")
    reports = {
        name: _report(
            runner.members[name] if policies else lm, res, model_name=model_name, task_list=task_list, skipped=skipped,
            ruler_lengths=ruler_lengths, limit=limit, batch_size=batch_size, chunk_size=chunk_size, num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template, seed=seed, bootstrap_iters=bootstrap_iters, include_path=include_path,
            time_s={"load": round(t_load, 2), "eval": round(elapsed, 2)},
        )
        for name, res in all_results.items()
    }
    report: dict[str, Any] = reports[""] if not policies else {"policies": reports, "fork": dict(runner.timing)}
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        from lm_eval.utils import handle_non_serializable

        path.write_text(json.dumps(report, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        say(f"wrote {path}")
    return report


def _report(lm, results, *, model_name, task_list, skipped, ruler_lengths, limit, batch_size, chunk_size, num_fewshot,
            apply_chat_template, seed, bootstrap_iters, include_path, time_s) -> dict[str, Any]:
    from . import ruler

    memory = lm.kv_memory
    return {
        "config": {
            "model": model_name,
            "tasks": task_list,
            "skipped_tasks": skipped,
            "ruler_lengths": list(ruler_lengths) if any(ruler.is_ruler(t) for t in task_list) else None,
            "cache": memory.get("cache", lm.built_cache),  # read back from the caches that ran
            "cache_requested": dict(lm.cache_kwargs),
            "limit": limit,
            "batch_size": batch_size,
            "device": str(lm.device),
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "chunk_size": chunk_size,
            "num_fewshot": num_fewshot,
            "apply_chat_template": apply_chat_template,
            "seed": seed,
            "bootstrap_iters": bootstrap_iters,
            "num_threads": torch.get_num_threads(),
            "include_path": str(include_path or default_tasks_dir()),
        },
        "versions": _versions(),
        "scores": _scores(results),
        "memory": {k: v for k, v in memory.items() if k not in ("cache", "cache_requested")},
        "time_s": time_s,
        "n_samples": results.get("n-samples", {}),
        "lm_eval": {
            k: results[k]
            for k in ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples", "samples")
            if k in results
        },
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(result: dict[str, Any]) -> str:
    """lm-eval's table(s) for ``result`` (from :func:`run_eval`) plus the KV-memory line."""
    from lm_eval.utils import make_table

    raw = result.get("lm_eval") or {}
    parts = []
    if raw.get("results"):
        parts.append(make_table(raw))
    if raw.get("groups"):
        parts.append(make_table(raw, "groups"))
    cfg = result.get("config", {})
    for task, why in (cfg.get("skipped_tasks") or {}).items():
        parts.append(f"skipped {task}: {why} (offline)")
    parts += kv_memory_lines(result.get("memory") or {}, cfg.get("cache", {}))
    t = result.get("time_s") or {}
    if t:
        parts.append(f"time: load {t.get('load', 0):.1f} s, eval {t.get('eval', 0):.1f} s")
    return "\n".join(parts)


def kv_memory_lines(mem: dict[str, Any], cache: dict[str, Any]) -> list[str]:
    """The "KV memory" line (mean bytes per request vs a full cache) and, for streaming
    perplexity, what a scored token attended."""
    if not mem.get("requests"):
        return []
    out = [
        f"KV memory ({describe_short(cache)}): {_fmt_bytes(mem['mean_memory_bytes'])} per request vs "
        f"{_fmt_bytes(mem['mean_dense_bytes'])} full cache = {100 * mem['ratio_vs_full']:.1f}% "
        f"({mem['compression']:.2f}x smaller), mean over {mem['requests']} requests"
    ]
    for task, m in (mem.get("per_task") or {}).items():
        # Streaming perplexity: the cache shrinks only at each compress(), so what a scored
        # token attends over is more than the end-of-document size above.
        if m.get("attended_ratio_vs_full") is not None:
            out.append(
                f"  {task}: a scored token attends {_fmt_bytes(m['attended_mean_bytes'])} of KV on average "
                f"= {100 * m['attended_ratio_vs_full']:.1f}% of full (peak {_fmt_bytes(m['attended_peak_bytes'])})"
            )
    return out


def describe_short(cache: dict[str, Any]) -> str:
    """``policy=evict, budget=64, window=16, positions=true, sinks=first, n_first=1`` for a built
    cache record (:meth:`SinkCache.describe`; fields that vary per request show their range)."""
    skip = ("policy_class", "sink_selector", "layers", "sliding_layers", "profile")
    parts = []
    for k, v in cache.items():
        if k in skip or v is None:
            continue
        if isinstance(v, dict) and {"min", "max"} <= set(v):
            v = f"{v['min']}..{v['max']}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def print_report(result: dict[str, Any], file=None) -> None:
    """Print lm-eval's results table and the KV-memory line for a :func:`run_eval` result."""
    print(format_report(result), file=file or sys.stdout)


# --------------------------------------------------------------------------------------- CLI wrapper


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sinkcache.evaluation [lm_eval options]``: lm-eval's CLI with ``sinkcache`` registered.

    Adds ``--include_path`` for the offline suite unless given. Works under ``accelerate launch -m``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    wants_help = not args or any(a in ("-h", "--help") for a in args)
    if not wants_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(default_tasks_dir())]
    from lm_eval.__main__ import cli_evaluate

    from .ruler import quiet_punkt

    old = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        with quiet_punkt():
            cli_evaluate()
    finally:
        sys.argv = old
    # lm-eval printed its tables; add what it cannot know: the KV memory each model's caches held.
    for lm in list(SinkCacheLM._live):
        if lm.rank == 0:
            for line in kv_memory_lines(lm.kv_memory, lm.built_cache):
                print(line)


if __name__ == "__main__":
    main()
