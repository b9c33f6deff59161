"""The stability report over runs, from their local files only (``config.yaml``, the CSV metrics,
``fid_history.json``): ``report.md`` with PNG plots of feature, gradient and skip norms, loss
spread, robustness, LSC coefficients and FID, and the steps each strategy needs to reach a target
FID. Strategies are named and ordered from the runs' own configs (``none`` first)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scalelong.utils.errors import ConfigError
from scalelong.utils.io import atomic_write, write_text

Series = tuple[np.ndarray, np.ndarray]  # (steps int64, values float64), sorted by step

BASELINE = "none"  # the strategy every other is compared with
NONFINITE_KEY = "train/nonfinite_skipped"


# --- reading runs --------------------------------------------------------------------------------


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those with a config.yaml) among ``paths`` and the folders below them."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            runs.append(p)
        elif p.is_dir():
            # Hydra names jobs "<num>_<overrides>": order by the job number, then by name.
            # not Hydra's or W&B's own config.yaml files, nor a report's
            subs = {c.parent for c in p.rglob("config.yaml")
                    if not {".hydra", "wandb", "report"} & set(c.relative_to(p).parts[:-1])}
            runs.extend(sorted(subs, key=lambda d: [_job_order(Path(part)) for part in d.relative_to(p).parts]))
        else:
            raise ConfigError(f"{p} is neither a run folder nor a folder of runs")
    if not runs:
        raise ConfigError(f"no run folders (with config.yaml) in {', '.join(map(str, paths))}")
    return runs


def _job_order(path: Path) -> tuple[float, str]:
    m = re.match(r"(\d+)", path.name)
    return (int(m.group(1)) if m else math.inf, path.name)


def read_metrics(run_dir: Path) -> dict[str, Series]:
    """Every metric of ``run_dir/csv/version_*/metrics.csv`` as (steps, values), versions joined.

    A later version (a resumed run) supersedes the earlier ones from its first step on; a step
    logged twice keeps its last value.
    """
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    data: dict[str, list[tuple[int, float]]] = {}
    for path in versions:
        rows = _read_csv(path)
        if not rows:
            continue
        first = min(step for step, _ in rows)
        data = {k: [(s, v) for s, v in pts if s < first] for k, pts in data.items()}
        for step, row in rows:
            for key, value in row.items():
                data.setdefault(key, []).append((step, value))
    out = {}
    for key, pts in data.items():
        last = dict(pts)  # later entries of a step win
        steps = np.array(sorted(last), dtype=np.int64)
        out[key] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    return out


def _read_csv(path: Path) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            try:
                step = int(float(raw.pop("step")))
            except (KeyError, TypeError, ValueError):
                continue
            raw.pop("epoch", None)
            row = {}
            for k, v in raw.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
            rows.append((step, row))
    return rows


def read_fid(run_dir: Path) -> list[tuple[int, float]]:
    """(step, fid) pairs from ``fid_history.json`` (a list of {step, fid, ...}), by step."""
    path = run_dir / "fid_history.json"
    if not path.is_file():
        path = next(iter(sorted(run_dir.rglob("fid_history.json"))), None)
        if path is None:
            return []
    entries = json.loads(path.read_text())
    if isinstance(entries, dict):
        entries = entries.get("history", [])
    pts = [(int(e["step"]), float(e["fid"])) for e in entries if e.get("fid") is not None and "step" in e]
    return sorted(pts)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Series]
    fid: list[tuple[int, float]] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        """``#<job number>`` for a Hydra multirun job folder, else the folder name."""
        m = re.match(r"(\d+)_", self.path.name)
        return f"#{m.group(1)}" if m else self.path.name

    @property
    def strategy(self) -> str:
        return str((self.config.get("scaling") or {}).get("name", "?"))

    @property
    def kappa(self) -> float | None:
        k = (self.config.get("scaling") or {}).get("kappa")
        return float(k) if k is not None and self.strategy == "constant" else None

    @property
    def strategy_label(self) -> str:
        return f"constant κ={self.kappa:g}" if self.kappa is not None else self.strategy

    @property
    def paper_name(self) -> str:
        """The strategy class's ``paper_name`` (read from its ``_target_``), else its name."""
        return strategy_paper_name(self.config.get("scaling") or {})

    @property
    def backbone(self) -> str:
        """``uvit``, ``unet`` or another backbone's class name, from the model's ``_target_``."""
        model = self.config.get("model") or {}
        if "backbone" in model:  # runs written before the configs named classes
            return str(model["backbone"])
        name = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
        return {"UViT": "uvit", "UNet": "unet"}.get(name, name)

    @property
    def block_names(self) -> list[str]:
        """Measured blocks in execution order (in_*, mid, out_*), from the feature metrics."""
        names = [k.split("/", 1)[1] for k in self.metrics if k.startswith("features/") and not k.endswith("_std")]
        rank = {"in": 0, "mid": 1, "out": 2}
        return sorted(names, key=lambda n: (rank.get(n.split("_")[0], 3), n))

    @property
    def num_blocks(self) -> int | None:
        """U-ViT blocks (in + mid + out): from model.options.depth, else the preset, else the metrics."""
        if self.backbone != "uvit":
            return len(self.block_names) or None
        model = self.config.get("model") or {}
        depth = model.get("depth", (model.get("options") or {}).get("depth"))
        if depth is None:
            return len(self.block_names) or None
        return int(depth) // 2 * 2 + 1  # depth // 2 in blocks, one mid block, depth // 2 out blocks

    @property
    def group(self) -> str:
        """What runs are compared within: backbone, depth and data set."""
        blocks = self.num_blocks if self.backbone == "uvit" else None  # the UNet's size: its preset
        size = f"{blocks} blocks" if blocks else preset_name(self.config)
        name = {"uvit": "U-ViT", "unet": "UNet"}.get(self.backbone, self.backbone)
        data = (self.config.get("dataset") or {}).get("name", "?")
        return f"{name} {size}, {data}"

    @property
    def last_step(self) -> int:
        ends = [int(s[-1]) for s, _ in self.metrics.values() if len(s)]
        ends += [s for s, _ in self.fid]
        return max(ends) if ends else 0

    def series(self, key: str) -> Series | None:
        s = self.metrics.get(key)
        return s if s is not None and len(s[0]) else None

    def feature_mean(self) -> Series | None:
        """Mean over blocks of the feature norm, at the steps where every block was measured."""
        keys = [f"features/{n}" for n in self.block_names]
        if not keys:
            return None
        steps = self.metrics[keys[0]][0]
        for k in keys[1:]:
            steps = np.intersect1d(steps, self.metrics[k][0])
        vals = [self.metrics[k][1][np.isin(self.metrics[k][0], steps)] for k in keys]
        return steps, np.mean(vals, axis=0)

    def lsc_series(self, prefix: str, suffix: str = "") -> dict[int, Series]:
        """LSC index -> series for keys ``{prefix}{i}{suffix}`` (e.g. ``scaling/lsc``)."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
        out = {}
        for key, s in self.metrics.items():
            m = pattern.match(key)
            if m and len(s[0]):
                out[int(m.group(1))] = s
        return dict(sorted(out.items()))


def strategy_paper_name(scaling: dict[str, Any]) -> str:
    """The paper's name of a run's strategy (its class's ``paper_name``), else the strategy's name."""
    name = str(scaling.get("name", "?"))
    target = scaling.get("_target_")
    if target:
        try:
            from hydra.utils import get_class

            return getattr(get_class(str(target)), "paper_name", "") or name
        except Exception:  # a strategy of a package not installed here: its name will do
            return name
    from scalelong.scaling import STRATEGIES  # runs written before configs named classes

    return getattr(STRATEGIES.get(name), "paper_name", "") or name


def preset_name(config: dict[str, Any]) -> str:
    """What a run's network is called: its preset where the config says, else a short description."""
    model = config.get("model") or {}
    if model.get("preset"):
        return str(model["preset"])
    channels = model.get("base_channels")
    return f"{channels} base channels" if channels else str(model.get("_target_", "?")).rsplit(".", 1)[-1]


def ordered(runs: Sequence[Run]) -> list[Run]:
    """Runs by model group (first appearance), then strategy (``none`` first, then as they came)."""
    groups = list(dict.fromkeys(r.group for r in runs))
    labels = _strategy_order(runs)
    return sorted(runs, key=lambda r: (groups.index(r.group), labels.index(r.strategy_label), _job_order(r.path)))


def _strategy_order(runs: Sequence[Run]) -> list[str]:
    """Strategy labels: the built-in ones in the order they are registered (the paper's: none, sqrt2,
    constant, learnable, ...), then any other in the order the runs name them (sweep order)."""
    from scalelong.scaling import STRATEGIES

    builtin = list(STRATEGIES)
    seen = list(dict.fromkeys(r.strategy_label for r in sorted(runs, key=lambda r: _job_order(r.path))))

    def rank(label: str) -> tuple[int, int]:
        name = label.split(" ")[0]
        return (builtin.index(name) if name in builtin else len(builtin), seen.index(label))

    return sorted(seen, key=rank)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = []
    for d in find_runs(paths):
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
        runs.append(Run(d, config, read_metrics(d), read_fid(d)))
    return runs


# --- numbers -------------------------------------------------------------------------------------


def last_half(run: Run, s: Series | None) -> np.ndarray:
    """The values logged in the second half of the run (steps >= last step / 2), finite only."""
    if s is None:
        return np.array([])
    v = s[1][s[0] >= run.last_step / 2]
    return v[np.isfinite(v)]


def mean_spread(values: np.ndarray) -> str:
    if not len(values):
        return "–"
    return f"{_num(values.mean())} ± {_num(values.std())}"


def _num(x: float) -> str:
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
                row.append(f"{_num(best)} ({step})")
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
        lines.append("| " + " | ".join([group, label, *[_num(vals[i]) if i in vals else "–"
                                                         for i in range(1, width + 1)]]) + " |")
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------


def _colors(runs: Sequence[Run]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(_strategy_order(runs))}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    # 'valid' would shorten the line; pad with edge values to keep every step.
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _save(fig, path: Path) -> None:
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
    _save(fig, path)
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
    _save(fig, path)
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
            ax.axhline(targets[group], color="k", ls="--", lw=0.8, label=f"target {_num(targets[group])}")
        ax.set_title(f"FID — {group}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
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


# --- the report ----------------------------------------------------------------------------------


TIME_KEY = "time/seconds_per_step"


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
        parts += ["", f"Target FID: {source} ({', '.join(f'{g}: {_num(t)}' for g, t in targets.items())}). "
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
