"""The built-in data set: scikit-learn's handwritten digits, shipped inside its wheel (no download).

1,797 grey-scale digits of 8x8 pixels with values 0-16, scaled to [0, 255] and resized
(bilinear) to ``size`` x ``size``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scalelong.data.images import InMemoryImages


def load_digits(cfg: Mapping[str, Any]) -> InMemoryImages:
    """The ``digits`` data set at ``cfg["image_size"]`` (default 16)."""
    return load_digits_images(size=int(cfg.get("image_size", 16)))


def digits_csv() -> Path | None:
    """The file scikit-learn's ``load_digits`` reads (``sklearn/datasets/data/digits.csv.gz``),
    found without importing scikit-learn, or None where the wheel keeps it elsewhere."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 8, 8) with values 0-16 and labels (1797,), as ``sklearn.datasets.load_digits``
    gives them. Read from its file directly: importing scikit-learn costs about 1.6 CPU-seconds,
    a sixth of a short run's start-up."""
    path = digits_csv()
    if path is None:
        from sklearn import datasets

        digits = datasets.load_digits()
        return digits.images, digits.target
    rows = np.loadtxt(path, delimiter=",")  # 64 pixel values, then the label
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)


def load_digits_images(size: int = 16) -> InMemoryImages:
    pixels, labels = digits_arrays()
    images = torch.as_tensor(pixels, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return InMemoryImages(images, torch.as_tensor(labels), num_classes=10)
