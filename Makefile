# Everything runs inside a virtual environment in the checkout (.venv), created when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test quickstart bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info

quickstart: install
	$(PY) train.py

# Side-by-side speed figures (CPU-sized; see scripts/benchmark.py --help for GPU settings).
bench: install
	$(PY) scripts/benchmark.py
