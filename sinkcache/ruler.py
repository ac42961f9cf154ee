"""lm-eval's own RULER tasks, offline.

RULER's tasks generate their documents locally, sized by a tokenizer that must be given as a
*path* in the task metadata (``TaskManager(metadata={"tokenizer": PATH, "max_seq_lengths": [...]})``)
and need the ``wonderwords`` package. The variants with essay haystacks or QA data download them
and cannot run offline; they are skipped with a one-line reason. ``ruler_offline`` names the
variants that run offline.

nltk's ``punkt_tab`` (which lm-eval tries to download when RULER's NIAH module is imported) is
used only to split essays into sentences (``prepare_niah.generate_input_output``, essay haystack
only), so its absence changes no score of the offline variants: the download attempt is skipped
when the data is missing, and one line says so.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("sinkcache.ruler")

#: The RULER variants that need no download (noise/repeat haystacks, locally generated words).
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
#: The others, and why they cannot run offline.
DOWNLOADING = {
    "niah_single_2": "essay haystack (downloads Paul Graham essays)",
    "niah_single_3": "essay haystack (downloads Paul Graham essays)",
    "niah_multikey_1": "essay haystack (downloads Paul Graham essays)",
    "niah_multiquery": "essay haystack (downloads Paul Graham essays)",
    "niah_multivalue": "essay haystack (downloads Paul Graham essays)",
    "ruler_qa_squad": "downloads SQuAD",
    "ruler_qa_hotpot": "downloads HotpotQA",
}
ALIAS = "ruler_offline"
DEFAULT_LENGTHS = (1024, 2048)


def is_ruler(task: str) -> bool:
    return task == ALIAS or task == "ruler" or task in OFFLINE_TASKS or task in DOWNLOADING


def expand(tasks: Sequence[str], *, offline: bool = True) -> tuple[list[str], dict[str, str]]:
    """``(tasks to run, {skipped task: reason})``: ``ruler_offline`` (and lm-eval's ``ruler`` group,
    when ``offline``) become the offline variants; downloading variants are skipped when ``offline``."""
    out: list[str] = []
    skipped: dict[str, str] = {}
    for t in tasks:
        if t == ALIAS or (t == "ruler" and offline):
            if t == "ruler":
                skipped.update(DOWNLOADING)
            out += [x for x in OFFLINE_TASKS if x not in out]
        elif offline and t in DOWNLOADING:
            skipped[t] = DOWNLOADING[t]
        elif t not in out:
            out.append(t)
    return out, skipped


def tokenizer_path(tokenizer: Any, name: str) -> str:
    """A local folder holding ``tokenizer`` (RULER sizes its documents with it): ``name`` itself when
    it is a folder with tokenizer files, else the tokenizer saved under ``~/.cache/sinkcache/tokenizers``."""
    p = Path(str(name)).expanduser()
    if p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return str(p.resolve())
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "tokenizer"
    dst = Path.home() / ".cache" / "sinkcache" / "tokenizers" / safe
    if not (dst / "tokenizer_config.json").exists():
        dst.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(dst))
    return str(dst)


def metadata(tokenizer_dir: str, lengths: Sequence[int] = DEFAULT_LENGTHS) -> dict[str, Any]:
    """The ``TaskManager`` metadata RULER's tasks read (tokenizer path, document lengths)."""
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 256]
    if bad or not lengths:
        raise ValueError(f"RULER lengths {list(lengths)!r}: give integers >= 256, e.g. 1024,2048")
    return {"tokenizer": tokenizer_dir, "max_seq_lengths": [int(n) for n in lengths]}


def check_available() -> None:
    """Raise a one-line error when RULER's data generator cannot run (``wonderwords`` missing)."""
    try:
        import wonderwords  # noqa: F401
    except ImportError:
        raise ImportError("RULER tasks need the wonderwords package: pip install 'sinkcache[eval]' (or pip install wonderwords)") from None


@contextlib.contextmanager
def quiet_punkt() -> Iterator[None]:
    """Skip lm-eval's ``nltk.download("punkt_tab")`` when the data is absent (see the module doc)."""
    try:
        import nltk
    except ImportError:
        yield
        return
    try:
        nltk.data.find("tokenizers/punkt_tab")
        yield
        return
    except LookupError:
        pass
    logger.info("nltk punkt_tab is not installed: only RULER's essay-haystack variants use it (skipped offline)")
    orig = nltk.download
    nltk.download = lambda *a, **k: False  # type: ignore[assignment]
    try:
        yield
    finally:
        nltk.download = orig  # type: ignore[assignment]


def leaf_tasks(task_dict: Any) -> dict[str, Any]:
    """``{task name: Task}`` of an lm-eval task dict (groups flattened)."""
    out: dict[str, Any] = {}
    for k, v in task_dict.items():
        if isinstance(v, dict):
            out.update(leaf_tasks(v))
        else:
            out[getattr(v, "task_name", None) or str(k)] = v
    return out


def samples_per_length(task_dict: Any, limit: int) -> dict[str, list[int]]:
    """lm-eval ``samples=``: the first ``limit`` documents of every RULER length (RULER lays its
    documents out length by length, so ``limit=`` alone would take the shortest length only), and
    the first ``limit`` documents of every other task."""
    out: dict[str, list[int]] = {}
    for name, task in leaf_tasks(task_dict).items():
        docs = task.eval_docs
        if is_ruler(name):
            by_len: dict[int, list[int]] = {}
            for i, d in enumerate(docs):
                by_len.setdefault(int(d["max_length"]), []).append(i)
            out[name] = sorted(i for idx in by_len.values() for i in idx[:limit])
        else:
            out[name] = list(range(min(limit, len(docs))))
    return out
