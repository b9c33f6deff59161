"""The multi-seed study of what the long-skip strategies do: per run, one number for each of the
paper's claims; per cell (backbone, size, learning rate) and strategy, the mean with a 95%
interval over seeds; against ``none``, paired differences (same seed) with their intervals and a
verdict (held / did not hold / inconclusive). Reads run folders only (``scalelong-study``)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelong.analysis.plots import save_png
from scalelong.analysis.runs import Run, Series, load_runs, strategy_order
from scalelong.analysis.tables import BASELINE
from scalelong.training.loggers import flat_config
from scalelong.utils.errors import ConfigError
from scalelong.utils.io import write_text

QUALITY_KEY = "eval/fd_digits"  # the quality measured along training (lower is better)


# --- one number per run and claim --------------------------------------------------------------


def second_half(run: Run, series: Series | None) -> Series | None:
    if series is None:
        return None
    keep = series[0] >= run.last_step / 2
    steps, values = series[0][keep], series[1][keep]
    ok = np.isfinite(values)
    return (steps[ok], values[ok]) if ok.any() else None


def log_spread(series: Series | None) -> float:
    """Oscillation: the standard deviation of the step-to-step change of the log of a series."""
    if series is None or len(series[1]) < 3 or (series[1] <= 0).any():
        return math.nan
    return float(np.std(np.diff(np.log(series[1]))))


def log_mean(series: Series | None) -> float:
    if series is None or not len(series[1]) or (series[1] <= 0).any():
        return math.nan
    return float(np.mean(np.log(series[1])))


def quality_history(run: Run) -> list[tuple[int, float]]:
    """(step, Frechet distance in digit-classifier features) of the run's evaluations."""
    path = run.path / "fd_digits_history.json"
    if not path.is_file():
        return []
    return sorted((int(e["step"]), float(e["fid"])) for e in json.loads(path.read_text()) if e.get("fid") is not None)


def inception_kid(run: Run) -> float:
    path = run.path / "quick_eval.json"
    if not path.is_file():
        return math.nan
    kid = json.loads(path.read_text()).get("kid")
    return math.nan if kid is None else float(kid)


COLLAPSED_LOSS = 0.5  # a run ending above it has forgotten most of what it learned (noise prediction: 1 = none)


# Each measure: (key, what it is, the claim it serves, run -> value, lower is what the paper predicts)
MEASURES: list[tuple[str, str, str, Callable[[Run], float]]] = [
    ("feature_log_norm", "log feature norm (mean over blocks), 2nd half", "1",
     lambda r: log_mean(second_half(r, r.feature_mean()))),
    ("feature_oscillation", "feature-norm oscillation: std of the change of log norm, 2nd half", "1",
     lambda r: log_spread(second_half(r, r.feature_mean()))),
    ("grad_log_norm", "log gradient norm, 2nd half", "2",
     lambda r: log_mean(second_half(r, r.series("grads/total") or r.series("train/grad_norm")))),
    ("grad_oscillation", "gradient-norm oscillation: std of the change of log norm, 2nd half", "2",
     lambda r: log_spread(second_half(r, r.series("grads/total") or r.series("train/grad_norm")))),
    ("loss_spread", "loss rolling std, mean over 2nd half", "2",
     lambda r: _mean(second_half(r, r.series("loss/rolling_std")))),
    ("robustness", "||f(x_t + d) - f(x_t)|| / ||d||, mean over t and 2nd half", "3",
     lambda r: _robustness(r)),
    ("nonfinite", "non-finite steps skipped", "-", lambda r: _last(r.series("train/nonfinite_skipped"), 0.0)),
    ("final_loss", "training loss, mean over the last 10% of steps", "-", lambda r: _final_loss(r)),
    ("collapsed", f"collapsed: that loss above {COLLAPSED_LOSS} (1 = predicting no noise at all)", "-",
     lambda r: _collapsed(r)),
    ("final_quality", "final FD in digit-classifier features", "5", lambda r: _final_quality(r)),
    ("inception_kid", "final KID (Inception, quick_eval.num samples)", "5", inception_kid),
]


def _mean(series: Series | None) -> float:
    return float(np.mean(series[1])) if series is not None and len(series[1]) else math.nan


def _last(series: Series | None, default: float = math.nan) -> float:
    return float(series[1][-1]) if series is not None and len(series[1]) else default


def _last_tenth(series: Series | None) -> Series | None:
    """The points of the series' last 10% of steps (from its own last logged step)."""
    if series is None or not len(series[0]):
        return None
    keep = (series[0] >= 0.9 * series[0].max()) & np.isfinite(series[1])
    return (series[0][keep], series[1][keep]) if keep.any() else None


def _final_loss(run: Run) -> float:
    return _mean(_last_tenth(run.series("train/loss")))


def _collapsed(run: Run) -> float:
    loss = _final_loss(run)
    return math.nan if not math.isfinite(loss) else float(loss > COLLAPSED_LOSS)


def _robustness(run: Run) -> float:
    keys = [k for k in run.metrics if k.startswith("robustness/")]
    values = [_mean(second_half(run, run.series(k))) for k in keys]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _final_quality(run: Run) -> float:
    history = quality_history(run)
    return history[-1][1] if history else math.nan


def steps_to_reach(history: Sequence[tuple[int, float]], target: float) -> float:
    """The first evaluated step whose quality is at most ``target`` (inf when none is)."""
    return next((float(s) for s, q in history if q <= target), math.inf)


# --- cells, arms and seeds ---------------------------------------------------------------------


@dataclass
class StudyRun:
    run: Run
    cell: str
    arm: str
    seed: int
    values: dict[str, float] = field(default_factory=dict)


def cell_of(run: Run) -> str:
    lr = (run.config.get("optim") or {}).get("lr")
    return f"{run.group.rsplit(',', 1)[0]}, lr {lr:g}" if lr is not None else run.group


def load_study(paths: Sequence[str | Path]) -> list[StudyRun]:
    runs = [StudyRun(r, cell_of(r), r.strategy_label, int(r.config.get("seed", 0))) for r in load_runs(paths)]
    if not runs:
        raise ConfigError(f"no runs in {', '.join(map(str, paths))}")
    for s in runs:
        s.values = {key: fn(s.run) for key, _, _, fn in MEASURES}
    # Claim 5: steps to reach, in each cell, the final quality of `none` (mean over its seeds).
    for cell in dict.fromkeys(s.cell for s in runs):
        base = [s.values["final_quality"] for s in runs if s.cell == cell and s.run.strategy == BASELINE]
        target = float(np.nanmean(base)) if base and np.isfinite(base).any() else math.nan
        for s in runs:
            if s.cell == cell:
                s.values["quality_target"] = target
                s.values["steps_to_target"] = steps_to_reach(quality_history(s.run), target) \
                    if math.isfinite(target) else math.nan
    return runs


# --- statistics ----------------------------------------------------------------------------------


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t interval, n) of the finite values."""
    from scipy import stats

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.inf, 1
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return float(v.mean()), half, n


def paired(runs: Sequence[StudyRun], cell: str, arm: str, key: str) -> list[float]:
    """Per seed, the arm's value minus `none`'s (the same seed shares data order and noise)."""
    base = {s.seed: s.values.get(key, math.nan) for s in runs if s.cell == cell and s.run.strategy == BASELINE}
    return [s.values.get(key, math.nan) - base[s.seed] for s in runs
            if s.cell == cell and s.arm == arm and s.seed in base]


def verdict(mean: float, half: float) -> str:
    """The paper predicts lower than `none`: held when the interval lies below 0."""
    if not math.isfinite(mean) or not math.isfinite(half):
        return "inconclusive"
    if mean + half < 0:
        return "held"
    if mean - half > 0:
        return "did not hold"
    return "inconclusive"


def overall(verdicts: Sequence[str]) -> str:
    """One verdict from several paired comparisons (cells x measures): held, or did not hold, when
    at least half of them say so and none says the opposite; otherwise inconclusive."""
    held, against = verdicts.count("held"), verdicts.count("did not hold")
    if held and not against and 2 * held >= len(verdicts):
        return "held"
    if against and not held and 2 * against >= len(verdicts):
        return "did not hold"
    return "inconclusive"


def _scale(runs: Sequence[StudyRun]) -> str:
    """What these runs are, next to the paper's: the limit of any verdict drawn from them."""
    flat = [flat_config(s.run.config) for s in runs]

    def values(path: str) -> str:
        return "/".join(sorted({str(f.get(path)) for f in flat}))

    return (f"Scale: {values('dataset.image_size')}x{values('dataset.image_size')} images "
            f"({values('dataset.name')}), {values('train.max_steps')} steps at batch {values('train.batch_size')}, "
            f"{len({s.seed for s in runs})} seeds. The paper trains 32x32 to 256x256 images for 250k-1M steps "
            "with models of 44M+ parameters: a verdict here says what the strategies do in short runs of "
            "small models, where feature norms have little time to grow; it does not settle the paper's "
            "claims at its scale (experiment=paper_comparison does, on GPUs).")


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "∞" if x == math.inf else "–"
    a = abs(x)
    return f"{x:.3g}" if a < 1e-2 or a >= 1e3 else f"{x:.3f}" if a < 1 else f"{x:.2f}"


def _ci(mean: float, half: float) -> str:
    return "–" if not math.isfinite(mean) else f"{_fmt(mean)} ± {_fmt(half)}"


# --- the report -----------------------------------------------------------------------------------


CLAIMS = {
    "1": "Hidden-feature norms (and their oscillation) are lower than Org's for 1/sqrt(2)-CS, CS and LS, "
         "and the gap widens with depth.",
    "2": "Gradient norms and loss oscillation follow the same order.",
    "3": "Robustness: the output moves less per unit input perturbation than Org's.",
    "4": "The theory's sum over j >= i of kappa_j^2 (N - i + 1 for Org, half for 1/sqrt(2)-CS, bounded for CS).",
    "5": "CS and LS reach Org's quality in fewer steps (the paper: about 1/1.5 of them).",
}
CLAIM_MEASURES = {"1": ["feature_log_norm", "feature_oscillation"], "2": ["grad_log_norm", "grad_oscillation",
                                                                         "loss_spread"],
                  "3": ["robustness"], "5": ["steps_to_target", "final_quality"]}
LABELS = {key: label for key, label, _, _ in MEASURES} | {
    "steps_to_target": "steps to reach none's final quality (FD, digit classifier)"}


def write_study_report(paths: Sequence[str | Path], out: Path, title: str = "Study") -> Path:
    """Tables and plots of a study's runs into ``out`` (report.md, results.json, PNGs)."""
    runs = load_study(paths)
    cells = list(dict.fromkeys(s.cell for s in runs))
    arms = strategy_order([s.run for s in runs])
    seeds = sorted({s.seed for s in runs})
    results: dict[str, Any] = {"cells": {}, "claims": {}}
    parts = [f"# {title}", "", f"{len(runs)} runs: {len(cells)} cells x {len(arms)} strategies x "
             f"{len(seeds)} seeds ({', '.join(map(str, seeds))}). Every figure is the mean over seeds ± the "
             "half-width of its 95% t interval; comparisons with `none` are paired by seed (the same seed "
             "shares the data order, the noise and the initial weights of the shared layers).", "",
             _scale(runs), ""]
    verdicts: dict[str, list[tuple[str, str, str, str]]] = {c: [] for c in CLAIM_MEASURES}
    for cell in cells:
        members = [s for s in runs if s.cell == cell]
        cell_arms = [a for a in arms if any(s.arm == a for s in members)]
        results["cells"][cell] = {}
        parts += [f"## {cell}", ""]
        keys = [k for k in [*LABELS] if k != "quality_target"]
        head = ["strategy", "seeds", *[LABELS[k] for k in keys]]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in cell_arms:
            got = [s for s in members if s.arm == arm]
            stats = {k: interval([s.values.get(k, math.nan) for s in got]) for k in keys}
            results["cells"][cell][arm] = {k: {"mean": m, "ci95": h, "n": n} for k, (m, h, n) in stats.items()}
            rows.append("| " + " | ".join([arm, str(len(got)), *[_ci(*stats[k][:2]) for k in keys]]) + " |")
        target = next((s.values.get("quality_target") for s in members), math.nan)
        parts += ["Means over seeds ± 95% interval. Quality target (claim 5): the final FD of `none`, "
                  f"mean over its seeds = {_fmt(target)}.", "", *rows, ""]
        diffs = ["| strategy | measure | paired difference with none | verdict |", "|---|---|---|---|"]
        for arm in cell_arms:
            if arm.split(" ")[0] == BASELINE:
                continue
            for claim, ks in CLAIM_MEASURES.items():
                for k in ks:
                    m, h, n = interval(paired(runs, cell, arm, k))
                    v = verdict(m, h)
                    verdicts[claim].append((cell, arm, k, v))
                    results["cells"][cell][arm][f"{k}_minus_none"] = {"mean": m, "ci95": h, "n": n, "verdict": v}
                    diffs.append(f"| {arm} | {LABELS[k]} | {_ci(m, h)} | {v} |")
        parts += ["Against `none` (negative = lower than Org, as the paper predicts):", "", *diffs, ""]
    parts += ["## The paper's claims", ""]
    for claim, text in CLAIMS.items():
        if claim == "4":
            parts += [f"**Claim 4.** {text} Computed, not measured: see `stability_theory.json` in each "
                      "constant-strategy run and the theory table of `scalelong-report`.", ""]
            continue
        got = verdicts.get(claim, [])
        count = {v: sum(1 for *_, x in got if x == v) for v in ("held", "did not hold", "inconclusive")}
        by_arm = {arm: overall([v for _, a, _, v in got if a == arm]) for arm in dict.fromkeys(a for _, a, _, _ in got)}
        results["claims"][claim] = {**count, "by_strategy": by_arm}
        parts += [f"**Claim {claim}.** {text} Paired comparisons with `none` (strategy x cell x measure): "
                  f"held {count['held']}, did not hold {count['did not hold']}, inconclusive "
                  f"{count['inconclusive']}. Per strategy (held or did not hold when at least half of its "
                  "comparisons say so and none says the opposite): "
                  + "; ".join(f"{arm}: {v}" for arm, v in by_arm.items()) + ".", ""]
    # The stress cells' main outcome: which runs collapsed, per strategy and cell.
    collapsed = {arm: {cell: int(sum(s.values["collapsed"] == 1 for s in runs if s.cell == cell and s.arm == arm))
                       for cell in cells} for arm in arms}
    results["collapsed"] = collapsed
    parts += [f"**Collapse.** Runs whose training loss over the last 10% of steps stayed above {COLLAPSED_LOSS} "
              "(of the seeds of each cell):", "", "| strategy | " + " | ".join(cells) + " | all |",
              "|---|" + "---|" * (len(cells) + 1)]
    parts += [f"| {arm} | " + " | ".join(str(collapsed[arm][c]) for c in cells) + f" | {sum(collapsed[arm].values())} |"
              for arm in arms]
    parts += [""]
    plots = _plots(runs, cells, arms, out)
    for name, caption in plots.items():
        parts += [f"{caption}:", "", f"![{name}]({name})", ""]
    parts += ["## Runs", ""] + [f"- `{s.run.path}`: {s.cell}, {s.arm}, seed {s.seed}, {s.run.last_step} steps"
                                for s in sorted(runs, key=lambda s: (cells.index(s.cell), arms.index(s.arm), s.seed))]
    write_text(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    path = out / "report.md"
    write_text(path, "\n".join(parts) + "\n")
    return path


def _plots(runs: Sequence[StudyRun], cells: list[str], arms: list[str], out: Path) -> dict[str, str]:
    """Mean curves over seeds (shaded: min to max) of the feature norm, the gradient norm and the
    quality, one column per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("features.png", "Feature norm (mean over blocks) against step", lambda r: r.feature_mean(), True),
              ("grads.png", "Gradient norm against step", lambda r: r.series("grads/total"), True),
              ("quality.png", "FD in digit-classifier features against step (lower is better)",
               lambda r: _as_series(quality_history(r)), True)]
    cmap = plt.get_cmap("tab10")
    colors = {arm: cmap(i % 10) for i, arm in enumerate(arms)}
    written = {}
    for name, caption, fn, logy in panels:
        fig, axes = plt.subplots(1, len(cells), figsize=(4.6 * len(cells), 3.4), squeeze=False)
        drawn = False
        for col, cell in enumerate(cells):
            ax = axes[0][col]
            for arm in arms:
                curves = [fn(s.run) for s in runs if s.cell == cell and s.arm == arm]
                curves = [c for c in curves if c is not None and len(c[0])]
                if not curves:
                    continue
                steps = curves[0][0]
                stack = np.stack([np.interp(steps, c[0], c[1]) for c in curves])
                ax.plot(steps, stack.mean(0), color=colors[arm], lw=1.2, label=arm)
                ax.fill_between(steps, stack.min(0), stack.max(0), color=colors[arm], alpha=0.15)
                drawn = True
            ax.set_title(cell, fontsize=8)
            ax.set_xlabel("step")
            if logy:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.tight_layout()
        if drawn:
            save_png(fig, out / name)
            written[name] = caption
        plt.close(fig)
    return written


def _as_series(history: Sequence[tuple[int, float]]) -> Series | None:
    if not history:
        return None
    steps, values = zip(*history)
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def job_order(path: Path) -> tuple[str, ...]:
    return tuple(re.split(r"[/_]", str(path)))
