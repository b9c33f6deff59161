"""FID reference statistics of a data set (scalelong-fid-stats). See `python scripts/make_fid_stats.py --help`."""

import sys

from scalelong.cli.make_fid_stats import main

if __name__ == "__main__":
    sys.exit(main())
