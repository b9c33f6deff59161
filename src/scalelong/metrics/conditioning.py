"""What FID of a latent text-to-image model needs besides its weights: captions and a decoder.

U-ViT's MS-COCO protocol conditions each sample on one caption of a random val2014 image (the
val split of the caption features, ``CocoLatentFeatures.sample_contexts``), decodes the latents
with the Stable Diffusion autoencoder and compares the 256 x 256 pixels with val2014's images.
Pixel models need none of this: ``prepare_sampling`` returns ``None`` for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scalelong.errors import ConfigError
from scalelong.metrics.sampling import Contexts

DECODER_HINT = ("U-ViT decoded with the original Stable Diffusion KL-f8 autoencoder: dataset.decoder="
                "CompVis/stable-diffusion-v1-4 dataset.decoder_subfolder=vae (or a local diffusers folder)")


def prepare_sampling(module: Any, data_dir: str | Path | None = None, split: str | None = None, seed: int = 0,
                     decoder: str | None = None, decoder_subfolder: str | None = None,
                     require_decoder: bool = True) -> Contexts | None:
    """Make ``module`` ready to give FID samples; returns the caption contexts of a text model.

    A latent model must decode to pixels: ``decoder`` (or the checkpoint's ``dataset.decoder``)
    names the autoencoder, else a ``ConfigError`` says how to set it (unless
    ``require_decoder`` is false: previews of the latents will do). A text-conditional model
    reads its captions from ``data_dir`` (default ``dataset.data_dir``), split ``split``
    (default ``dataset.fid.context_split``, else ``val``).
    """
    data = module.config["dataset"]
    if getattr(module, "latent_scale", None):
        if decoder:
            module.set_decoder(decoder, decoder_subfolder)
        if require_decoder and not module.decoder_name:
            raise ConfigError(f"FID of {data['name']} compares pixels, and this checkpoint names no autoencoder to "
                              f"decode its latents with; pass --decoder (evaluate.py) or set dataset.decoder. "
                              f"{DECODER_HINT}")
    if not getattr(module, "text_conditional", False):
        return None
    from scalelong.data.coco import CocoLatentFeatures

    root = Path(str(data_dir or data.get("data_dir") or ""))
    split = split or (data.get("fid") or {}).get("context_split") or "val"
    features = CocoLatentFeatures(root, split=split)

    def contexts(indices):
        return features.sample_contexts(indices, seed)

    contexts.source = f"{features.folder} ({len(features)} images)"  # for the result files
    return contexts
