"""Data sets (each a ``dataset=`` choice) and the step-keyed loading that feeds training."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset

from scalelong.errors import ConfigError
from scalelong.data.celeba import load_celeba
from scalelong.data.cifar10 import load_cifar10
from scalelong.data.coco import CocoLatentFeatures, load_coco, sample_latents
from scalelong.data.digits import load_digits_images
from scalelong.data.imagenet import load_imagenet64
from scalelong.data.images import InMemoryImages
from scalelong.data.sampler import BatchRequest, StepBatchSampler, batch_len, check_global_batch, step_seed

# name -> loader(dataset config) -> data set (InMemoryImages for pixels, CocoLatentFeatures for latents)
LOADERS: dict[str, Callable[[Mapping[str, Any]], Dataset]] = {
    "digits": lambda cfg: load_digits_images(size=int(cfg.get("image_size", 16))),
    "cifar10": load_cifar10,
    "celeba64": load_celeba,
    "imagenet64": load_imagenet64,
    "mscoco": load_coco,
}


def build_dataset(cfg: Mapping[str, Any]) -> Dataset:
    """The data set ``cfg['name']``; an error when its item shape is not the config's."""
    name = cfg.get("name")
    if name not in LOADERS:
        raise ConfigError(f"unknown data set {name!r}; valid data sets: {', '.join(LOADERS)}")
    data = LOADERS[name](cfg)
    size = cfg.get("image_size")
    expected = (int(cfg.get("channels", data.shape[0])), int(size or data.shape[1]), int(size or data.shape[2]))
    if data.shape != expected:
        raise ConfigError(f"data set {name!r} has items of shape {data.shape}, the config says {expected}")
    return data


__all__ = ["BatchRequest", "batch_len", "CocoLatentFeatures", "InMemoryImages", "StepBatchSampler", "build_dataset",
           "check_global_batch", "load_celeba", "load_cifar10", "load_coco", "load_digits_images",
           "load_imagenet64", "sample_latents", "step_seed", "LOADERS"]
