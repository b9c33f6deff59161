"""Draw samples from a checkpoint (scalelong-sample). See `python scripts/sample.py --help`."""

import sys

from scalelong.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
