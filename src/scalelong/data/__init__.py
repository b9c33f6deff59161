"""Data sets (each a ``dataset=`` choice) and the step-keyed loading that feeds training."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from scalelong.errors import ConfigError
from scalelong.data.digits import load_digits_images
from scalelong.data.images import InMemoryImages
from scalelong.data.sampler import BatchRequest, StepBatchSampler, check_global_batch, step_seed

# name -> loader(dataset config) -> data set
LOADERS: dict[str, Callable[[Mapping[str, Any]], InMemoryImages]] = {
    "digits": lambda cfg: load_digits_images(size=int(cfg.get("image_size", 16))),
}


def build_dataset(cfg: Mapping[str, Any]) -> InMemoryImages:
    name = cfg.get("name")
    if name not in LOADERS:
        raise ConfigError(f"unknown data set {name!r}; valid data sets: {', '.join(LOADERS)}")
    data = LOADERS[name](cfg)
    size = cfg.get("image_size")
    expected = (int(cfg.get("channels", data.shape[0])), int(size or data.shape[1]), int(size or data.shape[2]))
    if data.shape != expected:
        raise ConfigError(f"data set {name!r} has items of shape {data.shape}, the config says {expected}")
    return data


__all__ = ["BatchRequest", "InMemoryImages", "StepBatchSampler", "build_dataset", "check_global_batch",
           "load_digits_images", "step_seed", "LOADERS"]
