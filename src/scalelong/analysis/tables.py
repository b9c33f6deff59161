"""The numbers of the stability report, computed from runs: mean and spread over the last half of
training, the steps to reach a target FID, the theory's sums of kappa^2, the measured pace; each
table as Markdown."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from scalelong.analysis.runs import Run, Series, ordered

BASELINE = "none"  # the strategy every other is compared with
NONFINITE_KEY = "train/nonfinite_skipped"
TIME_KEY = "time/seconds_per_step"


def last_half(run: Run, s: Series | None) -> np.ndarray:
    """The values logged in the second half of the run (steps >= last step / 2), finite only."""
    if s is None:
        return np.array([])
    v = s[1][s[0] >= run.last_step / 2]
    return v[np.isfinite(v)]


def mean_spread(values: np.ndarray) -> str:
    if not len(values):
        return "–"
    return f"{short_number(values.mean())} ± {short_number(values.std())}"


def short_number(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:.3g}" if a < 1e-2 or a >= 1e4 else (f"{x:.4f}" if a < 1 else f"{x:.2f}" if a < 100 else f"{x:.1f}")


def steps_to_reach(fid: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first logged step whose FID is at most ``target`` (None if none is)."""
    return next((s for s, f in fid if f <= target + 1e-12), None)


def fid_targets(runs: Sequence[Run], target: float | None) -> dict[str, float]:
    """Per group, the FID to reach: ``target``, else the best FID of that group's ``none`` run."""
    out = {}
    for group in dict.fromkeys(r.group for r in runs):
        if target is not None:
            out[group] = target
            continue
        best = [min(f for _, f in r.fid) for r in runs if r.group == group and r.strategy == BASELINE and r.fid]
        if best:
            out[group] = best[0]
    return out


def robustness_keys(runs: Sequence[Run]) -> list[str]:
    keys = {k for r in runs for k in r.metrics if k.startswith("robustness/")}
    return sorted(keys, key=lambda k: float(re.sub(r"[^0-9.]", "", k.split("/t", 1)[-1]) or 0))


def summary_table(runs: Sequence[Run], targets: dict[str, float]) -> str:
    """One Markdown row per run: mean ± std over the last half of training."""
    rob = robustness_keys(runs)
    has_fid = any(r.fid for r in runs)
    has_nonfinite = any(NONFINITE_KEY in r.metrics for r in runs)
    head = ["run", "model", "strategy", "steps", "feature norm (mean of blocks)", "feature norm (mid)",
            "feature norm (last out)", "grad norm", "loss rolling std", "loss",
            *[f"robustness t={k.split('/t', 1)[1]}" for k in rob]]
    if has_fid:
        head += ["best FID (step)", "steps to target FID", "speed-up vs none"]
    if has_nonfinite:
        head += ["non-finite skipped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reach_none = {}
    for r in runs:
        if r.strategy == BASELINE and r.group in targets and r.group not in reach_none:
            reach_none[r.group] = steps_to_reach(r.fid, targets[r.group])
    for r in ordered(runs):
        names = r.block_names
        last_out = f"features/{names[-1]}" if names and names[-1].startswith("out") else None
        grads = r.series("grads/total") or r.series("train/grad_norm")
        row = [r.short_name, r.group, r.strategy_label, str(r.last_step),
               mean_spread(last_half(r, r.feature_mean())),
               mean_spread(last_half(r, r.series("features/mid"))),
               mean_spread(last_half(r, r.series(last_out) if last_out else None)),
               mean_spread(last_half(r, grads)),
               mean_spread(last_half(r, r.series("loss/rolling_std"))),
               mean_spread(last_half(r, r.series("train/loss"))),
               *[mean_spread(last_half(r, r.series(k))) for k in rob]]
        if has_fid:
            if r.fid:
                step, best = min(r.fid, key=lambda p: (p[1], p[0]))
                row.append(f"{short_number(best)} ({step})")
            else:
                row.append("–")
            target = targets.get(r.group)
            reach = steps_to_reach(r.fid, target) if target is not None and r.fid else None
            row.append("–" if target is None or not r.fid else (str(reach) if reach is not None else "not reached"))
            base = reach_none.get(r.group)
            row.append(f"{base / reach:.2f}x" if reach and base else "–")
        if has_nonfinite:
            s = r.series(NONFINITE_KEY)
            row.append(f"{s[1][-1]:g}" if s is not None else "–")  # a count: no decimals
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def theory_table(runs: Sequence[Run]) -> str | None:
    """sum_{j>=i} kappa_j^2 per LSC i, one row per distinct (group, strategy) with theory values."""
    rows, seen = [], set()
    width = 0
    for r in ordered(runs):
        t = r.lsc_series("theory/sum_kappa2_lsc")
        if not t or (r.group, r.strategy_label) in seen:
            continue
        seen.add((r.group, r.strategy_label))
        width = max(width, max(t))
        rows.append((r.group, r.strategy_label, {i: float(s[1][-1]) for i, s in t.items()}))
    if not rows:
        return None
    head = ["model", "strategy", *[f"LSC {i}" for i in range(1, width + 1)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, label, vals in rows:
        lines.append("| " + " | ".join([group, label, *[short_number(vals[i]) if i in vals else "–"
                                                         for i in range(1, width + 1)]]) + " |")
    return "\n".join(lines)


def time_table(runs: Sequence[Run], project_steps: int | None) -> str | None:
    """Measured training pace per run (median of the logged intervals, so the few that include an
    evaluation do not count) and, with ``project_steps``, the hours a run of that length takes."""
    timed = [r for r in ordered(runs) if r.series(TIME_KEY) is not None]
    if not timed:
        return None
    head = ["run", "strategy", "seconds per step", "images per second"]
    if project_steps:
        head.append(f"hours for {project_steps:,} steps")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in timed:
        pace = float(np.median(r.series(TIME_KEY)[1]))
        batch = (r.config.get("train") or {}).get("batch_size")
        row = [r.short_name, r.strategy_label, f"{pace:.4g}", f"{batch / pace:.1f}" if batch else "–"]
        if project_steps:
            row.append(f"{pace * project_steps / 3600:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
