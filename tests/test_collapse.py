"""The collapse study (issue 28): its exact statistics against known values, and its report from
run folders written as a real collapse_cpu run writes them (config.yaml, the CSV metrics,
metrics.json): counts, intervals, tests and verdicts; a partial sweep reported as partial; the
command end to end."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf
from scipy import stats
from warm_python import run_warm

from scalelong.analysis import collapse
from scalelong.analysis.collapse import Table, clopper_pearson, fisher_exact, stratified_exact, verdict
from scalelong.cli import collapse_study
from scalelong.utils.errors import ConfigError

CELLS = ["unet_lr5e-2", "uvit25_lr6e-3"]
ARMS = ["none", "sqrt2", "constant_k05", "constant_k08", "learnable", "learnable_nonshared"]
STEPS = 600


# --- the statistics ------------------------------------------------------------------------------


def test_clopper_pearson_gives_the_textbook_exact_intervals():
    # 0 of n: upper bound 1 - (alpha/2)^(1/n); n of n mirrors it; 5 of 10: (0.1871, 0.8129)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1, abs=1e-9))
    assert clopper_pearson(0, 10)[1] == pytest.approx(0.30850, abs=1e-5)
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-9), 1.0)
    lo, hi = clopper_pearson(5, 10)
    assert (lo, hi) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    for k, n in [(1, 6), (5, 6), (3, 20), (17, 20)]:  # the beta-quantile form of the same bounds
        assert clopper_pearson(k, n) == (pytest.approx(stats.beta.ppf(0.025, k, n - k + 1), abs=1e-9),
                                         pytest.approx(stats.beta.ppf(0.975, k + 1, n - k), abs=1e-9))


def test_fisher_exact_gives_the_hand_computed_p_and_the_direction():
    # The lady tasting tea (3 of 4 right): P(3) = P(1) = 16/70, P(4) = P(0) = 1/70, so p = 34/70.
    tea = fisher_exact(Table(3, 4, 1, 4))
    assert tea.p == pytest.approx(34 / 70, rel=1e-12) and tea.odds_ratio == 9.0 and tea.direction == 1
    # 5 of 10 against 0 of 10: P(5) = P(0) = C(10,5) / C(20,5) = 252/15504, p = 504/15504 = 0.0325
    five = fisher_exact(Table(5, 10, 0, 10))
    assert five.p == pytest.approx(504 / 15504, rel=1e-12) and five.odds_ratio == math.inf
    assert fisher_exact(Table(0, 10, 5, 10)).direction == -1 and fisher_exact(Table(2, 10, 2, 10)).direction == 0
    for a in range(11):  # every table of 10 runs against 10: scipy's test gives the same p
        for c in range(11):
            assert fisher_exact(Table(a, 10, c, 10)).p == pytest.approx(
                stats.fisher_exact([[a, 10 - a], [c, 10 - c]])[1], rel=1e-9, abs=1e-12)


def test_the_stratified_exact_test_convolves_the_cells():
    # One stratum: Fisher's test.
    assert stratified_exact([Table(5, 10, 0, 10)]).p == pytest.approx(504 / 15504, rel=1e-12)
    # By hand: cell 1 (2 runs each, 2 collapses): arm's x = 0, 1, 2 with 1/6, 4/6, 1/6; cell 2 (2 each,
    # 1 collapse): 0, 1 with 1/2 each. Their sum: 1/12, 5/12, 5/12, 1/12; observed 2 + 1 = 3: p = 2/12.
    test = stratified_exact([Table(2, 2, 0, 2), Table(1, 2, 0, 2)])
    assert test.p == pytest.approx(2 / 12, rel=1e-12) and test.observed == 3 and test.expected == pytest.approx(1.5)
    assert test.direction == 1 and test.odds_ratio == math.inf
    # Opposite effects in the two cells cancel; Mantel-Haenszel's odds ratio is then 1.
    both = stratified_exact([Table(4, 4, 0, 4), Table(0, 4, 4, 4)])
    assert both.p == pytest.approx(1.0) and both.direction == 0 and both.odds_ratio == pytest.approx(1.0)


def test_the_verdict_follows_the_direction_and_the_p():
    assert verdict(fisher_exact(Table(5, 10, 0, 10)), 10, 10) == "holds"           # more, p = 0.03
    assert verdict(fisher_exact(Table(5, 10, 1, 10)), 10, 10) == "not resolved"    # more, p = 0.14
    assert verdict(fisher_exact(Table(1, 10, 1, 10)), 10, 10) == "does not hold"   # as many
    assert verdict(fisher_exact(Table(0, 10, 5, 10)), 10, 10) == "does not hold"   # fewer
    assert verdict(fisher_exact(Table(0, 0, 1, 10)), 0, 10) == "not resolved"      # no runs of the arm


# --- run folders in the real format --------------------------------------------------------------


@pytest.fixture(scope="module")
def configs():
    """The resolved config.yaml of each cell x arm, composed as `train.py experiment=collapse_cpu` does."""
    return {(c, a): compose(["experiment=collapse_cpu", f"study_cell={c}", f"study_arm={a}"]) for c in CELLS
            for a in ARMS}


def loss_curve(kind: str, seed: int) -> tuple[list[int], list[float]]:
    """A run's logged training loss (every 10 steps, at 9, 19, ..., 599): it learns to ~0.15 by step
    100, then ``stays``, ``collapses`` (back to ~1 from step 300), ``spikes`` (1.0 at steps 300-400,
    then recovers), or ``ends_high`` (0.45, and 0.55 over the last 10% of steps)."""
    rng = np.random.default_rng(seed)
    steps = list(range(9, STEPS, 10))
    loss = []
    for s in steps:
        v = 1.0 - 0.85 * min(1.0, s / 100)
        if kind == "collapses" and s >= 300:
            v = 0.98
        elif kind == "spikes" and 300 <= s < 400:
            v = 1.0
        elif kind == "ends_high":
            v = 0.55 if s >= 540 else 0.45 if s >= 100 else v
        loss.append(v + float(rng.uniform(-0.02, 0.02)))
    return steps, loss


def write_run(out, configs, cell: str, arm: str, seed: int, kind: str, finished: bool = True) -> None:
    """What train.py writes into a sweep's run folder: config.yaml, csv/version_0/metrics.csv (a
    time row at each log interval, as the progress callback logs it) and, when done, metrics.json."""
    run = out / cell / arm / f"seed_{seed}"
    (run / "csv" / "version_0").mkdir(parents=True)
    config = {**configs[(cell, arm)], "seed": seed, "run_dir": str(run)}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    steps, loss = loss_curve(kind, seed)
    if not finished:
        steps, loss = steps[:20], loss[:20]
    rows = ["epoch,scaling/lsc1,step,time/seconds_per_step,train/grad_norm,train/loss,train/lr,train/nonfinite_skipped"]
    for s, v in zip(steps, loss):
        rows.append(f"0,1.0,{s},,0.5,{v},0.01,0.0")
        rows.append(f",,{s + 1},0.15,,,,")
    (run / "csv" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    if finished:
        (run / "metrics.json").write_text(json.dumps({"step": STEPS, "train/loss": loss[-1]}))


# Seeds 4-7 per cell. sqrt2: all 8 collapse, none 0 -> holds; constant_k05: one collapse -> not
# resolved; learnable: one run spikes and recovers (not collapsed), one ends just above 0.5
# (collapsed) -> not resolved; the rest never collapse -> does not hold.
DESIGN = {"sqrt2": {s: "collapses" for s in range(4, 8)}, "constant_k05": {4: "collapses"},
          "learnable": {5: "spikes", 6: "ends_high"}}


def write_sweep(out, configs, seeds=range(4, 8), cells=CELLS):
    for cell in cells:
        for arm in ARMS:
            for seed in seeds:
                kind = DESIGN.get(arm, {}).get(seed, "stays") if cell == CELLS[0] else (
                    "collapses" if arm == "sqrt2" else "stays")
                write_run(out, configs, cell, arm, seed, kind)


def test_the_report_counts_tests_and_judges_every_arm(tmp_path, configs):
    out, docs = tmp_path / "collapse_cpu", tmp_path / "docs"
    write_sweep(out, configs)
    seeds = list(range(4, 8))
    path = collapse.write_collapse_report(out, docs, CELLS, ARMS, seeds, "python scripts/collapse_study.py",
                                          ROOT / "docs" / "study_cpu" / "results.json")
    results = json.loads((docs / "collapse.json").read_text())
    assert results["planned"] == results["finished"] == 48 and not results["partial"] and results["missing"] == []
    unet = results["cells"]["unet_lr5e-2"]
    assert unet["label"] == "UNet 16 base channels, lr 0.05"
    assert [unet["arms"][a]["k"] for a in ARMS] == [0, 4, 1, 0, 1, 0]
    assert all(unet["arms"][a]["n"] == 4 for a in ARMS)
    assert unet["arms"]["sqrt2"]["ci95"] == pytest.approx([0.025 ** 0.25, 1.0], abs=1e-9)  # 4 of 4
    # per cell: Fisher's test, as scipy computes it (4 of 4 against 0 of 4: p = 2/70)
    assert unet["arms"]["sqrt2"]["vs_none"]["p"] == pytest.approx(stats.fisher_exact([[4, 0], [0, 4]])[1])
    assert unet["arms"]["sqrt2"]["vs_none"]["p"] == pytest.approx(2 / 70) and unet["arms"]["sqrt2"]["vs_none"][
        "verdict"] == "holds"
    # over both cells: 8 of 8 against 0 of 8, each cell 4 of 4 against 0 of 4: p = 2 / 70^2
    pooled = results["pooled"]
    assert pooled["sqrt2"]["k"] == 8 and pooled["sqrt2"]["n"] == 8
    assert pooled["sqrt2"]["vs_none"]["p"] == pytest.approx(2 / 70 ** 2, rel=1e-9)
    assert pooled["sqrt2"]["vs_none_summed"]["p"] == pytest.approx(stats.fisher_exact([[8, 0], [0, 8]])[1])
    verdicts = {a: pooled[a]["vs_none"]["verdict"] for a in ARMS[1:]}
    assert verdicts == {"sqrt2": "holds", "constant_k05": "not resolved", "constant_k08": "does not hold",
                        "learnable": "not resolved", "learnable_nonshared": "does not hold"}
    # the per-run values: the spike that recovered is not a collapse, the high end is
    runs = {(r["cell"], r["arm"], r["seed"]): r for r in results["runs"]}
    spike, high = runs[("unet_lr5e-2", "learnable", 5)], runs[("unet_lr5e-2", "learnable", 6)]
    _, loss = loss_curve("ends_high", 6)
    assert high["collapsed"] is True and high["final_loss"] == pytest.approx(np.mean(loss[-6:]))  # steps 549-599
    assert spike["collapsed"] is False and spike["final_loss"] < 0.2
    # the CPU study's counts beside the new ones, matched by the runs' own labels (sqrt2 5 of 6, none 1 of 6)
    assert pooled["sqrt2"]["original"] == {"k": 5, "n": 6} and pooled["none"]["original"] == {"k": 1, "n": 6}
    assert unet["arms"]["constant_k05"]["original"] == {"k": 3, "n": 3}
    text = path.read_text()
    assert "Complete sweep: all 48 planned runs finished" in text
    assert "| `sqrt2` | 8 of 8 | 1.00 [0.63, 1.00] | 5 of 6 | p = 0.00041, OR ∞ (more) |" in text
    assert "**does not hold**" in text and "Partial" not in text
    assert (docs / "collapse_rates.png").stat().st_size > 1000 and (docs / "collapse_losses.png").is_file()


def remove(run):
    for f in sorted(run.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    run.rmdir()


def test_a_partial_sweep_is_reported_as_partial_naming_what_is_missing(tmp_path, configs):
    out, docs = tmp_path / "collapse_cpu", tmp_path / "docs"
    write_sweep(out, configs, seeds=[4, 5])
    remove(out / "unet_lr5e-2" / "sqrt2" / "seed_5")  # never started
    remove(out / "uvit25_lr6e-3" / "learnable" / "seed_5")  # still running: logged up to step 200
    write_run(out, configs, "uvit25_lr6e-3", "learnable", 5, "stays", finished=False)
    collapse.write_collapse_report(out, docs, CELLS, ARMS, [4, 5], "cmd", None)
    results = json.loads((docs / "collapse.json").read_text())
    assert results["partial"] and (results["planned"], results["finished"]) == (24, 22)
    assert results["missing"] == ["unet_lr5e-2/sqrt2/seed_5 (not started)",
                                  "uvit25_lr6e-3/learnable/seed_5 (not finished, last logged step 200)"]
    assert results["cells"]["unet_lr5e-2"]["arms"]["sqrt2"]["n"] == 1
    assert results["cells"]["uvit25_lr6e-3"]["arms"]["learnable"]["n"] == 1
    assert results["pooled"]["sqrt2"]["original"] is None  # no --original given
    text = (docs / "collapse.md").read_text()
    assert "**Partial sweep**: 22 of 24 planned runs finished" in text and "(partial sweep)" in text
    assert ("Not counted: `unet_lr5e-2/sqrt2` seed 5 not started; `uvit25_lr6e-3/learnable` seed 5 not finished "
            "(logged up to step 200).") in text


# --- the command ---------------------------------------------------------------------------------


def test_the_sweep_is_the_experiments_one_seed_outermost(tmp_path):
    cells, arms, seeds = collapse.sweep_plan(ROOT / "conf" / "experiment" / "collapse_cpu.yaml")
    assert (cells, arms, seeds) == (CELLS, ARMS, list(range(4, 14)))
    jobs = collapse_study.sweep_commands(tmp_path, cells, [4, 5])
    assert [(c, s) for c, s, _ in jobs] == [(CELLS[0], 4), (CELLS[1], 4), (CELLS[0], 5), (CELLS[1], 5)]
    assert jobs[1][2][1:] == [str(ROOT / "train.py"), "-m", "experiment=collapse_cpu", "study_cell=uvit25_lr6e-3",
                              "seed=4", f"hydra.sweep.dir={tmp_path.resolve()}"]
    assert collapse_study.parse_seeds("4-6,9") == [4, 5, 6, 9]
    with pytest.raises(ConfigError, match="--seeds 'four' is not a list of seeds; write e.g. 4-13"):
        collapse_study.parse_seeds("four")


def test_collapse_study_report_only_end_to_end(tmp_path, configs):
    out = tmp_path / "collapse_cpu"
    write_sweep(out, configs)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "scripts" / "collapse_study.py")
    proc = run_warm([script, "--report-only", "--seeds", "4-7", "--out", str(out), "--docs", "report"],
                    cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "collapse report: report/collapse.md" in proc.stdout
    results = json.loads((tmp_path / "report" / "collapse.json").read_text())
    assert results["command"] == f"python scripts/collapse_study.py --report-only --seeds 4-7 --out {out} --docs report"
    assert results["pooled"]["sqrt2"]["vs_none"]["verdict"] == "holds"
    assert results["pooled"]["sqrt2"]["original"] == {"k": 5, "n": 6}  # the repository's study by default
    # the default seeds (4-13): the same runs, reported as a partial sweep
    proc = run_warm([script, "--report-only", "--out", str(out), "--docs", "report"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "report" / "collapse.md").read_text()
    assert "**Partial sweep**: 48 of 120 planned runs finished" in text
    assert "Not counted: `unet_lr5e-2/none` seeds 8-13 not started; `unet_lr5e-2/sqrt2` seeds 8-13" in text
    # bad input: one line, exit status 2
    proc = run_warm([script, "--report-only", "--out", str(tmp_path / "nowhere")], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--out" in proc.stderr
    assert not (tmp_path / "docs").exists()


STAND_IN = """
import json, os, pathlib, sys
log, out, cell, seed, arms, code = json.loads(sys.argv[1])
open(log, "a").write(f"{cell} {seed} {os.environ['OMP_NUM_THREADS']}\\n")
for arm in arms:
    run = pathlib.Path(out) / cell / arm / f"seed_{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
sys.exit(code)
"""


def test_the_sweep_goes_seed_by_seed_one_thread_each_and_past_a_failed_process(tmp_path, monkeypatch, capsys):
    """train_all's scheduling, with each training process replaced by one that writes its arms'
    metrics.json (or fails, as a sweep stopped by a diverged run does with status 3)."""
    out, seen = tmp_path / "sweep", tmp_path / "started.txt"
    real = collapse_study.sweep_commands

    def stand_ins(out_, cells, seeds):
        jobs = []
        for cell, seed, command in real(out_, cells, seeds):
            assert command[-1] == f"hydra.sweep.dir={out_.resolve()}"
            code = 3 if (cell, seed) == (CELLS[1], 4) else 0
            arms = ARMS[:2] if code else ARMS  # the failed one stops after two arms
            params = json.dumps([str(seen), str(out_), cell, seed, arms, code])
            jobs.append((cell, seed, [sys.executable, "-c", STAND_IN, params]))
        return jobs

    monkeypatch.setattr(collapse_study, "sweep_commands", stand_ins)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    collapse_study.train_all(out, CELLS, ARMS, [4, 5], jobs=1)
    assert seen.read_text().splitlines() == [f"{CELLS[0]} 4 1", f"{CELLS[1]} 4 1", f"{CELLS[0]} 5 1",
                                             f"{CELLS[1]} 5 1"]
    printed = capsys.readouterr().out
    assert "0 of 24 runs finished already" in printed
    assert f"{CELLS[1]}, seed 4: the sweep stopped with exit status 3" in printed
    assert printed.rstrip().splitlines()[-1].startswith("20 of 24 runs finished")
    assert (out / "logs" / f"{CELLS[1]}_seed_4.log").is_file()
