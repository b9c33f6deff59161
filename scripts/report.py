"""The stability report over runs (scalelong-report). See `python scripts/report.py --help`."""

import sys

from scalelong.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
