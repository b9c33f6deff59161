# Everything runs inside a virtual environment in the checkout (.venv), created when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test quickstart bench bench-gpu gpu-wheels clean

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

# The one prepared GPU check (scripts/bench_gpu.py, under 8 minutes on one CUDA GPU, nothing
# downloaded): plain and Lightning steps, a real train.py run, sample.py in bf16 and fp32, the gates,
# compiled against eager, and the paper job's hours; docs/benchmarks.md says how to read it. It
# needs no `make install`: on the GPU machine it runs on the system python3 with the wheels of
# `make gpu-wheels` (carried along as .gpu_wheels/).
BENCH_PY := $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	$(BENCH_PY) scripts/bench_gpu.py $(BENCH_ARGS)

# hydra-core, omegaconf and antlr4 (which the GPU machine lacks) as wheels in .gpu_wheels/, for
# machines without PyPI: bench_gpu.py installs them from there with pip --no-index.
GPU_WHEELS := .gpu_wheels
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(BENCH_PY) -m pip download --quiet --no-deps --only-binary=:all: --dest $(GPU_WHEELS) \
		hydra-core==1.3.2 omegaconf==2.3.0
	$(BENCH_PY) -m pip wheel --quiet --no-deps --wheel-dir $(GPU_WHEELS) antlr4-python3-runtime==4.9.3
	ls $(GPU_WHEELS)
