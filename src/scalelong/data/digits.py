"""The built-in data set: scikit-learn's handwritten digits, shipped inside its wheel (no download).

1,797 grey-scale digits of 8x8 pixels with values 0-16, scaled to [0, 255] and resized
(bilinear) to ``size`` x ``size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from scalelong.data.images import InMemoryImages


def load_digits(cfg: Mapping[str, Any]) -> InMemoryImages:
    """The ``digits`` data set at ``cfg["image_size"]`` (default 16)."""
    return load_digits_images(size=int(cfg.get("image_size", 16)))


def load_digits_images(size: int = 16) -> InMemoryImages:
    from sklearn import datasets

    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return InMemoryImages(images, torch.as_tensor(digits.target), num_classes=10)
