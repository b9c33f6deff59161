"""The stability report over runs, from their local files only (``config.yaml``, the CSV metrics,
``fid_history.json``): ``report.md`` with PNG plots of feature, gradient and skip norms, loss
spread, robustness, LSC coefficients and FID, and the steps each strategy needs to reach a target
FID. Strategies are named and ordered from the runs' own configs (``none`` first).

It composes the report from ``runs`` (reading), ``tables`` (the numbers) and ``plots`` (the PNGs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scalelong.analysis.plots import make_plots
from scalelong.analysis.runs import load_runs, ordered
from scalelong.analysis.tables import (NONFINITE_KEY, TIME_KEY, fid_targets, short_number, summary_table,
                                       theory_table, time_table)
from scalelong.utils.io import write_text


def write_report(paths: Sequence[str | Path], out: Path, target_fid: float | None = None, smooth: int = 1,
                 project_steps: int | None = None) -> Path:
    """Read the runs under ``paths``, write ``out/report.md`` and its plots; return the report path.
    ``project_steps``: also give the hours a run of that many steps takes at each run's measured pace."""
    runs = load_runs(paths)  # every file below is written with atomic_write, which makes ``out``
    targets = fid_targets(runs, target_fid)
    plots = make_plots(runs, out, targets, smooth)
    parts = [
        "# Stability report",
        "",
        f"{len(runs)} runs from " + ", ".join(f"`{p}`" for p in paths) + ".",
        "",
        "Numbers are mean ± standard deviation over the second half of each run (steps ≥ last step / 2). "
        "Feature norms: per-sample Frobenius norm of a block's output, batch mean; `mid` is the deepest "
        "block, `last out` the outermost decoder block. Loss rolling std: standard deviation of the training "
        "loss over a window of steps. Robustness: mean over a fixed probe batch of "
        "||f(x_t + d) − f(x_t)|| / ||d|| for a fixed small random d at time t.",
    ]
    if targets:
        source = "given" if target_fid is not None else "the best FID of the `none` run in the same model group"
        parts += ["", f"Target FID: {source} ({', '.join(f'{g}: {short_number(t)}' for g, t in targets.items())}). "
                  "Speed-up = steps `none` needs to reach it / steps this run needs (paper: about 1.5x "
                  "for CS and LS)."]
    if any(NONFINITE_KEY in r.metrics for r in runs):
        parts += ["", f"Non-finite skipped: the last logged value of `{NONFINITE_KEY}` (a running count)."]
    parts += ["", "## Summary", "", summary_table(runs, targets)]
    theory = theory_table(runs)
    if theory:
        parts += ["", "## Theory: sum over j ≥ i of κ_j² per LSC i", "",
                  "N − i + 1 for `none`, half that for `sqrt2`, a bounded geometric sum for `constant`.", "", theory]
    pace = time_table(runs, project_steps)
    if pace:
        parts += ["", "## Time", "", "Measured on the machine that ran each job: the median of "
                  f"`{TIME_KEY}` (logged at every progress line; batch = the global batch over all ranks)"
                  + (", and the training hours of a full run at that pace (evaluations not included)."
                     if project_steps else "."), "", pace]
    if plots:
        parts += ["", "## Plots"]
        for name, caption in plots.items():
            parts += ["", f"{caption}:", "", f"![{name}]({name})"]
    parts += ["", "## Runs", ""]
    parts += [f"- {r.short_name} `{r.path}`: {r.group}, {r.strategy_label} "
              f"({r.paper_name}), {r.last_step} steps" for r in ordered(runs)]
    path = out / "report.md"
    write_text(path, "\n".join(parts) + "\n")
    return path
