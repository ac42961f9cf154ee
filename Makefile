# Copy-paste entry points (see README). Python >= 3.10, CPU is enough.
PY ?= python3

.PHONY: setup demo test lint

# CPU-only torch first where that wheel is reachable (it is on the project's machines); any torch >= 2.4 works.
setup:
	$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[dev]"

demo: setup
	sinkcache demo

lint:
	$(PY) -m ruff check sinkcache tests evals examples
	$(PY) -m mypy sinkcache

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider
