"""``scalelong-prepare-celeba64`` / ``python scripts/prepare_celeba64.py``: crop and resize CelebA
once into one memory-mappable array (usage: ``--help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


USAGE = """Crop and resize the CelebA training split once into one memory-mappable uint8 array.

    python scripts/prepare_celeba64.py --data-dir /data/celeba_root

Reads torchvision's layout ``<data-dir>/celeba/img_align_celeba/*.jpg`` and
``<data-dir>/celeba/list_eval_partition.txt`` and writes ``<data-dir>/celeba64_train.npy``
(uint8 N x 3 x 64 x 64, N = 162,770): U-ViT's 128 x 128 crop centred at (x 89, y 121), resized
with PIL's bilinear filter. Train with ``dataset.data_dir=<data-dir>``.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="folder holding celeba/ (torchvision's layout)")
    p.add_argument("--size", type=int, default=64, help="output side in pixels")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: up to 8, 0: none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from scalelong.cli import fail
    from scalelong.data.celeba import prepare_celeba64
    from scalelong.utils.errors import ConfigError

    try:
        out = prepare_celeba64(args.data_dir, size=args.size, split=args.split, workers=args.workers)
    except ConfigError as err:
        fail(str(err))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
