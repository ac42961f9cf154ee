"""Offline calibration / held-out text: docstrings of the Python standard library.

Profiles (``sinkcache profile``), threshold calibration and the sink benchmark need ordinary
English-with-code text and no network. The standard library's docstrings are exactly that, are
present on every machine that runs this package, and are deterministic for a given Python
version. Each module of :data:`MODULES` belongs to exactly one split, decided by a stable hash of
its name (``zlib.crc32``, not ``hash()``), so calibration and held-out text never share a module.

Public API: :func:`documents`, :func:`split_text`, :func:`token_chunks`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

SPLITS = ("calibration", "heldout")

#: Pure-library modules with substantial docstrings, importable without side effects on 3.10+.
MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.utils", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.handlers",
    "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "py_compile", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "struct", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipapp", "zipfile", "zoneinfo",
)

#: Share of modules (by stable hash) that go to the calibration split; the rest is held out.
CALIBRATION_SHARE = 0.5


def split_of(module_name: str) -> str:
    """``"calibration"`` or ``"heldout"``: a stable function of the module name only."""
    bucket = zlib.crc32(module_name.encode("utf-8")) % 1000
    return "calibration" if bucket < CALIBRATION_SHARE * 1000 else "heldout"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
    return split


def _members(obj: Any, prefix: str, depth: int) -> Iterator[tuple[str, Any]]:
    """Public members defined in this module, sorted by name (classes one level deep)."""
    for name in sorted(vars(obj)):
        if name.startswith("_"):
            continue
        member = vars(obj)[name]
        if not (inspect.isclass(member) or inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                or inspect.isbuiltin(member)):
            continue
        mod = getattr(member, "__module__", None)
        if depth == 0 and mod is not None and mod != prefix and not str(mod).lstrip("_").startswith(prefix.lstrip("_")):
            continue  # re-exported from elsewhere: it belongs to that module's document
        yield f"{prefix}.{name}", member
        if depth == 0 and inspect.isclass(member):
            yield from _members(member, f"{prefix}.{name}", 1)


#: A default value's repr can carry its memory address (``<object object at 0x7f...>``), which
#: differs in every process; it is dropped so the text (and every chunk cut from it) is the same
#: in every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _signature(obj: Any) -> str:
    try:
        return _ADDRESS.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return ""


def module_document(module_name: str) -> str:
    """One module's docstrings as a plain-text document (module doc, then each member's)."""
    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn on attribute access
        warnings.simplefilter("ignore")
        return _module_document(module_name)


def _module_document(module_name: str) -> str:
    mod = importlib.import_module(module_name)
    parts: list[str] = []
    doc = inspect.getdoc(mod)
    if doc:
        parts.append(f"{module_name}\n{'=' * len(module_name)}\n\n{doc.strip()}")
    for qual, member in _members(mod, module_name, 0):
        d = member.__doc__ if isinstance(getattr(member, "__doc__", None), str) else None
        if not d or len(d.strip()) < 40:
            continue
        head = qual + (_signature(member) if callable(member) and not inspect.isclass(member) else "")
        parts.append(f"{head}\n\n{inspect.cleandoc(d).strip()}")
    return "\n\n\n".join(parts)


def documents(split: str) -> list[tuple[str, str]]:
    """``(module name, document)`` for every module of ``split``, in :data:`MODULES` order.

    Modules that fail to import on this interpreter are skipped (the split stays deterministic for
    a given Python build).
    """
    _check_split(split)
    out = []
    for name in MODULES:
        if split_of(name) != split:
            continue
        try:
            doc = module_document(name)
        except Exception:  # noqa: BLE001 - a module missing from this build is simply skipped
            continue
        if doc:
            out.append((name, doc))
    return out


def split_text(split: str) -> str:
    """All documents of ``split`` joined by blank lines."""
    return "\n\n\n".join(doc for _, doc in documents(split))


def _adds_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer prepends on its own (Gemma), else None (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def token_chunks(tokenizer, split: str, length: int, n: int | None = None, stride: int | None = None) -> list[list[int]]:
    """Token-id chunks of exactly ``length`` tokens cut from ``split``'s text.

    Each document is tokenized on its own (no special tokens) and chunks are cut from the
    concatenated stream (documents joined by a blank line) every ``stride`` tokens (default:
    ``length``, no overlap). If the tokenizer adds a BOS token to ordinary input (Gemma), each chunk
    starts with it, so a chunk looks like a normal prompt. At most ``n`` chunks.
    """
    _check_split(split)
    if length < 2:
        raise ValueError(f"length={length} must be >= 2")
    stride = length if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    bos = _adds_bos(tokenizer)
    body = length - (1 if bos is not None else 0)
    sep = tokenizer("\n\n\n", add_special_tokens=False).input_ids
    stream: list[int] = []
    chunks: list[list[int]] = []
    pos = 0
    for _, doc in documents(split):
        if stream:
            stream.extend(sep)
        stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        while pos + body <= len(stream):
            chunk = stream[pos : pos + body]
            chunks.append(([bos] if bos is not None else []) + chunk)
            pos += stride
            if n is not None and len(chunks) >= n:
                return chunks
    return chunks
