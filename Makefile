# Everything runs inside a virtual environment in the checkout (.venv), created when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test quickstart bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# On every core; the slowest tests are listed at the end.
test: install
	$(PY) -m pytest -q -n auto --dist worksteal --durations=10

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info

quickstart: install
	$(PY) train.py

# Side-by-side speed figures (CPU-sized; see scripts/benchmark.py --help for GPU settings).
bench: install
	$(PY) scripts/benchmark.py

# The same on one CUDA GPU at the paper's batch in bf16, with model.compile=true against eager,
# then the gates' cost interleaved (docs/benchmarks.md says how to read both).
bench-gpu: install
	$(PY) scripts/benchmark.py --device cuda --precision bf16 --batch 128 --steps 20 --warmup 5
	$(PY) scripts/benchmark_gate.py --device cuda --precision bf16 --batch 128 --rounds 30
