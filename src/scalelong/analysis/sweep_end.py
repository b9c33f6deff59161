"""A Hydra callback that writes the stability report when a sweep ends (``hydra.callbacks``), so a
comparison launched on a node or through SLURM finishes with its report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class ReportWhenSweepEnds(Callback):
    """``on_multirun_end``: ``write_report(<sweep dir>, <sweep dir>/report)``; a report that cannot
    be made (no runs finished) is a printed line, not a failed sweep. ``project_steps``: the report
    also gives the training hours of a run that long at each job's measured pace."""

    def __init__(self, target_fid: float | None = None, project_steps: int | None = None):
        self.target_fid = target_fid
        self.project_steps = project_steps

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from scalelong.analysis.report import write_report
        from scalelong.utils.errors import ConfigError

        sweep = Path(str(config.hydra.sweep.dir))
        try:
            path = write_report([sweep], sweep / "report", self.target_fid, project_steps=self.project_steps)
        except ConfigError as err:
            print(f"report not written: {err}", flush=True)
            return
        print(f"report: {path}", flush=True)
