"""FID and KID of a checkpoint (scalelong-evaluate). See `python scripts/evaluate.py --help`."""

import sys

from scalelong.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
