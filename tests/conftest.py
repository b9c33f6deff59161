"""Shared test helpers: compose the real Hydra configs, shrunk for the CPU."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from scalelong.config import compose as compose_config
from scalelong.config import to_plain

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run on as many workers as there are cores (pytest -n auto): one thread each, in this
    # process and in the ones it starts, instead of every worker claiming every core.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str], run_dir: Path | str | None = None) -> dict:
    """The resolved run config for ``overrides``, as ``python train.py`` would see it."""
    return to_plain(compose_config(overrides, run_dir or "."))


def load_script(name: str):
    """``scripts/<name>.py`` as a module. It is registered in ``sys.modules`` (report.py's
    dataclasses look their module up there), and ``scripts/`` is importable while it loads
    (benchmark_gate.py imports benchmark.py)."""
    spec = importlib.util.spec_from_file_location(f"scalelong_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


@pytest.fixture
def compose_cfg():
    return compose
