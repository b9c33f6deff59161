"""The CPU study's collapse finding repeated on new seeds (docs/study_cpu/collapse.md).
See `python scripts/collapse_study.py --help`."""

import sys

from scalelong.cli.collapse_study import main

if __name__ == "__main__":
    sys.exit(main())
