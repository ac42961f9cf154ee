"""Dataset loader for the sinkcache task YAMLs (``custom_dataset: !function sinkcache_data.load``).

lm-eval resolves a relative ``data_files`` path against the current working directory, so each
YAML names its file relative to ``evals/data`` and this function turns it into an absolute path
(generating the file with its seeded generator if it is missing), then loads it with
``datasets.load_dataset("json", ...)``: the suite runs offline from any directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _generator():
    name = "sinkcache_evals_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DATA_DIR / "generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def data_path(file_name: str) -> Path:
    """Absolute path of a task data file, generated first if missing."""
    path = Path(file_name)
    if path.is_absolute():
        return path
    path = (DATA_DIR / path).resolve()
    if not path.is_file():
        gen = _generator()
        task = path.name.removesuffix(".jsonl")
        if task not in gen.TASKS:
            raise FileNotFoundError(f"{path} does not exist and no generator is named {task!r}")
        gen.ensure(task, path.parent)
    return path


def load(data_files=None, **_metadata):
    """``DatasetDict`` for ``data_files`` (``{split: file name relative to evals/data}``)."""
    import datasets

    if not data_files:
        raise ValueError("sinkcache task YAMLs must set dataset_kwargs.data_files")
    if isinstance(data_files, str):
        data_files = {"test": data_files}
    files = {split: str(data_path(f)) for split, f in data_files.items()}
    # The files are local: keep datasets from looking anything up on the Hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return datasets.load_dataset("json", data_files=files)
