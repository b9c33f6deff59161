"""``scalelong-prepare-coco`` / ``python scripts/prepare_coco_features.py``: U-ViT's MS-COCO
features (usage: ``--help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


USAGE = """Make U-ViT's MS-COCO 256 features: autoencoder moments per image, CLIP contexts per caption.

    python scripts/prepare_coco_features.py --coco-dir /data/coco --out /data/coco256_features

``--coco-dir`` holds COCO 2014 as unzipped: ``train2014/*.jpg``, ``val2014/*.jpg`` and
``annotations/captions_{train,val}2014.json``. Writes ``<out>/train/{i}.npy`` (8 x 32 x 32 moments
of the Stable Diffusion KL-f8 autoencoder for the 256 x 256 centre crop), ``<out>/train/{i}_{k}.npy``
(77 x 768 CLIP ViT-L/14 last hidden states of caption k), the same under ``val/``, and
``<out>/empty_context.npy``. Interrupted runs resume. Train with ``dataset.data_dir=<out>``.

Weights: ``--vae`` and ``--clip`` take a Hugging Face model id (downloaded on first use) or a
local folder saved with ``save_pretrained``. Only the autoencoder's encoder matters here;
``stabilityai/sd-vae-ft-ema`` fine-tuned the decoder of the original SD autoencoder only, so its
moments are those of the Stable Diffusion autoencoder U-ViT used. Needs ``pip install diffusers
transformers``.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="features folder (U-ViT's coco256_features)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL id or folder")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a whole Stable Diffusion repository")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP id or folder (tokenizer + text model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--size", type=int, default=256, help="centre-crop side in pixels")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each split (a trial)")
    return p.parse_args(argv)


def load_models(vae: str, clip: str, device, vae_subfolder: str | None = None):
    """(AutoencoderKL, CLIPTokenizer, CLIPTextModel) in eval mode on ``device``."""
    try:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        from scalelong.utils.errors import DataError
        raise DataError(f"{err.name} is not installed; `pip install diffusers transformers` to make COCO "
                        f"features") from err
    try:
        kwargs = {"subfolder": vae_subfolder} if vae_subfolder else {}
        autoencoder = AutoencoderKL.from_pretrained(vae, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(clip)
        text_model = CLIPTextModel.from_pretrained(clip)
    except (OSError, ValueError) as err:
        from scalelong.utils.errors import DataError
        raise DataError(f"could not load the autoencoder {vae!r} or CLIP {clip!r} ({err}); pass a local folder or a "
                        f"Hugging Face id with --vae / --clip") from err
    return autoencoder.to(device).eval(), tokenizer, text_model.to(device).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from scalelong.cli import fail
    from scalelong.data.coco import prepare_coco_split, write_empty_context
    from scalelong.utils.errors import ConfigError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        vae, tokenizer, text_model = load_models(args.vae, args.clip, device, args.vae_subfolder)
        for split in args.splits:
            n = prepare_coco_split(args.coco_dir / f"{split}2014", args.coco_dir / "annotations" /
                                   f"captions_{split}2014.json", args.out / split, vae, tokenizer, text_model,
                                   size=args.size, batch_size=args.batch_size, limit=args.limit)
            print(f"{split}: {n} images in {args.out / split}")
        print(f"wrote {write_empty_context(args.out, tokenizer, text_model)}")
    except ConfigError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
