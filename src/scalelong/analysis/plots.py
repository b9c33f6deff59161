"""The stability report's PNG plots: feature, gradient and skip norms, loss spread, robustness, LSC
coefficients and FID against step, one column per model group, one colour per strategy."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scalelong.analysis.runs import Run, Series, ordered, strategy_order
from scalelong.analysis.tables import last_half, robustness_keys, short_number, steps_to_reach
from scalelong.utils.io import atomic_write


def _colors(runs: Sequence[Run]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(strategy_order(runs))}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    # 'valid' would shorten the line; pad with edge values to keep every step.
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def _line_figure(runs: Sequence[Run], panels: Sequence[tuple[str, Any]], path: Path, smooth: int,
                 logy: bool = False) -> bool:
    """One column per model group, one row per panel; ``panel`` = (title, run -> Series | None)."""
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in runs))
    panels = [(t, fn) for t, fn in panels if any(fn(r) is not None for r in runs)]
    if not panels:
        return False
    colors = _colors(runs)
    fig, axes = plt.subplots(len(panels), len(groups), figsize=(5.2 * len(groups), 3.0 * len(panels)),
                             squeeze=False)
    for col, group in enumerate(groups):
        members = ordered([r for r in runs if r.group == group])
        for row, (title, fn) in enumerate(panels):
            ax = axes[row][col]
            for r in members:
                s = fn(r)
                if s is None:
                    continue
                ax.plot(s[0], _smooth(s[1], smooth), color=colors[r.strategy_label], lw=1.2,
                        label=_legend_label(r, runs))
            ax.set_title(f"{title} — {group}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if logy:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def _legend_label(run: Run, runs: Sequence[Run]) -> str:
    twins = [r for r in runs if r.group == run.group and r.strategy_label == run.strategy_label]
    return run.strategy_label if len(twins) == 1 else f"{run.strategy_label} ({run.path.name})"


def _lsc_figure(runs: Sequence[Run], path: Path) -> bool:
    """Per model group: final LSC coefficients, the theory's sums and skip norms against LSC index."""
    import matplotlib.pyplot as plt

    rows = [("coefficient (last logged; bars: spread)", lambda r: _last_by_lsc(r, "scaling/lsc", "", "_std")),
            ("theory: sum over j≥i of κ_j²", lambda r: _last_by_lsc(r, "theory/sum_kappa2_lsc")),
            ("skip norm after scaling (mean over last half)", lambda r: _half_mean_by_lsc(r, "skips/lsc", "_after"))]
    rows = [(t, fn) for t, fn in rows if any(fn(r) for r in runs)]
    if not rows:
        return False
    groups = list(dict.fromkeys(r.group for r in runs))
    colors = _colors(runs)
    fig, axes = plt.subplots(len(rows), len(groups), figsize=(5.2 * len(groups), 3.0 * len(rows)), squeeze=False)
    for col, group in enumerate(groups):
        members = ordered([r for r in runs if r.group == group])
        for row, (title, fn) in enumerate(rows):
            ax = axes[row][col]
            for r in members:
                pts = fn(r)
                if not pts:
                    continue
                idx = sorted(pts)
                mean = [pts[i][0] for i in idx]
                err = [pts[i][1] for i in idx]
                ax.errorbar(idx, mean, yerr=err if any(e > 0 for e in err) else None, marker="o", ms=3, lw=1.2,
                            capsize=2, color=colors[r.strategy_label], label=_legend_label(r, runs))
            ax.set_title(f"{title} — {group}", fontsize=9)
            ax.set_xlabel("LSC index (1 = outermost)")
            ax.grid(alpha=0.3)
            if ax.lines or ax.containers:
                ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def _last_by_lsc(run: Run, prefix: str, suffix: str = "",
                 err_suffix: str | None = None) -> dict[int, tuple[float, float]]:
    main = run.lsc_series(prefix, suffix)
    err = run.lsc_series(prefix, err_suffix) if err_suffix else {}
    return {i: (float(s[1][-1]), float(err[i][1][-1]) if i in err else 0.0) for i, s in main.items()}


def _half_mean_by_lsc(run: Run, prefix: str, suffix: str) -> dict[int, tuple[float, float]]:
    out = {}
    for i, s in run.lsc_series(prefix, suffix).items():
        v = last_half(run, s)
        if len(v):
            out[i] = (float(v.mean()), float(v.std()))
    return out


def _fid_figure(runs: Sequence[Run], targets: dict[str, float], path: Path) -> bool:
    import matplotlib.pyplot as plt

    if not any(r.fid for r in runs):
        return False
    groups = [g for g in dict.fromkeys(r.group for r in runs) if any(r.fid for r in runs if r.group == g)]
    colors = _colors(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.4), squeeze=False)
    for col, group in enumerate(groups):
        ax = axes[0][col]
        for r in ordered([r for r in runs if r.group == group and r.fid]):
            steps, fids = zip(*r.fid)
            ax.plot(steps, fids, marker="o", ms=3, lw=1.2, color=colors[r.strategy_label], label=_legend_label(r, runs))
            reach = steps_to_reach(r.fid, targets[group]) if group in targets else None
            if reach is not None:
                ax.axvline(reach, color=colors[r.strategy_label], ls=":", lw=0.8)
        if group in targets:
            ax.axhline(targets[group], color="k", ls="--", lw=0.8, label=f"target {short_number(targets[group])}")
        ax.set_title(f"FID — {group}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def make_plots(runs: Sequence[Run], out: Path, targets: dict[str, float], smooth: int = 1) -> dict[str, str]:
    """Write the PNGs into ``out``; returns {file name: caption} of those that had data."""
    import matplotlib

    matplotlib.use("Agg")

    def last_out(r: Run) -> Series | None:
        names = r.block_names
        return r.series(f"features/{names[-1]}") if names and names[-1].startswith("out") else None

    figures = {
        "features.png": ("Hidden-feature norm (per-sample Frobenius norm, batch mean) against step",
                         lambda p: _line_figure(runs, [
                             ("feature norm, mean over blocks", Run.feature_mean),
                             ("feature norm, mid block (deepest)", lambda r: r.series("features/mid")),
                             ("feature norm, last out block (outermost)", last_out)], p, smooth)),
        "loss.png": ("Training loss and its rolling standard deviation",
                     lambda p: _line_figure(runs, [
                         ("loss rolling std", lambda r: r.series("loss/rolling_std")),
                         ("training loss", lambda r: r.series("train/loss"))], p, smooth)),
        "grads.png": ("Gradient norm of the whole network (before clipping)",
                      lambda p: _line_figure(runs, [
                          ("gradient norm", lambda r: r.series("grads/total") or r.series("train/grad_norm"))],
                          p, smooth, logy=True)),
        "robustness.png": ("Robustness: ||f(x_t + d) - f(x_t)|| / ||d|| on a fixed probe batch",
                           lambda p: _line_figure(runs, [
                               (f"robustness, t = {k.split('/t', 1)[1]}", lambda r, k=k: r.series(k))
                               for k in robustness_keys(runs)], p, smooth)),
        "lsc.png": ("Long skip connections: coefficients, the theory's sums of κ², skip norms",
                    lambda p: _lsc_figure(runs, p)),
        "fid.png": ("FID against step; dashed: the target FID, dotted: the step each run first reaches it",
                    lambda p: _fid_figure(runs, targets, p)),
    }
    written = {}
    for name, (caption, draw) in figures.items():
        if draw(out / name):
            written[name] = caption
    return written
