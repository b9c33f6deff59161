"""``scalelong-report`` / ``python scripts/report.py``: the stability report (report.md and PNG plots)
over finished or running training runs, from their local files only. ``--wandb-report`` also puts
it into W&B: the sweep's dashboard (``scalelong-dashboard``) with this report's table and figures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from scalelong.analysis.report import write_report
from scalelong.utils.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stability report (report.md + PNG plots) over training runs.")
    parser.add_argument("paths", nargs="+", help="a multirun folder (one subfolder per job) or run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <path>/report for one path, ./report for several)")
    parser.add_argument("--target-fid", type=float, default=None,
                        help="FID to reach (default: the best FID of the `none` run of each model group)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window for the plotted lines")
    parser.add_argument("--project-steps", type=int, default=None,
                        help="also give the training hours of a run this long at each run's measured pace")
    parser.add_argument("--wandb-report", action="store_true",
                        help="also create the runs' W&B dashboard report (needs `wandb login` and the runs "
                             "synced) with this report's table and figures; project and entity from the runs' "
                             "logger.wandb settings (scalelong-dashboard --with-report chooses them)")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.paths[0]) / "report" if len(args.paths) == 1 else Path("report"))
    from scalelong.cli import fail

    try:
        path = write_report(args.paths, out, args.target_fid, args.smooth, args.project_steps)
    except ConfigError as err:  # no runs, a full disk or an unwritable --out: one line, finished files intact
        fail(str(err))
    print(f"report: {path}")
    if args.wandb_report:
        from scalelong.cli.dashboard import create_dashboard

        try:  # the local report is written whatever W&B says
            create_dashboard(args.paths, target_fid=args.target_fid, report_dir=out)
        except ConfigError as err:
            fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
