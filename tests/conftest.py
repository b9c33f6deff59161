"""Shared test helpers: compose the real Hydra configs, shrunk for the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import scalelong.config  # noqa: F401  (registers the resolvers the configs use)

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str], run_dir: Path | str | None = None) -> dict:
    """The resolved run config for ``overrides``, as ``python train.py`` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[*overrides, f"run_dir={run_dir or '.'}"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def compose_cfg():
    return compose
