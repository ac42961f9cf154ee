"""The runtime core: ``import sinkcache`` and building any cache load no tooling (analysis,
profile measuring, comparisons, plots, lm-eval), so serving code pays for none of it."""

from __future__ import annotations

import subprocess
import sys

TOOLS = (
    "sinkcache.analysis", "sinkcache.profile", "sinkcache.calibration", "sinkcache.plots", "sinkcache.bench",
    "sinkcache.compare", "sinkcache.evaluation", "sinkcache.ruler", "lm_eval", "matplotlib",
)

SCRIPT = """
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import sinkcache
from sinkcache import SinkCache
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(cfg).eval()
caches = [
    SinkCache(),
    SinkCache(policy="evict", budget=64, sinks="auto", model=model),
    SinkCache(policy="evict", budget=64, score="tova", model=model),
    SinkCache(policy="evict", budget=64, score="snapkv", model=model),
    SinkCache(policy="quantize", bits=2, sinks="none"),
    SinkCache(policy="hybrid", bits=4, budget=512),
    SinkCache(policy="quantize", bits=4, profile="smollm2-135m"),
]
ids = torch.randint(0, 64, (1, 20))
for c in caches[1:4]:
    model.generate(ids, past_key_values=c, max_new_tokens=3, do_sample=False)
print(",".join(m for m in %r if m in sys.modules))
"""


def test_runtime_core_imports_no_tooling():
    out = subprocess.run([sys.executable, "-c", SCRIPT % (TOOLS,)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the runtime core imported tooling: {out.stdout.strip()}"


LIGHT = """
import sys
from sinkcache.cli import main
import sinkcache
codes = [main(["--version"]), main(["--help"])] + [main([c, "--help"]) for c in %r]
assert sinkcache.__version__
print(codes)
print("loaded:" + ",".join(m for m in ("torch", "transformers", "lm_eval", "numpy") if m in sys.modules))
"""


def test_cli_help_and_version_import_no_torch():
    # `sinkcache --help` / `--version` must answer in well under 2 s; importing torch and
    # transformers alone takes 2-7 s, so none of the heavy stacks may load to print help.
    commands = ("generate", "demo", "eval", "detect", "profile", "compare", "bench")
    out = subprocess.run([sys.executable, "-c", LIGHT % (commands,)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    codes, loaded = out.stdout.strip().splitlines()[-2:]
    assert codes == str([0] * (2 + len(commands))), out.stdout[-2000:]
    assert loaded == "loaded:", f"--help imported {loaded}"


def test_lazy_public_names():
    import sinkcache

    assert sinkcache.SinkCache.__name__ == "SinkCache"
    assert set(sinkcache.__all__) <= set(dir(sinkcache))
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sinkcache.nope  # noqa: B018
