"""A cheap, honest sample-quality measure for the digits: the Frechet distance (and KID) in the
feature space of a small CNN trained to classify scikit-learn's digits, instead of Inception
(seconds per image on a CPU). Its features plug into the FID machinery like Inception's."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalelong.metrics.inception import cache_dir
from scalelong.utils.io import atomic_write

VERSION = 1  # bump when the network or its training changes: cached weights are keyed by it


class DigitClassifier(nn.Module):
    """16x16 grey digits -> 10 classes; ``features`` is the 64-d layer before the last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """x (B, 1, 16, 16) in [0, 1] -> (B, 64)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitClassifier, float]:
    """The classifier trained on 1,500 of the 1,797 digits (16x16, as the data set serves them);
    returns it and its accuracy on the other 297. A few seconds on a CPU."""
    from scalelong.data import load_digits_images

    data = load_digits_images(16)
    x = data.images.float() / 255.0
    y = data.labels
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train, held_out = order[:1500], order[1500:]
    torch.manual_seed(seed)
    net = DigitClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=g).split(100):
            idx = train[batch]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((net(x[held_out]).argmax(1) == y[held_out]).float().mean())
    return net.eval(), accuracy


def load_digit_classifier(cache: str | Path | None = None) -> tuple[DigitClassifier, str, float]:
    """The classifier from ``<cache>/digits/classifier_v{VERSION}.pt`` (trained and saved the first
    time); returns (network, sha1 of the weights file, held-out accuracy)."""
    path = Path(cache) if cache is not None else cache_dir() / "digits" / f"classifier_v{VERSION}.pt"
    if not path.is_file():
        net, accuracy = train_digit_classifier()
        buffer = io.BytesIO()
        torch.save({"state_dict": net.state_dict(), "accuracy": accuracy, "version": VERSION}, buffer)
        with atomic_write(path) as f:
            f.write(buffer.getvalue())
    data = path.read_bytes()
    stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    net = DigitClassifier()
    net.load_state_dict(stored["state_dict"])
    return net.eval().requires_grad_(False), hashlib.sha1(data).hexdigest(), float(stored["accuracy"])


class DigitFeatures(nn.Module):
    """The classifier's 64 features, with the interface of the Inception extractors: ``resize``
    (numpy HWC uint8 -> float HWC; the digits are already 16x16), ``dim``, ``mode``, ``sha1``, and
    a call on float (B, 3, 16, 16) in [0, 255] (grey repeated, as the FID pipeline feeds it)."""

    dim = 64
    mode = "digit_classifier"

    def __init__(self, cache: str | None = None):
        super().__init__()
        self.net, self.sha1, self.accuracy = load_digit_classifier(cache)

    @staticmethod
    def resize(image: np.ndarray) -> np.ndarray:
        if image.shape[:2] != (16, 16):
            raise ValueError(f"the digit classifier reads 16x16 images, got {image.shape[:2]}")
        return image.astype(np.float32)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x[:, :1].to(self.device, torch.float32) / 255.0)
