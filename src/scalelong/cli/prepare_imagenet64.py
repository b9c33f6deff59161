"""``scalelong-prepare-imagenet64`` / ``python scripts/prepare_imagenet64.py``: ImageNet 64 once
into memory-mappable arrays (usage: ``--help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


USAGE = """Convert ImageNet 64x64 once into memory-mappable arrays (images uint8 N x 3 x 64 x 64, labels).

    # the Downsampled ImageNet 64x64 batches train_data_batch_1.npz ... _10.npz
    python scripts/prepare_imagenet64.py --source npz --data-dir /data/imagenet64 [--npz-dir DIR]
    # or the raw training set train/<wnid>/*.JPEG, ADM's centre crop (what U-ViT trains on)
    python scripts/prepare_imagenet64.py --source folder --data-dir /data/imagenet64 [--train-dir DIR]

Writes ``<data-dir>/imagenet64_<source>_images.npy`` and ``..._labels.npy`` (0-based), which the
``imagenet64`` data set memory-maps (``dataset.data_dir=<data-dir>``). The npz batches are
looked for in ``--npz-dir`` (default: the data dir), the raw folder at ``--train-dir``
(default: ``<data-dir>/train``).
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=["npz", "folder"])
    p.add_argument("--data-dir", type=Path, required=True, help="where the prepared arrays go")
    p.add_argument("--npz-dir", type=Path, default=None, help="folder of train_data_batch_*.npz (default: --data-dir)")
    p.add_argument("--train-dir", type=Path, default=None, help="raw train/<wnid>/ folder (default: <data-dir>/train)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes for --source folder (default: up to 8)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from scalelong.cli import fail
    from scalelong.data.imagenet import prepare_imagenet64_folder, prepare_imagenet64_npz
    from scalelong.utils.errors import ConfigError

    try:
        if args.source == "npz":
            outs = prepare_imagenet64_npz(args.npz_dir or args.data_dir, args.data_dir, size=args.size,
                                          num_classes=args.num_classes)
        else:
            outs = prepare_imagenet64_folder(args.train_dir or args.data_dir / "train", args.data_dir, size=args.size,
                                             num_classes=args.num_classes, workers=args.workers)
    except ConfigError as err:
        fail(str(err))
    print(f"wrote {outs[0]} and {outs[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
