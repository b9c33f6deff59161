"""Prepare ImageNet 64 once (scalelong-prepare-imagenet64). See `python scripts/prepare_imagenet64.py --help`."""

import sys

from scalelong.cli.prepare_imagenet64 import main

if __name__ == "__main__":
    sys.exit(main())
