"""Prepare CelebA 64 once (scalelong-prepare-celeba64). See `python scripts/prepare_celeba64.py --help`."""

import sys

from scalelong.cli.prepare_celeba64 import main

if __name__ == "__main__":
    sys.exit(main())
