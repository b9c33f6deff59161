"""Image data sets held in memory as uint8 tensors, fetched a whole batch at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from scalelong.data.sampler import BatchRequest


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 images (N, C, h, w) at ``size`` x ``size``: bilinear, rounded back to uint8 (how the
    digits data set makes its 16x16 images from the 8x8 originals, so samples drawn at 8x8 read and
    look like the 16x16 digits). Images already at that size come back as they are."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(images.float() / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    return (resized.clamp(0, 1) * 255).round().to(torch.uint8)


class InMemoryImages(Dataset):
    """``images`` uint8 (N, C, H, W) in [0, 255]; ``labels`` long (N,) or None.

    Fetching goes through ``__getitems__`` with a ``BatchRequest``: one indexing operation per
    batch instead of N item look-ups and a collate. Conversion to [-1, 1] floats and random flips
    happen on the training device (see ``DiffusionModule``), so the loader only moves bytes.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, num_classes: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = None if labels is None else labels.long()
        self.num_classes = num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        out = {"images": self.images[i]}
        if self.labels is not None:
            out["labels"] = self.labels[i]
        return out

    def __getitems__(self, request: BatchRequest) -> dict[str, Tensor]:
        idx = torch.as_tensor(request.indices, dtype=torch.long)
        out = {"images": self.images[idx], "step": torch.tensor(request.step)}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out


def keep_batch(batch):
    """Collate function for ``__getitems__`` batches, which arrive collated already."""
    return batch
