"""What a data set's samples are to a model: their shape, the conditioning the network takes, and
how a loaded batch becomes the model's clean input x0 and condition."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scalelong.data.coco import sample_latents


@dataclass(frozen=True)
class DataSpace:
    """``image_shape`` (C, H, W) in model space; ``num_classes`` > 0 for class labels (the label
    ``num_classes`` is the null class when ``label_drop_prob`` > 0); ``context_shape`` (tokens, dim)
    for caption embeddings; ``latent_scale`` for autoencoder latents, decoded by ``decoder``."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int = 0
    label_drop_prob: float = 0.0
    context_shape: tuple[int, int] | None = None
    text_drop_prob: float = 0.0
    latent_scale: float | None = None
    decoder: str | None = None
    decoder_subfolder: str | None = None
    random_flip: bool = False

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> DataSpace:
        """From a ``dataset`` config node."""
        num_classes = int(data.get("num_classes") or 0) if data.get("conditional") else 0
        text = bool(data.get("text_conditional"))
        return cls(
            name=str(data["name"]),
            image_shape=(int(data["channels"]), int(data["image_size"]), int(data["image_size"])),
            num_classes=num_classes,
            label_drop_prob=float(data.get("label_drop_prob") or 0.0) if num_classes else 0.0,
            context_shape=(int(data["num_context_tokens"]), int(data["context_dim"])) if text else None,
            text_drop_prob=float(data.get("text_drop_prob") or 0.0) if text else 0.0,
            latent_scale=float(data["latent_scale"]) if data.get("latent_scale") else None,
            decoder=data.get("decoder"), decoder_subfolder=data.get("decoder_subfolder"),
            random_flip=bool(data.get("random_flip", False)),
        )

    @property
    def text_conditional(self) -> bool:
        return self.context_shape is not None

    def clean_input(self, batch: Mapping[str, Tensor], flip: Tensor | None = None,
                    latent_noise: Tensor | None = None) -> Tensor:
        """x0 in model space (B, C, H, W): pixels in [-1, 1] (mirrored where ``flip`` (B,) is true,
        when this data set flips), or latents sampled from the batch's moments with ``latent_noise``."""
        if "moments" in batch:
            return sample_latents(batch["moments"], scale=self.latent_scale, noise=latent_noise)
        x0 = batch["images"].float() / 127.5 - 1.0
        if self.random_flip and flip is not None:
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        return x0

    def condition(self, batch: Mapping[str, Tensor], drop: Tensor | None = None,
                  empty_context: Tensor | None = None) -> dict[str, Tensor]:
        """The network's conditioning keywords for a batch: ``y`` labels or ``context`` captions,
        replaced by the null label / the empty prompt where ``drop`` (B,) is below the drop rate."""
        if self.num_classes:
            y = batch["labels"]
            if self.label_drop_prob and drop is not None:
                y = torch.where(drop < self.label_drop_prob, torch.full_like(y, self.num_classes), y)
            return {"y": y}
        if self.text_conditional:
            context = batch["context"]
            if self.text_drop_prob and drop is not None:
                empty = empty_context.to(context.dtype).expand_as(context)
                context = torch.where((drop < self.text_drop_prob)[:, None, None], empty, context)
            return {"context": context}
        return {}
