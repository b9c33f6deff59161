"""Rewrite a trusted checkpoint so it loads safely (scalelong-convert-checkpoint). See `--help`."""

import sys

from scalelong.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
