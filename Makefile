# Copy-paste entry points (see README). Python >= 3.10, CPU is enough.
PY ?= python3
# The CPU build of torch is tried first (small, and what CI uses); any torch >= 2.4 works.
TORCH_CPU ?= torch==2.13.0+cpu
# kvpress (a peer in `sinkcache compare`) pins transformers<5.3, so it lives in its own virtualenv.
KVPRESS_VENV ?= $(HOME)/.cache/sinkcache/venvs/kvpress
KVPRESS ?= kvpress==0.5.5

.PHONY: setup demo test lint peers

define install_torch
	@if $(1) -c "import torch" 2>/dev/null; then \
		echo "torch: keeping the installed $$($(1) -c 'import torch; print(torch.__version__)')"; \
	elif $(1) -m pip install -q "$(TORCH_CPU)"; then \
		echo "torch: installed $(TORCH_CPU)"; \
	else \
		echo "torch: $(TORCH_CPU) is not reachable here (see pip's message above); installing torch>=2.4 from the index instead (on Linux x86_64 that is a CUDA build of several GB)"; \
		$(1) -m pip install -q "torch>=2.4" && echo "torch: installed $$($(1) -c 'import torch; print(torch.__version__)')"; \
	fi
endef

setup:
	$(call install_torch,$(PY))
	$(PY) -m pip install -q -e ".[dev]"

demo: setup
	sinkcache demo

lint:
	$(PY) -m ruff check sinkcache tests evals examples
	$(PY) -m mypy sinkcache

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

# The kvpress virtualenv `sinkcache compare` drives for the kvpress-* peers (evals/peers/README.md).
# `sinkcache compare` looks for it here, or wherever $$SINKCACHE_KVPRESS_PYTHON points.
peers:
	$(PY) -m venv $(KVPRESS_VENV)
	$(call install_torch,$(KVPRESS_VENV)/bin/python)
	$(KVPRESS_VENV)/bin/python -m pip install -q "$(KVPRESS)"
	$(KVPRESS_VENV)/bin/python -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '?', 'transformers', transformers.__version__, 'in $(KVPRESS_VENV)')"
