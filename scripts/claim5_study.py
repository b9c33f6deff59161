"""Claim 5 of the paper on the CPU (scaling the long skips speeds up training): the sweep of
experiment=claim5_cpu, then its report in docs/study_cpu/claim5.md.
See `python scripts/claim5_study.py --help`."""

import sys

from scalelong.cli.claim5_study import main

if __name__ == "__main__":
    sys.exit(main())
