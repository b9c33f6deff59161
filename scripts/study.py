"""The report of a multi-seed study (scalelong-study). See `python scripts/study.py --help`."""

import sys

from scalelong.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
