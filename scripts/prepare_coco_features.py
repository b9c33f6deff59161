"""Make U-ViT's MS-COCO features (scalelong-prepare-coco). See `python scripts/prepare_coco_features.py --help`."""

import sys

from scalelong.cli.prepare_coco_features import main

if __name__ == "__main__":
    sys.exit(main())
