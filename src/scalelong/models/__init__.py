"""Backbones with pluggable long-skip scaling: U-ViT, a CNN UNet and any diffusers ``UNet2DModel``.
Their presets are ``conf/model/*.yaml``; ``from_preset`` builds one from Python as training does."""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import nn

from scalelong.models.diffusers_unet import DiffusersUNet
from scalelong.models.unet import UNet
from scalelong.models.uvit import UViT, convert_official_uvit_state_dict


def preset_config(preset: str, dataset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The resolved ``model`` node of ``conf/model/<preset>.yaml`` for ``dataset``'s images (default:
    the data set whose ``model=uvit``/``unet`` this preset is), with ``overrides`` applied. The
    images are the data set's own (``conf/dataset``), not a training recipe's choice: the digits'
    presets are 16x16, though the quickstart's recipe draws the digits at 8x8."""
    from scalelong.config import conf_dir
    from scalelong.utils.errors import ConfigError

    if dataset is None:
        owners = _datasets_of(preset, conf_dir() / "model")
        if not owners:
            raise ConfigError(f"no data set uses the preset {preset!r} by default; pass dataset=...")
        dataset = owners[0]
    return {**copy.deepcopy(_composed_model(preset, dataset)), **overrides}


@functools.lru_cache(maxsize=None)
def _composed_model(preset: str, dataset: str) -> dict[str, Any]:
    """The resolved ``model`` node, composed once per process: a Hydra composition costs about
    0.1 s, and benchmarks and tests build the same few presets many times. Without the recipe
    (``~recipe``): the data set's images as ``conf/dataset`` gives them."""
    from omegaconf import OmegaConf

    from scalelong.config import compose

    return OmegaConf.to_container(compose([f"model={preset}", f"dataset={dataset}", "~recipe"]).model, resolve=True)


def from_preset(preset: str, dataset: str | None = None, scaling: Any = "none", **overrides: Any) -> nn.Module:
    """The network of ``conf/model/<preset>.yaml`` built as training builds it, for ``dataset``'s
    images (default: the data set the preset is made for), with ``overrides`` of its constructor
    arguments; ``scaling`` is a strategy name, config mapping or ``SkipScaling``. Example:
    ``from_preset("uvit_s2_32", scaling={"name": "constant", "kappa": 0.7})``."""
    from scalelong.build import build_network

    return build_network(preset_config(preset, dataset, **overrides), scaling)


def _datasets_of(preset: str, model_dir) -> list[str]:
    """The data sets whose default model is ``preset``, or a preset built on it (unet_tiny: the
    quickstart's unet_quickstart, the digits' default)."""
    aliases = sorted((model_dir / "by_dataset").glob("*.yaml"))
    owners = [a.stem.split("_", 1)[1] for a in aliases if f"/model/{preset}@" in a.read_text()]
    for child in sorted(model_dir.glob("*.yaml")):
        if owners:
            break
        if f"- {preset}@_here_" in child.read_text():
            owners = _datasets_of(child.stem, model_dir)
    return owners


__all__ = ["DiffusersUNet", "UViT", "UNet", "convert_official_uvit_state_dict", "from_preset", "preset_config"]
