"""Load a script of ``evals/`` (not a package) as a module, for the tests that mirror those scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EVALS = Path(__file__).resolve().parents[1] / "evals"


def load_eval_script(name: str) -> ModuleType:
    """``evals/<name>.py`` imported fresh under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, EVALS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
