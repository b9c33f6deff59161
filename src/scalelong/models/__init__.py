"""Backbones: U-ViT and a CNN UNet, both with pluggable long-skip scaling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from scalelong.errors import ConfigError
from scalelong.models.unet import UNET_PRESETS, UNet, unet_from_preset
from scalelong.models.uvit import UVIT_PRESETS, UViT, convert_official_uvit_state_dict, uvit_from_preset

BACKBONES = {"uvit": (uvit_from_preset, UVIT_PRESETS), "unet": (unet_from_preset, UNET_PRESETS)}


def build_backbone(model: Mapping[str, Any], scaling: Any, dataset: Mapping[str, Any]) -> nn.Module:
    """Build ``model.backbone`` from ``model.preset`` for ``dataset``'s images.

    The data set fixes image size, channels and (when conditional) the number of classes;
    ``model.options`` overrides any other constructor argument of the preset.
    """
    name = model.get("backbone")
    if name not in BACKBONES:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(BACKBONES)}")
    factory, presets = BACKBONES[name]
    if dataset.get("text_conditional") and name != "uvit":
        raise ConfigError(f"data set {dataset.get('name')!r} is text-conditional: only model=uvit takes text tokens")
    preset = model.get("preset")
    if preset not in presets:
        raise ConfigError(f"unknown {name} preset {preset!r}; valid presets: {', '.join(presets)}")
    args = dict(img_size=int(dataset["image_size"]), in_chans=int(dataset["channels"]))
    if dataset.get("conditional"):
        # One more embedding, the "no label" class, when labels are dropped for guidance.
        extra = 1 if float(dataset.get("label_drop_prob") or 0) > 0 else 0
        args["num_classes"] = int(dataset["num_classes"]) + extra
    if dataset.get("text_conditional"):
        args.update(context_dim=int(dataset["context_dim"]), num_context_tokens=int(dataset["num_context_tokens"]))
    args.update(dict(model.get("options") or {}))
    scaling = dict(scaling) if isinstance(scaling, Mapping) else scaling
    return factory(preset, scaling=scaling, **args)


__all__ = ["UViT", "UNet", "UVIT_PRESETS", "UNET_PRESETS", "uvit_from_preset", "unet_from_preset",
           "convert_official_uvit_state_dict", "build_backbone", "BACKBONES"]
