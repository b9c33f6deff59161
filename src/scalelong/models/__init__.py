"""Backbones: U-ViT and a CNN UNet, both with pluggable long-skip scaling."""

from scalelong.models.uvit import UVIT_PRESETS, UViT, convert_official_uvit_state_dict, uvit_from_preset

__all__ = ["UViT", "UVIT_PRESETS", "uvit_from_preset", "convert_official_uvit_state_dict"]
