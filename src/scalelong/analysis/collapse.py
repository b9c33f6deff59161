"""The collapse finding repeated (issue 28): how often each long-skip strategy collapses under a
learning rate that stresses ``none``, with exact binomial intervals and exact tests against
``none``, per cell and over both cells, from the run folders of ``experiment=collapse_cpu``.

"Collapsed" is the CPU study's definition (``study._collapsed``: training loss over the last 10% of
steps above ``study.COLLAPSED_LOSS``). The statistics are exact and written here with ``math``:
Clopper-Pearson intervals (bisection on the binomial tail), Fisher's exact test and its stratified
form (the exact conditional test of a common odds ratio of 1, i.e. exact Cochran-Mantel-Haenszel)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scalelong.analysis.plots import save_png
from scalelong.analysis.runs import Run, load_runs
from scalelong.analysis.study import COLLAPSED_LOSS, _collapsed, _final_loss, cell_of
from scalelong.utils.errors import ConfigError
from scalelong.utils.io import write_text

BASELINE_ARM = "none"
LEVEL = 0.95  # of the intervals
ALPHA = 0.05  # of the tests: "holds" needs p below it
VERDICTS = ("holds", "does not hold", "not resolved")


# --- exact statistics ----------------------------------------------------------------------------


def binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0 if k == 0 else 0.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    return math.comb(n, k) * p**k * (1.0 - p) ** (n - k)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(binom_pmf(i, n, p) for i in range(0, k + 1)))


def _bisect(f, target: float, increasing: bool, iterations: int = 100) -> float:
    """The p in [0, 1] where the monotone ``f(p)`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial rate from k of n: the lower
    bound is the p whose P(X >= k) is (1 - level) / 2, the upper the p whose P(X <= k) is."""
    if n <= 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2
    lower = 0.0 if k == 0 else _bisect(lambda p: 1.0 - binom_cdf(k - 1, n, p), tail, increasing=True)
    upper = 1.0 if k == n else _bisect(lambda p: binom_cdf(k, n, p), tail, increasing=False)
    return lower, upper


@dataclass(frozen=True)
class Table:
    """One 2x2 table: ``a`` of ``n1`` runs of the arm collapsed, ``c`` of ``n0`` runs of ``none``."""
    a: int
    n1: int
    c: int
    n0: int

    @property
    def collapses(self) -> int:
        return self.a + self.c

    @property
    def total(self) -> int:
        return self.n1 + self.n0

    def hypergeom(self) -> dict[int, float]:
        """P(the arm has x of the collapses | both margins), for every possible x (Fisher's null)."""
        m, n = self.collapses, self.total
        lo, hi = max(0, m - self.n0), min(m, self.n1)
        whole = math.comb(n, m)
        return {x: math.comb(self.n1, x) * math.comb(self.n0, m - x) / whole for x in range(lo, hi + 1)}


@dataclass(frozen=True)
class ExactTest:
    p: float             # two-sided exact p
    odds_ratio: float    # > 1: the arm collapses more often than none (inf / nan where a count is 0)
    direction: int       # +1 more collapses than none, -1 fewer, 0 as many as expected under no effect
    observed: int        # the arm's collapses (summed over strata)
    expected: float      # ... expected with no difference from none, given each stratum's margins


def _two_sided(dist: dict[int, float], observed: int) -> float:
    """Sum of the probabilities of every outcome no more likely than the observed one (the
    conventional exact two-sided p; a relative tolerance keeps ties of equal probability)."""
    cut = dist[observed] * (1.0 + 1e-7)
    return min(1.0, sum(q for q in dist.values() if q <= cut))


def _direction(observed: float, expected: float) -> int:
    return 0 if abs(observed - expected) < 1e-9 else (1 if observed > expected else -1)


def fisher_exact(table: Table) -> ExactTest:
    """Fisher's exact test of one 2x2 table (two-sided) and the sample odds ratio."""
    dist = table.hypergeom()
    expected = table.n1 * table.collapses / table.total if table.total else 0.0
    b, d = table.n1 - table.a, table.n0 - table.c
    num, den = table.a * d, b * table.c
    odds = num / den if den else (math.inf if num else math.nan)
    return ExactTest(_two_sided(dist, table.a), odds, _direction(table.a, expected), table.a, expected)


def stratified_exact(tables: Sequence[Table]) -> ExactTest:
    """The exact conditional test that the odds ratio is 1 in every stratum (exact Cochran-Mantel-
    Haenszel): given each stratum's margins, the arm's collapses are hypergeometric per stratum; their
    sum's distribution is the convolution, and the p is two-sided as Fisher's. The odds ratio is
    Mantel-Haenszel's common estimate. With one stratum this is Fisher's test."""
    dist = {0: 1.0}
    for t in tables:
        if t.total == 0:
            continue
        step = t.hypergeom()
        joined: dict[int, float] = {}
        for x, p in dist.items():
            for y, q in step.items():
                joined[x + y] = joined.get(x + y, 0.0) + p * q
        dist = joined
    observed = sum(t.a for t in tables if t.total)
    expected = sum(t.n1 * t.collapses / t.total for t in tables if t.total)
    num = sum(t.a * (t.n0 - t.c) / t.total for t in tables if t.total)
    den = sum((t.n1 - t.a) * t.c / t.total for t in tables if t.total)
    odds = num / den if den else (math.inf if num else math.nan)
    return ExactTest(_two_sided(dist, observed), odds, _direction(observed, expected), observed, expected)


def verdict(test: ExactTest, n_arm: int, n_none: int, alpha: float = ALPHA) -> str:
    """The verdict: "holds" = more collapses than ``none`` with p < alpha; "does not hold" = no more than
    ``none`` (as many or fewer); "not resolved" = more, but p >= alpha, or no runs to compare."""
    if n_arm == 0 or n_none == 0:
        return "not resolved"
    if test.direction > 0:
        return "holds" if test.p < alpha else "not resolved"
    return "does not hold"


# --- the sweep's plan and its runs ---------------------------------------------------------------


def sweep_values(text: str | int) -> list[str]:
    """A Hydra sweep value as a list: ``a,b,c`` or ``range(start, stop[, step])``."""
    text = str(text).strip()
    m = re.fullmatch(r"range\((-?\d+)\s*,\s*(-?\d+)(?:\s*,\s*(-?\d+))?\)", text)
    if m:
        return [str(i) for i in range(int(m.group(1)), int(m.group(2)), int(m.group(3) or 1))]
    return [v.strip() for v in text.split(",") if v.strip()]


def sweep_plan(experiment: Path) -> tuple[list[str], list[str], list[int]]:
    """(cells, arms, seeds) of an experiment config's ``hydra.sweeper.params``."""
    try:
        params = yaml.safe_load(experiment.read_text())["hydra"]["sweeper"]["params"]
        return (sweep_values(params["study_cell"]), sweep_values(params["study_arm"]),
                [int(s) for s in sweep_values(params["seed"])])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the sweep (study_cell, study_arm, seed under hydra.sweeper.params) from "
                          f"{experiment}: {err}; pass the experiment config the sweep ran") from None


@dataclass
class PlannedRun:
    cell: str            # the sweep's folder names: study_cell, study_arm
    arm: str
    seed: int
    path: Path
    state: str = "not started"   # "finished", "not finished" (running, or stopped), "not started"
    run: Run | None = None
    final_loss: float = math.nan
    collapsed: float = math.nan  # 1.0, 0.0, or nan (finished, but no finite training loss to read)
    last_step: int = 0

    @property
    def counted(self) -> bool:
        return self.state == "finished" and math.isfinite(self.collapsed)


def _finished(path: Path, run: Run) -> bool:
    """metrics.json written and at max_steps (what train.py itself checks before skipping a run)."""
    try:
        step = int(json.loads((path / "metrics.json").read_text()).get("step", -1))
    except (OSError, ValueError):
        return False
    return step >= int((run.config.get("train") or {}).get("max_steps", math.inf))


def read_sweep(out: Path, cells: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> list[PlannedRun]:
    """Every planned run ``out/<cell>/<arm>/seed_<s>``, read where its folder has a config.yaml."""
    planned = []
    for cell in cells:
        for arm in arms:
            for seed in seeds:
                p = PlannedRun(cell, arm, seed, out / cell / arm / f"seed_{seed}")
                if (p.path / "config.yaml").is_file():
                    p.run = load_runs([p.path])[0]
                    p.last_step = p.run.last_step
                    p.state = "finished" if _finished(p.path, p.run) else "not finished"
                    if p.state == "finished":
                        p.final_loss, p.collapsed = _final_loss(p.run), _collapsed(p.run)
                planned.append(p)
    return planned


# --- counts, intervals, tests and verdicts ---------------------------------------------------------


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = clopper_pearson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else math.nan, "ci95": [lo, hi]}


def _test_dict(test: ExactTest, n_arm: int, n_none: int) -> dict[str, Any]:
    return {"p": test.p, "odds_ratio": test.odds_ratio,
            "direction": {1: "more", -1: "fewer", 0: "same"}[test.direction],
            "observed": test.observed, "expected_if_no_effect": test.expected,
            "verdict": verdict(test, n_arm, n_none)}


def read_original(path: Path | None) -> dict[str, dict[str, dict[str, int]]]:
    """The CPU study's collapse counts (seeds 1-3): {arm label: {cell label: {"k", "n"}}}."""
    if path is None or not path.is_file():
        return {}
    results = json.loads(path.read_text())
    out: dict[str, dict[str, dict[str, int]]] = {}
    for arm, by_cell in (results.get("collapsed") or {}).items():
        for cell, k in by_cell.items():
            n = ((results.get("cells") or {}).get(cell, {}).get(arm, {}).get("collapsed") or {}).get("n")
            if n is not None:
                out.setdefault(arm, {})[cell] = {"k": int(k), "n": int(n)}
    return out


def summarize(planned: Sequence[PlannedRun], cells: Sequence[str], arms: Sequence[str],
              original: dict[str, dict[str, dict[str, int]]]) -> dict[str, Any]:
    """Per cell x arm and per arm over the cells: counts, rates with exact intervals, the tests
    against ``none`` and their verdicts, the original study's counts beside them."""
    if BASELINE_ARM not in arms:
        raise ConfigError(f"the sweep has no `{BASELINE_ARM}` arm to compare with (arms: {', '.join(arms)}); "
                          f"add study_arm={BASELINE_ARM} to it")

    def counts(cell: str, arm: str) -> tuple[int, int]:
        got = [p for p in planned if p.cell == cell and p.arm == arm and p.counted]
        return int(sum(p.collapsed for p in got)), len(got)

    # the labels the runs give themselves (the original study's keys), from any finished run
    cell_label = {c: next((cell_of(p.run) for p in planned if p.cell == c and p.run is not None), None) for c in cells}
    arm_label = {a: next((p.run.strategy_label for p in planned if p.arm == a and p.run is not None), None)
                 for a in arms}

    def original_counts(cell: str, arm: str) -> dict[str, int] | None:
        return (original.get(arm_label[arm] or "") or {}).get(cell_label[cell] or "")

    table: dict[str, Any] = {"cells": {}, "pooled": {}}
    for cell in cells:
        k0, n0 = counts(cell, BASELINE_ARM)
        table["cells"][cell] = {"label": cell_label[cell], "arms": {}}
        for arm in arms:
            k, n = counts(cell, arm)
            entry = {**_rate(k, n), "label": arm_label[arm], "original": original_counts(cell, arm),
                     "planned": sum(1 for p in planned if p.cell == cell and p.arm == arm)}
            if arm != BASELINE_ARM:
                entry["vs_none"] = _test_dict(fisher_exact(Table(k, n, k0, n0)), n, n0)
            table["cells"][cell]["arms"][arm] = entry
    for arm in arms:
        per_cell = [table["cells"][c]["arms"][arm] for c in cells]
        k, n = sum(e["k"] for e in per_cell), sum(e["n"] for e in per_cell)
        originals = [e["original"] for e in per_cell]
        entry = {**_rate(k, n), "label": arm_label[arm], "planned": sum(e["planned"] for e in per_cell),
                 "original": ({"k": sum(o["k"] for o in originals), "n": sum(o["n"] for o in originals)}
                              if all(originals) else None)}
        if arm != BASELINE_ARM:
            tables = [Table(table["cells"][c]["arms"][arm]["k"], table["cells"][c]["arms"][arm]["n"],
                            table["cells"][c]["arms"][BASELINE_ARM]["k"], table["cells"][c]["arms"][BASELINE_ARM]["n"])
                      for c in cells]
            n0 = sum(t.n0 for t in tables)
            entry["vs_none"] = _test_dict(stratified_exact(tables), n, n0)
            summed = Table(k, n, sum(t.c for t in tables), n0)
            entry["vs_none_summed"] = _test_dict(fisher_exact(summed), n, n0)
        table["pooled"][arm] = entry
    return table


# --- the report ------------------------------------------------------------------------------------


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _or(x: float) -> str:
    return "∞" if x == math.inf else "–" if not math.isfinite(x) else f"{x:.2g}" if x < 0.01 else f"{x:.2f}"


def _kn(e: dict[str, Any] | None) -> str:
    return "–" if not e else f"{e['k']} of {e['n']}"


def _rate_cell(e: dict[str, Any]) -> str:
    if not e["n"]:
        return "–"
    lo, hi = e["ci95"]
    return f"{e['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def _test_cell(t: dict[str, Any] | None) -> str:
    if t is None:
        return "(baseline)"
    return f"p = {_p(t['p'])}, OR {_or(t['odds_ratio'])} ({t['direction']})"


def write_collapse_report(out: Path, docs: Path, cells: Sequence[str], arms: Sequence[str], seeds: Sequence[int],
                          command: str, original_path: Path | None = None) -> Path:
    """``docs/collapse.md``, ``collapse.json``, ``collapse_rates.png`` and ``collapse_losses.png``
    from the planned runs under ``out`` (finished ones only; the rest named as missing)."""
    if not out.is_dir():
        raise ConfigError(f"the sweep folder {out} does not exist; pass the folder the sweep writes to with --out")
    planned = read_sweep(out, cells, arms, seeds)
    original = read_original(original_path)
    summary = summarize(planned, cells, arms, original)
    finished = [p for p in planned if p.state == "finished"]
    missing = [p for p in planned if p.state != "finished"]
    unreadable = [p for p in finished if not p.counted]
    partial = bool(missing or unreadable)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    scope = (f"**Partial sweep**: {len(finished)} of {len(planned)} planned runs finished" if partial
             else f"Complete sweep: all {len(planned)} planned runs finished")
    runs_json = [{"cell": p.cell, "arm": p.arm, "seed": p.seed, "path": str(p.path), "state": p.state,
                  "last_step": p.last_step, "final_loss": p.final_loss,
                  "collapsed": None if not math.isfinite(p.collapsed) else bool(p.collapsed)} for p in planned]
    results = {"command": command, "written": date, "sweep": str(out), "cells": list(cells), "arms": list(arms),
               "seeds": list(seeds), "planned": len(planned), "finished": len(finished), "partial": partial,
               "missing": [f"{p.cell}/{p.arm}/seed_{p.seed} ({p.state}"
                           + (f", last logged step {p.last_step})" if p.state == "not finished" else ")")
                           for p in missing],
               "collapsed_loss": COLLAPSED_LOSS, "alpha": ALPHA, "level": LEVEL, **summary, "runs": runs_json}
    write_text(docs / "collapse.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    pngs = _plots(planned, summary, cells, arms, docs)

    tag = " (partial sweep)" if partial else ""
    lines = ["# The collapse finding, repeated", "",
             f"Command: `{command}`; report written {date}. Sweep: `{out}`, "
             f"{len(cells)} cells ({', '.join(f'`{c}`' for c in cells)}) x {len(arms)} arms x seeds "
             f"{_seed_list(seeds)} (the CPU study ran seeds 1-3), as `conf/experiment/collapse_cpu.yaml`.", "",
             f"{scope}." + ("" if not partial else " Not counted: " + _missing_text(missing, unreadable) + "."), "",
             f"A run **collapsed** when its training loss, averaged over the last 10% of its steps, is above "
             f"{COLLAPSED_LOSS} (the CPU study's definition; a network that predicts no noise at all scores 1). "
             f"Rates come with exact (Clopper-Pearson) {LEVEL:.0%} intervals. Each arm is tested against `none` "
             "with Fisher's exact test (two-sided) per cell; over both cells with the exact conditional test of a "
             "common odds ratio of 1 (the exact Cochran-Mantel-Haenszel test): it compares arm and `none` within "
             "each cell, given that cell's number of collapses, so that the cells' different baseline rates are "
             "not mixed; it is most powerful when the effect is the same in both cells, and effects of opposite "
             "sign in the two cells can cancel. Fisher's test on the counts summed over cells is shown too; it "
             "treats an arm's runs as one sample, which assumes the same collapse rates in both cells. "
             "OR: the odds ratio of collapsing, arm against `none` (Mantel-Haenszel's over both cells; ∞ when "
             "`none` never collapsed).", "",
             f"**Verdict** (computed from the test over both cells, and per cell from Fisher's): **holds** = "
             f"more collapses than `none` with p < {ALPHA}; **does not hold** = no more collapses than `none` "
             f"(the repeat saw no excess; it does not prove the rates equal); **not resolved** = more collapses "
             f"than `none`, but p >= {ALPHA}. The tests are not corrected for comparing five arms.", "",
             f"## Verdict per arm, both cells{tag}", "",
             "| arm | collapsed (new seeds) | rate [95% interval] | CPU study (seeds 1-3) | test against `none` "
             "over both cells | Fisher on summed counts | verdict |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        e = summary["pooled"][arm]
        t = e.get("vs_none")
        lines.append(f"| {_arm_name(arm, e['label'])} | {_kn(e)} | {_rate_cell(e)} | {_kn(e['original'])} | "
                     f"{_test_cell(t)} | {_test_cell(e.get('vs_none_summed')) if t else ''} | "
                     f"{'**' + t['verdict'] + '**' if t else ''} |")
    for cell in cells:
        c = summary["cells"][cell]
        lines += ["", f"## `{cell}`" + (f": {c['label']}" if c["label"] else "") + tag, "",
                  "| arm | collapsed (new seeds) | rate [95% interval] | CPU study (seeds 1-3) | Fisher's test "
                  "against `none` | verdict |", "|---|---|---|---|---|---|"]
        for arm in arms:
            e = c["arms"][arm]
            t = e.get("vs_none")
            lines.append(f"| {_arm_name(arm, e['label'])} | {_kn(e)} | {_rate_cell(e)} | {_kn(e['original'])} | "
                         f"{_test_cell(t)} | {t['verdict'] if t else ''} |")
    lines += ["", "The CPU study's counts (seeds 1-3) generated the finding; they are shown beside the new "
              "seeds, not added to them, so that the test is of data that did not suggest it.", ""]
    for name, caption in pngs.items():
        lines += [f"{caption}:", "", f"![{name}]({name})", ""]
    lines += ["## Per run: training loss over the last 10% of steps", "",
              f"`*` collapsed (above {COLLAPSED_LOSS}); `…` not finished; `·` not started.", ""]
    for cell in cells:
        lines += [f"`{cell}`:", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for arm in arms:
            cells_text = []
            for s in seeds:
                p = next(q for q in planned if q.cell == cell and q.arm == arm and q.seed == s)
                cells_text.append("·" if p.state == "not started" else "…" if p.state == "not finished" else
                                  "–" if not p.counted else f"{p.final_loss:.3f}" + ("*" if p.collapsed else ""))
            lines.append(f"| {arm} | " + " | ".join(cells_text) + " |")
        lines.append("")
    path = docs / "collapse.md"
    write_text(path, "\n".join(lines))
    return path


def _missing_text(missing: Sequence[PlannedRun], unreadable: Sequence[PlannedRun]) -> str:
    """The runs not counted, by cell and arm: seeds not started as one list, the others one by one."""
    parts = []
    for cell, arm in dict.fromkeys((p.cell, p.arm) for p in [*missing, *unreadable]):
        seeds = [p.seed for p in missing if (p.cell, p.arm) == (cell, arm) and p.state == "not started"]
        items = [f"seed{'s' if len(seeds) > 1 else ''} {_seed_list(seeds)} not started"] if seeds else []
        items += [f"seed {p.seed} not finished (" + (f"logged up to step {p.last_step})" if p.last_step
                                                     else "nothing logged yet)")
                  for p in missing if (p.cell, p.arm) == (cell, arm) and p.state == "not finished"]
        items += [f"seed {p.seed} finished without a finite training loss" for p in unreadable
                  if (p.cell, p.arm) == (cell, arm)]
        parts.append(f"`{cell}/{arm}` {', '.join(items)}")
    return "; ".join(parts)


def _arm_name(arm: str, label: str | None) -> str:
    return f"`{arm}`" + (f" ({label})" if label and label != arm else "")


def _seed_list(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")


def _plots(planned: Sequence[PlannedRun], summary: dict[str, Any], cells: Sequence[str], arms: Sequence[str],
           docs: Path) -> dict[str, str]:
    """The collapse rates with their intervals (new seeds; the CPU study's as open circles), and
    every finished run's training loss, one panel per cell and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    groups = [*cells, "both cells"]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.3 * len(groups), 3.2), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        entries = summary["pooled"] if group == "both cells" else summary["cells"][group]["arms"]
        for i, arm in enumerate(arms):
            e = entries[arm]
            if e["n"]:
                lo, hi = e["ci95"]
                ax.errorbar([i], [e["rate"]], yerr=[[e["rate"] - lo], [hi - e["rate"]]], fmt="o", ms=4, capsize=3,
                            color="C3" if arm == BASELINE_ARM else "C0")
            if e["original"] and e["original"]["n"]:
                ax.plot([i + 0.2], [e["original"]["k"] / e["original"]["n"]], "o", mfc="none", color="0.4", ms=4)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=7)
        ax.set_title(group, fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("collapsed runs (rate)")
    fig.tight_layout()
    save_png(fig, docs / "collapse_rates.png")
    plt.close(fig)
    written["collapse_rates.png"] = ("Collapse rate per arm with its exact 95% interval (new seeds; `none` in red); "
                                     "open circles: the CPU study's seeds 1-3")
    curves = [p for p in planned if p.state == "finished" and p.run is not None and p.run.series("train/loss")]
    if curves:
        highest = max(float(np.nanmax(p.run.series("train/loss")[1])) for p in curves)
        fig, axes = plt.subplots(len(cells), len(arms), figsize=(1.9 * len(arms), 1.7 * len(cells)),
                                 squeeze=False, sharex=True, sharey=True)
        for r, cell in enumerate(cells):
            for c, arm in enumerate(arms):
                ax = axes[r][c]
                for p in curves:
                    if p.cell == cell and p.arm == arm:
                        steps, loss = p.run.series("train/loss")
                        ax.plot(steps, loss, lw=0.7, color="C3" if p.collapsed == 1 else "C0", alpha=0.7)
                ax.axhline(COLLAPSED_LOSS, color="0.5", ls="--", lw=0.7)
                ax.set_ylim(0, min(max(1.2, 1.05 * highest), 3.0))  # a huge spike would flatten the rest
                ax.tick_params(labelsize=6)
                if r == 0:
                    ax.set_title(arm, fontsize=7)
                if c == 0:
                    ax.set_ylabel(cell, fontsize=7)
        fig.tight_layout()
        save_png(fig, docs / "collapse_losses.png")
        plt.close(fig)
        written["collapse_losses.png"] = (f"Training loss against step, every finished run (red: collapsed, its "
                                          f"loss over the last 10% of steps above {COLLAPSED_LOSS}, dashed)")
    return written
