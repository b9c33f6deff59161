"""``scalelong-dashboard`` / ``python scripts/dashboard.py``: a W&B report that compares the runs of
a sweep (one section per metric family, lines coloured by strategy, FID against step, the run
table over the swept parameters). From local run folders it works offline (``--dry-run --out
FILE`` writes the definition); without them it reads a group's runs from the W&B API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from scalelong.utils.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A W&B report comparing the runs of a sweep. Offline runs: `wandb sync "
                    "<sweep>/*/wandb/offline-run-*` first, then this command on the sweep folder.")
    parser.add_argument("paths", nargs="*", help="a sweep folder (one subfolder per job) or run folders; "
                        "without them, --group's runs are read from W&B")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.wandb.project)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.wandb.entity, else your default)")
    parser.add_argument("--group", help="the W&B group (a sweep's group is its folder's name)")
    parser.add_argument("--families", help="metric families, comma-separated (default: all): "
                        "train,features,skips,grads,loss,robustness,scaling,eval")
    parser.add_argument("--title", help="the report's title (default: 'ScaleLong: <group>')")
    parser.add_argument("--target-fid", type=float, default=None,
                        help="FID to reach (default: the best FID of the `none` run of each model)")
    parser.add_argument("--with-report", action="store_true",
                        help="also write the local stability report (as scalelong-report) and add its table "
                             "and figures to the W&B report")
    parser.add_argument("--dry-run", action="store_true", help="send nothing; print what would be created")
    parser.add_argument("--out", type=Path, default=None, help="write the report's definition (JSON) here")
    args = parser.parse_args(argv)
    from scalelong.cli import guarded

    def run() -> int:
        families = args.families.split(",") if args.families else None
        report_dir = None
        if args.with_report:
            if not args.paths:
                raise ConfigError("--with-report makes the report from local run folders: give the sweep folder")
            from scalelong.analysis.report import write_report

            report_dir = Path(args.paths[0]) / "report" if len(args.paths) == 1 else Path("report")
            print(f"report: {write_report(args.paths, report_dir, args.target_fid)}")
        create_dashboard(args.paths, project=args.project, entity=args.entity, group=args.group,
                         families=families, title=args.title, target_fid=args.target_fid,
                         report_dir=report_dir, dry_run=args.dry_run, out=args.out)
        return 0

    return guarded(run)


def create_dashboard(paths: Sequence[str | Path], *, project: str | None = None, entity: str | None = None,
                     group: str | None = None, families: Sequence[str] | None = None, title: str | None = None,
                     target_fid: float | None = None, report_dir: Path | None = None, dry_run: bool = False,
                     out: Path | None = None) -> None:
    """Build the dashboard of the runs under ``paths`` (or of W&B's ``group``), with the local
    report of ``report_dir`` when given; write its definition to ``out``; save it unless ``dry_run``."""
    try:
        import wandb_workspaces.reports.v2  # noqa: F401  W&B's library that builds the report
    except ImportError:
        raise ConfigError("the W&B dashboard needs wandb-workspaces: pip install -e '.[dashboard]'") from None
    from scalelong.analysis import dashboard as dash
    from scalelong.utils.io import write_text

    families = dash.check_families(families)  # before anything slow or remote
    if not paths and dry_run:
        raise ConfigError("--dry-run works from local run folders: give the sweep folder "
                          "(outputs/multirun/<date>); reading runs from W&B needs the network")
    if not paths and not group:
        raise ConfigError("give the sweep folder (outputs/multirun/<date>), or --group NAME to read its runs from W&B")
    runs = None
    if paths:  # local files first: their errors need no login
        runs, without = dash.local_runs(paths, group)
        for folder in without:
            print(f"left out (no W&B run, no wandb_id.txt): {folder}")
        project = project or _one_setting(runs, "project") or "scalelong"
        entity = entity or _one_setting(runs, "entity")
    stability = dash.read_stability_report(report_dir) if report_dir is not None else None
    api = None if dry_run else dash.connect_api()
    if runs is None:
        project = project or "scalelong"
        runs = dash.api_runs(api, entity or api.default_entity, project, group)
    entity = entity or (api.default_entity if api is not None else None) or ""
    extra = dash.stability_blocks(stability, entity, project) if stability is not None else []
    report = dash.build_report(runs, entity=entity, project=project, families=families, title=title,
                               target_fid=target_fid, extra_blocks=extra)
    for line in dash.describe(report):
        print(line)
    if out is not None:
        write_text(out, json.dumps(dash.definition(report), indent=2, ensure_ascii=False) + "\n")
        print(f"definition: {out}")
    if dry_run:
        print("dry run: nothing sent to W&B")
        return
    print(f"W&B report: {dash.publish(report, stability)}")


def _one_setting(runs, key: str) -> str | None:
    """The runs' ``logger.wandb.<key>`` when they agree on one, else a one-line error."""
    values = {r.wandb_setting(key) for r in runs} - {None}
    if len(values) > 1:
        raise ConfigError(f"the runs log to several W&B {key}s ({', '.join(sorted(map(str, values)))}); "
                          f"choose one with --{key}")
    return next(iter(values), None)


if __name__ == "__main__":
    sys.exit(main())
