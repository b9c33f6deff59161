"""Claim 5 of the paper ("scaling the long skips speeds up training") measured on the digits
(issue 28, ``experiment=claim5_cpu``): per run, the first evaluated step at which the legibility of
its EMA samples (the digit classifier's mean confidence) reaches a threshold, the same for the
Frechet distance in the classifier's features, and the mean legibility over all evaluations; per
backbone and strategy, means over seeds and differences against ``none`` paired by seed (the same
seed shares the data order, the initial weights and the noise) with 95% t intervals and a verdict.

Reads the sweep's folders ``<out>/<cell>/<arm>/seed_<seed>`` (``fd_digits_history.json``, written
by ``scalelong.training.digit_quality``; ``metrics.json`` marks a finished run) and the CPU-time
ledger ``scripts/claim5_study.py`` keeps beside them; writes ``claim5.md``, ``claim5.json`` and
``claim5_legibility.png``.

A run that never reaches a threshold is censored: it counts as its horizon (last evaluated step +
the evaluation interval, 650 for 600 steps), a lower bound on its true steps. So a pair where
only one run reached it has a difference of the right sign whose size is understated, and a pair
where neither did counts 0; the report gives how many runs and pairs that affects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scalelong.analysis.study import interval
from scalelong.utils.errors import ConfigError, DataError
from scalelong.utils.io import write_text

# Reached within the sweep's 600 steps: with the cosine noise schedule at a constant rate, the
# quickstart's UNet with `none` passed it at 450 +- 44 steps (5 seeds, 2026-12-05) and every arm
# before 600; the quickstart's own 0.72-0.75 (with its decayed rate) would leave most runs censored.
# A backbone whose `none` runs end below it gets their median final legibility instead (the FD
# threshold's rule): the 13-block U-ViT ended at 0.29 +- 0.01 after 600 steps (2026-12-05), where a
# threshold of 0.65 leaves every pair censored and says nothing.
LEGIBILITY_THRESHOLD = 0.65
HISTORY_FILE = "fd_digits_history.json"  # callbacks=digits_quality
CPU_LEDGER = "cpu_seconds.json"  # per run, the CPU time of the processes that trained it (scripts/claim5_study.py)
BASELINE = "none"
MIN_PAIRS = 3  # seeds paired with none before a verdict: two can agree by chance on a 50-step grid
CELLS = ("unet_quickstart", "uvit13")  # conf/claim5_cell
ARMS = ("none", "sqrt2", "constant_k05", "learnable", "learnable_nonshared", "mp_cat", "learnable_scalar")
SEEDS = (1, 2, 3, 4, 5)
MEASURES = {  # key: (what it is, lower is faster)
    "steps_legibility": ("steps to reach the legibility threshold", True),
    "steps_fd": ("steps to reach the FD threshold", True),
    "mean_legibility": ("mean legibility over the evaluations", False),
}


def run_key(cell: str, arm: str, seed: int) -> str:
    return f"{cell}/{arm}/seed_{seed}"


@dataclass
class Claim5Run:
    cell: str
    arm: str
    seed: int
    path: Path
    steps: np.ndarray  # evaluated steps, ascending
    legibility: np.ndarray  # mean confidence of the classifier in each evaluation's samples
    fd: np.ndarray  # Frechet distance in the classifier's features
    every: int  # the evaluation interval
    cpu_seconds: float = math.nan
    seconds_per_step: float = math.nan  # wall, as the run logged it (time/seconds_per_step, mean)

    @property
    def horizon(self) -> int:
        """What a run that never reached a threshold counts as: the next evaluation it did not make."""
        return int(self.steps[-1]) + self.every


def first_reached(steps: np.ndarray, values: np.ndarray, threshold: float, higher_is_better: bool) -> float:
    """The first evaluated step whose value is at or beyond ``threshold`` (inf when none is)."""
    reached = values >= threshold if higher_is_better else values <= threshold
    return float(steps[np.argmax(reached)]) if reached.any() else math.inf


def steps_to(run: Claim5Run, measure: str, threshold: float) -> tuple[float, bool]:
    """(steps to reach ``threshold`` on ``legibility`` or ``fd``, censored): a censored run counts
    as its horizon."""
    if not math.isfinite(threshold):
        return math.nan, False
    values, higher = (run.legibility, True) if measure == "legibility" else (run.fd, False)
    step = first_reached(run.steps, values, threshold, higher)
    return (float(run.horizon), True) if step == math.inf else (step, False)


# --- reading the sweep ----------------------------------------------------------------------------


def read_ledger(out: Path) -> dict[str, Any]:
    path = Path(out) / CPU_LEDGER
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); move it away (only the CPU times are lost)") from None


def read_run(path: Path, cell: str, arm: str, seed: int, ledger: Mapping[str, Any] | None = None) -> Claim5Run | str:
    """The run in ``path``, or why it is not there or not finished (a few words)."""
    if not (path / "config.yaml").is_file():
        return "not started"
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    max_steps = int(config["train"]["max_steps"])
    every = int(((config.get("callbacks") or {}).get("digits_quality") or {}).get("every_n_steps") or 0)
    history_path = path / HISTORY_FILE
    try:
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
    except json.JSONDecodeError as err:
        raise DataError(f"{history_path} is not valid JSON ({err}); delete the run folder to train it again") from None
    history = sorted((e for e in history if e.get("legibility") is not None), key=lambda e: e["step"])
    done = json.loads((path / "metrics.json").read_text()).get("step", 0) if (path / "metrics.json").is_file() else 0
    if int(done) < max_steps or not history or history[-1]["step"] < max_steps or every <= 0:
        last = history[-1]["step"] if history else 0
        return f"unfinished (evaluated up to step {last} of {max_steps})"
    run = Claim5Run(cell, arm, seed, path, np.array([e["step"] for e in history], dtype=np.int64),
                    np.array([e["legibility"] for e in history], dtype=np.float64),
                    np.array([e["fid"] for e in history], dtype=np.float64), every)
    run.cpu_seconds = float((ledger or {}).get(run_key(cell, arm, seed), {}).get("cpu_seconds", math.nan))
    run.seconds_per_step = _logged_seconds_per_step(path)
    return run


def _logged_seconds_per_step(path: Path) -> float:
    from scalelong.analysis.runs import read_metrics

    series = read_metrics(path).get("time/seconds_per_step")
    return float(np.mean(series[1])) if series is not None and len(series[1]) else math.nan


def collect(out: Path, cells: Sequence[str], arms: Sequence[str], seeds: Sequence[int]
            ) -> tuple[list[Claim5Run], dict[str, str]]:
    """The finished runs of the planned ones, and for every other planned run why it is missing."""
    ledger = read_ledger(out)
    runs, missing = [], {}
    for seed in seeds:
        for cell in cells:
            for arm in arms:
                got = read_run(Path(out) / cell / arm / f"seed_{seed}", cell, arm, seed, ledger)
                if isinstance(got, str):
                    missing[run_key(cell, arm, seed)] = got
                else:
                    runs.append(got)
    return runs, missing


# --- the numbers ----------------------------------------------------------------------------------


def _none_final_medians(runs: Sequence[Claim5Run], cells: Sequence[str], measure: str) -> dict[str, float]:
    """Per backbone, the median over its ``none`` runs of their final ``legibility`` or ``fd``
    (NaN for a backbone without finished ``none`` runs)."""
    medians = {}
    for cell in cells:
        finals = [getattr(r, measure)[-1] for r in runs if r.cell == cell and r.arm == BASELINE]
        medians[cell] = float(np.median(finals)) if finals else math.nan
    return medians


def fd_thresholds(runs: Sequence[Claim5Run], cells: Sequence[str], fixed: float | None) -> dict[str, float]:
    """Per backbone: ``fixed``, else the median over its ``none`` runs of their final FD, the
    quality the paper's claim is about ("reaches Org's quality in fewer steps")."""
    if fixed is not None:
        return {cell: float(fixed) for cell in cells}
    return _none_final_medians(runs, cells, "fd")


def legibility_thresholds(runs: Sequence[Claim5Run], cells: Sequence[str], fixed: float | None) -> dict[str, float]:
    """Per backbone: ``fixed``, else the lower of ``LEGIBILITY_THRESHOLD`` and the median over its
    ``none`` runs of their final legibility, so that `none` reaches it within the sweep."""
    if fixed is not None:
        return {cell: float(fixed) for cell in cells}
    return {cell: LEGIBILITY_THRESHOLD if math.isnan(m) else min(LEGIBILITY_THRESHOLD, m)
            for cell, m in _none_final_medians(runs, cells, "legibility").items()}


def run_values(run: Claim5Run, legibility_threshold: float, fd_threshold: float) -> dict[str, Any]:
    steps_legibility, censored_legibility = steps_to(run, "legibility", legibility_threshold)
    steps_fd, censored_fd = steps_to(run, "fd", fd_threshold)
    return {"cell": run.cell, "arm": run.arm, "seed": run.seed, "path": str(run.path),
            "steps_legibility": steps_legibility, "censored_legibility": censored_legibility,
            "steps_fd": steps_fd, "censored_fd": censored_fd,
            "mean_legibility": float(np.mean(run.legibility)), "final_legibility": float(run.legibility[-1]),
            "final_fd": float(run.fd[-1]), "horizon": run.horizon, "every": run.every, "cpu_seconds": run.cpu_seconds,
            "seconds_per_step": run.seconds_per_step}


def verdict(mean: float, half: float, lower_is_faster: bool) -> str:
    """From the paired difference's interval: faster or slower than ``none`` when it excludes 0."""
    if not (math.isfinite(mean) and math.isfinite(half)):
        return "too few seeds"
    sign = 1 if lower_is_faster else -1
    if sign * mean + half < 0:
        return "faster"
    if sign * mean - half > 0:
        return "slower"
    return "not resolved"


def paired(values: Sequence[dict[str, Any]], cell: str, arm: str) -> dict[str, Any]:
    """Each measure's difference arm - ``none`` per seed, its mean and 95% interval, the verdict,
    how many seeds went which way, and for the steps the censoring that touches the pairs."""
    base = {v["seed"]: v for v in values if v["cell"] == cell and v["arm"] == BASELINE}
    pairs = [(v, base[v["seed"]]) for v in values if v["cell"] == cell and v["arm"] == arm and v["seed"] in base]
    result: dict[str, Any] = {"seeds": [v["seed"] for v, _ in pairs]}
    for key, (_, lower_is_faster) in MEASURES.items():
        diffs = [v[key] - b[key] for v, b in pairs]
        mean, half, n = interval(diffs)
        if key.startswith("steps_") and math.isfinite(half):
            # Steps are known only to the evaluation interval (the crossing lies within the 50 steps
            # before the first evaluation past it), so seeds that all differ by one evaluation give
            # a zero-width t interval that resolves nothing: the interval is at least that wide.
            half = max(half, float(max(max(v["every"], b["every"]) for v, b in pairs)))
        sign = 1 if lower_is_faster else -1
        entry = {"differences": diffs, "mean": mean, "ci95": half, "n": n,
                 "verdict": verdict(mean, half, lower_is_faster) if n >= MIN_PAIRS else "too few seeds",
                 "seeds_faster": sum(sign * d < 0 for d in diffs), "seeds_slower": sum(sign * d > 0 for d in diffs)}
        if key.startswith("steps_"):
            flag = key.replace("steps_", "censored_")
            both = sum(v[flag] and b[flag] for v, b in pairs)
            entry["pairs_both_censored"] = both
            entry["pairs_one_censored"] = sum(v[flag] != b[flag] for v, b in pairs)
            if pairs and both == len(pairs):
                entry["verdict"] = "neither reaches it"
            arm_mean, base_mean = np.mean([v[key] for v, _ in pairs]), np.mean([b[key] for _, b in pairs])
            entry["ratio_of_means"] = float(arm_mean / base_mean) if pairs and base_mean > 0 else math.nan
        result[key] = entry
    return result


def analyse(runs: Sequence[Claim5Run], missing: Mapping[str, str], cells: Sequence[str] = CELLS,
            arms: Sequence[str] = ARMS, seeds: Sequence[int] = SEEDS,
            legibility_threshold: float | None = None, fd_threshold: float | None = None) -> dict[str, Any]:
    """Everything the report shows, from the runs ``collect`` found."""
    leg_thr = legibility_thresholds(runs, cells, legibility_threshold)
    fd_thr = fd_thresholds(runs, cells, fd_threshold)
    values = [run_values(r, leg_thr[r.cell], fd_thr[r.cell]) for r in runs]
    results: dict[str, Any] = {
        "legibility_threshold": leg_thr,
        "legibility_threshold_rule": "fixed" if legibility_threshold is not None else
        f"{LEGIBILITY_THRESHOLD:g}, or the median final legibility of the none runs where that is lower",
        "fd_threshold": fd_thr,
        "fd_threshold_rule": "fixed" if fd_threshold is not None else "median final FD of the none runs",
        "planned": len(cells) * len(arms) * len(seeds), "finished": len(runs), "missing": dict(missing),
        "cells": {}, "runs": values}
    for cell in cells:
        per_arm = {}
        for arm in arms:
            got = [v for v in values if v["cell"] == cell and v["arm"] == arm]
            if not got:
                continue
            stats = {k: dict(zip(("mean", "ci95", "n"), interval([v[k] for v in got])))
                     for k in [*MEASURES, "final_legibility", "final_fd"]}
            stats["censored_legibility"] = sum(v["censored_legibility"] for v in got)
            stats["censored_fd"] = sum(v["censored_fd"] for v in got)
            stats["seeds"] = [v["seed"] for v in got]
            cpu = [v["cpu_seconds"] for v in got if math.isfinite(v["cpu_seconds"])]
            stats["cpu_seconds"] = {"mean": float(np.mean(cpu)) if cpu else math.nan, "runs": len(cpu)}
            if arm != BASELINE:
                stats["vs_none"] = paired(values, cell, arm)
            per_arm[arm] = stats
        results["cells"][cell] = per_arm
    cpu = [v["cpu_seconds"] for v in values if math.isfinite(v["cpu_seconds"])]
    results["cpu_seconds"] = {"total": float(np.sum(cpu)) if cpu else math.nan, "runs": len(cpu)}
    return results


# --- the report -----------------------------------------------------------------------------------


def _num(x: float, digits: int = 0) -> str:
    if not math.isfinite(x):
        return "∞" if x == math.inf else "–"
    return f"{x:,.{digits}f}"


def _ci(stat: Mapping[str, float], digits: int = 0) -> str:
    if not math.isfinite(stat["mean"]):
        return "–"
    if not math.isfinite(stat["ci95"]):
        return f"{_num(stat['mean'], digits)} (one seed)"
    return f"{_num(stat['mean'], digits)} ± {_num(stat['ci95'], digits)}"


def report_markdown(results: Mapping[str, Any], command: str) -> str:
    thr, fd_thr = results["legibility_threshold"], results["fd_threshold"]
    horizons = sorted({v["horizon"] for v in results["runs"]})
    missing = results["missing"]
    status = ("complete" if not missing else
              "PARTIAL; missing: " + "; ".join(f"`{k}`: {why}" for k, why in missing.items()))
    lines = [
        "# Claim 5 on the CPU: does scaling the long skips speed up training?", "",
        "The paper's claim 5: with scaled long skips (1/sqrt(2)-CS, CS, LS) a model reaches the quality of Org "
        "(`none`) in fewer steps (about 1/1.5 of them). Measured here on the digits as a reader sees them: every "
        "50 steps, the legibility of 100 EMA samples (the digit classifier's mean confidence in its reading; real "
        "digits about 0.91) and their Frechet distance in the classifier's features (FD, lower is better).", "",
        f"Command: `{command}`. Runs finished: **{results['finished']} of {results['planned']}** planned "
        f"({status}).", "",
        "- Legibility threshold (mean confidence; " + results["legibility_threshold_rule"] + ", `--threshold`): "
        + ", ".join(f"{cell} **{v:.3f}**" for cell, v in thr.items()) + ". The quickstart's UNet passes 0.65 after "
        "a few hundred steps at the study's constant rate (issue 28).",
        "- FD threshold (" + results["fd_threshold_rule"] + "): "
        + ", ".join(f"{cell} {_num(v, 1)}" for cell, v in fd_thr.items()) + ".",
        "- Steps to a threshold: the first evaluated step at or beyond it. A run that never reaches it is "
        f"censored and counts as its horizon ({', '.join(map(str, horizons)) or '–'}: last evaluation + 50), a "
        "lower bound on its true steps: a pair where only one run reached it keeps the right sign with an "
        "understated size, a pair where neither did counts 0 (both are counted below; `neither reaches it` when "
        "that is every pair).",
        "- Mean legibility over the evaluations: the area under the legibility curve divided by its length, "
        "less sensitive to the threshold; higher is faster.",
        "- Against `none`: per seed (same data order, initial weights and noise), the strategy minus `none`; "
        "mean ± half-width of the 95% t interval over seeds; for steps, at least the evaluation interval (they are "
        "known to no better). Verdict, from 3 seeds on: **faster** or **slower** when the interval "
        "excludes 0, else **not resolved**. `seeds +/-`: seeds faster / slower than `none`.", ""]
    for cell, arms in results["cells"].items():
        lines += [f"## {cell}", ""]
        if not arms:
            lines += ["No finished runs.", ""]
            continue
        lines += ["| strategy | seeds | steps to legibility (never) | steps to FD (never) | mean legibility | "
                  "final legibility | final FD | CPU s per run |", "|---|---|---|---|---|---|---|---|"]
        for arm, s in arms.items():
            lines.append(f"| {arm} | {len(s['seeds'])} | {_ci(s['steps_legibility'])} ({s['censored_legibility']}) | "
                         f"{_ci(s['steps_fd'])} ({s['censored_fd']}) | {_ci(s['mean_legibility'], 3)} | "
                         f"{_ci(s['final_legibility'], 3)} | {_ci(s['final_fd'], 1)} | "
                         f"{_num(s['cpu_seconds']['mean'])} |")
        lines.append("")
        if not [arm for arm in arms if arm != BASELINE]:
            lines += ["No strategy but `none` has finished runs: no comparison yet.", ""]
            continue
        lines += ["Against `none`, paired by seed:", "",
                  "| strategy | pairs | Δ steps to legibility | verdict | seeds +/- | censored pairs (one/both) | "
                  "steps / none's | Δ steps to FD | verdict | Δ mean legibility | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, s in arms.items():
            if arm == BASELINE:
                continue
            p = s["vs_none"]
            leg, fd, auc = p["steps_legibility"], p["steps_fd"], p["mean_legibility"]
            lines.append(f"| {arm} | {leg['n']} | {_ci(leg)} | {leg['verdict']} | "
                         f"{leg['seeds_faster']}/{leg['seeds_slower']} | "
                         f"{leg['pairs_one_censored']}/{leg['pairs_both_censored']} | "
                         f"{_num(leg['ratio_of_means'], 2)} | "
                         f"{_ci(fd)} | {fd['verdict']} | {_ci(auc, 3)} | {auc['verdict']} |")
        lines.append("")
    lines += ["![legibility against step](claim5_legibility.png)", "",
              "Legibility against step: the mean over seeds per strategy (shaded: min to max), the dashed line "
              "the threshold.", "", "## Compute", ""]
    cpu = results["cpu_seconds"]
    if cpu["runs"]:
        lines.append(f"CPU time (user + sys of the training processes, from `{CPU_LEDGER}`, resumed runs summed "
                     f"over their attempts): {_num(cpu['total'])} s over {cpu['runs']} runs "
                     f"({cpu['total'] / 3600:.2f} CPU-hours).")
    else:
        lines.append(f"No CPU times recorded (`{CPU_LEDGER}` is written by `scripts/claim5_study.py` as it trains).")
    wall = [v["seconds_per_step"] for v in results["runs"] if math.isfinite(v["seconds_per_step"])]
    if wall:
        lines.append(f"Logged wall time per step (evaluations included, `time/seconds_per_step`): mean "
                     f"{np.mean(wall):.3f} s over {len(wall)} runs.")
    return "\n".join(lines) + "\n"


def _finite_or_null(x: Any) -> Any:
    """JSON that every reader parses: NaN (no value) as null; numpy numbers as Python's."""
    if isinstance(x, Mapping):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def plot_legibility(results: Mapping[str, Any], runs: Sequence[Claim5Run], path: Path) -> bool:
    """One panel per backbone: each strategy's mean legibility over its seeds against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelong.analysis.plots import save_png

    cells = [c for c in results["cells"] if any(r.cell == c for r in runs)]
    if not cells:
        return False
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 3.8), squeeze=False)
    arms = list(dict.fromkeys(arm for per_arm in results["cells"].values() for arm in per_arm))  # the plan's order
    for ax, cell in zip(axes[0], cells):
        for k, arm in enumerate(arms):
            got = [r for r in runs if r.cell == cell and r.arm == arm]
            if not got:
                continue
            steps = got[0].steps
            for r in got[1:]:
                steps = np.intersect1d(steps, r.steps)
            stack = np.stack([r.legibility[np.isin(r.steps, steps)] for r in got])
            ax.plot(steps, stack.mean(0), color=f"C{k}", lw=1.3, label=f"{arm} (n={len(got)})")
            ax.fill_between(steps, stack.min(0), stack.max(0), color=f"C{k}", alpha=0.12)
        ax.axhline(results["legibility_threshold"][cell], color="k", ls="--", lw=0.9, label="threshold")
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("legibility (mean confidence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def write_report(out: Path, docs: Path, command: str, cells: Sequence[str] = CELLS, arms: Sequence[str] = ARMS,
                 seeds: Sequence[int] = SEEDS, legibility_threshold: float | None = None,
                 fd_threshold: float | None = None) -> dict[str, Any]:
    """``claim5.md``, ``claim5.json`` and ``claim5_legibility.png`` in ``docs``; returns the results."""
    runs, missing = collect(Path(out), cells, arms, seeds)
    if not runs:
        raise ConfigError(f"no finished runs of the plan in {out} (looked for <cell>/<arm>/seed_<s> with "
                          "metrics.json); run python scripts/claim5_study.py without --report-only first, "
                          "or point --out at the sweep")
    results = {"command": command, **analyse(runs, missing, cells, arms, seeds, legibility_threshold, fd_threshold)}
    docs = Path(docs)
    plot_legibility(results, runs, docs / "claim5_legibility.png")
    write_text(docs / "claim5.json", json.dumps(_finite_or_null(results), indent=2) + "\n")
    write_text(docs / "claim5.md", report_markdown(results, command))
    return results
