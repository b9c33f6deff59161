"""The W&B dashboard of a sweep (scalelong-dashboard). See `python scripts/dashboard.py --help`."""

import sys

from scalelong.cli.dashboard import main

if __name__ == "__main__":
    sys.exit(main())
