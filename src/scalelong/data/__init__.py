"""Data sets (each a ``dataset=`` config, whose ``load`` names the function that reads it) and the
step-keyed loading that feeds training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from scalelong.data.coco import CocoLatentFeatures, sample_latents
from scalelong.data.digits import load_digits_images
from scalelong.data.images import InMemoryImages
from scalelong.data.sampler import BatchRequest, StepBatchSampler, batch_len, check_global_batch
from scalelong.data.space import DataSpace
from scalelong.utils.errors import ConfigError

# Loaders of configs written before data sets named their own (checkpoints of older runs).
_LEGACY_LOADERS = {"digits": "scalelong.data.digits.load_digits", "cifar10": "scalelong.data.cifar10.load_cifar10",
                   "celeba64": "scalelong.data.celeba.load_celeba",
                   "imagenet64": "scalelong.data.imagenet.load_imagenet64", "mscoco": "scalelong.data.coco.load_coco"}


def build_dataset(cfg: Mapping[str, Any]) -> Dataset:
    """The data set of a ``dataset`` config: ``cfg["load"]`` (a ``_target_`` function) called with
    ``cfg``. An error when its item shape is not the config's."""
    from hydra.utils import get_method

    load = cfg.get("load")
    if callable(load):  # already instantiated (a config passed through Hydra's instantiate)
        loader = load
    else:
        target = load.get("_target_") if isinstance(load, Mapping) else _LEGACY_LOADERS.get(str(cfg.get("name")))
        if target is None:
            raise ConfigError(f"data set {cfg.get('name')!r} names no loader: give its config a "
                              "`load: {_target_: package.module.function, _partial_: true}`")
        try:
            loader = get_method(str(target))
        except Exception as err:
            raise ConfigError(f"dataset.load._target_={target!r} cannot be imported ({err})") from None
    data = loader({k: v for k, v in cfg.items() if k != "load"})
    size = cfg.get("image_size")
    expected = (int(cfg.get("channels", data.shape[0])), int(size or data.shape[1]), int(size or data.shape[2]))
    if tuple(data.shape) != expected:
        raise ConfigError(f"data set {cfg.get('name')!r} has items of shape {tuple(data.shape)}, the config says "
                          f"{expected}")
    return data


__all__ = ["BatchRequest", "batch_len", "CocoLatentFeatures", "DataSpace", "InMemoryImages", "StepBatchSampler",
           "build_dataset", "check_global_batch", "load_digits_images", "sample_latents"]
