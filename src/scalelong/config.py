"""Checks on a resolved run configuration that need no Lightning import, so that bad input is
reported in a second, before anything is built or written."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from scalelong.data.sampler import check_global_batch
from scalelong.errors import ConfigError
from scalelong.scaling import build_skip_scaling


def _run_folder(resume: str | None, new_folder: str) -> str:
    """hydra.run.dir: a resumed run continues in its own folder, a new one gets a new folder."""
    return str(resume) if resume else new_folder


if not OmegaConf.has_resolver("run_folder"):
    OmegaConf.register_new_resolver("run_folder", _run_folder)


def to_plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved configuration as plain Python containers."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return dict(cfg)


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "auto", "-1"):
        accel = trainer_cfg.get("accelerator", "auto")
        devices = torch.cuda.device_count() if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


def validate(config: Mapping[str, Any]) -> None:
    """Checks that fail fast with one readable line, before anything is built or written."""
    build_skip_scaling(config["scaling"])
    check_global_batch(int(config["train"]["batch_size"]), world_size(config["trainer"]))
    if int(config["train"]["max_steps"]) < 1:
        raise ConfigError(f"train.max_steps must be at least 1, got {config['train']['max_steps']}")


def resolve_resume(config: dict[str, Any]) -> str | None:
    """The checkpoint to continue from: ``ckpt_path``, or ``<resume>/checkpoints/last.ckpt``."""
    if config.get("ckpt_path") and config.get("resume"):
        raise ConfigError("give either ckpt_path or resume, not both")
    if config.get("resume"):
        path = Path(config["resume"]) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"resume={config['resume']}: no checkpoint at {path}; pass a run folder that has one")
        return str(path)
    if config.get("ckpt_path"):
        path = Path(config["ckpt_path"])
        if not path.is_file():
            raise ConfigError(f"ckpt_path={path}: no such file")
        return str(path)
    # A requeued job (SLURM, submitit) restarts with the same command and folder: continue.
    last = Path(config.get("run_dir") or ".") / "checkpoints" / "last.ckpt"
    if config.get("auto_resume", True) and config.get("run_dir") and last.is_file():
        return str(last)
    return None


