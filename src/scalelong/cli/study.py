"""``scalelong-study`` / ``python scripts/study.py``: the report of a multi-seed study (means with 95%
intervals over seeds, paired differences with ``none`` and a verdict per claim) from run folders."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Report of a multi-seed study of the long-skip strategies.")
    parser.add_argument("paths", nargs="+", help="the study's sweep folder(s): run folders anywhere below")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first path>/report)")
    parser.add_argument("--title", default="The long-skip strategies, several seeds")
    args = parser.parse_args(argv)
    from scalelong.analysis.study import write_study_report
    from scalelong.cli import guarded

    def run() -> int:
        path = write_study_report(args.paths, args.out or Path(args.paths[0]) / "report", args.title)
        print(f"study report: {path}")
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
