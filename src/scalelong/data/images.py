"""Image data sets held in memory as uint8 tensors, fetched a whole batch at a time."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from scalelong.data.sampler import BatchRequest


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
