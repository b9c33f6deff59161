"""The EMA of any length after training (scalelong-posthoc-ema). See `python scripts/posthoc_ema.py --help`."""

import sys

from scalelong.cli.posthoc_ema import main

if __name__ == "__main__":
    sys.exit(main())
