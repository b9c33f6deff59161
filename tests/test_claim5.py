"""Claim 5's analysis (steps to a legibility, paired against `none`) on run folders in the real
format: the history file as callbacks=digits_quality writes it (the template is one entry of a real
100-step run of experiment=claim5_cpu, tests/fixtures/claim5_run), with legibility and FD values
chosen so that every figure can be checked by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT, compose, run_in_one_process
from scipy import stats

from scalelong.analysis import claim5
from scalelong.cli import claim5_study

FIXTURE = ROOT / "tests" / "fixtures" / "claim5_run"
EVERY, MAX_STEPS = 50, 200  # evaluations at 50, 100, 150, 200; a run that never reaches counts 250


def make_run(out, cell, arm, seed, legibility, fd, finished=True):
    """A run folder as the sweep leaves it: config.yaml, fd_digits_history.json, metrics.json."""
    folder = out / cell / arm / f"seed_{seed}"
    folder.mkdir(parents=True)
    config = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    config["train"]["max_steps"], config["seed"] = MAX_STEPS, seed
    config["callbacks"]["digits_quality"]["every_n_steps"] = EVERY
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    template = json.loads((FIXTURE / "fd_digits_history.json").read_text())[0]
    history = [{**template, "step": EVERY * (i + 1), "fid": f, "legibility": g}
               for i, (g, f) in enumerate(zip(legibility, fd))]
    (folder / "fd_digits_history.json").write_text(json.dumps(history, indent=2) + "\n")
    if finished:
        (folder / "metrics.json").write_text(json.dumps({"step": history[-1]["step"],
                                                         "eval/legibility": legibility[-1]}))
    return folder


LOW_FD = [300.0, 200.0, 150.0, 100.0]
# cell unet_quickstart, legibility threshold 0.78: the first evaluated step at or above it
NONE = {1: [0.5, 0.6, 0.78, 0.9], 2: [0.5, 0.6, 0.7, 0.8], 3: [0.5, 0.6, 0.7, 0.77]}  # 150, 200, never (250)
SQRT2 = {1: [0.6, 0.8, 0.7, 0.9], 2: [0.6, 0.79, 0.85, 0.9], 3: [0.5, 0.6, 0.8, 0.9]}  # 100, 100, 150


def make_sweep(out):
    for seed in (1, 2, 3):
        make_run(out, "unet_quickstart", "none", seed, NONE[seed], [400.0, 250.0, 150.0, 90.0 + 10 * seed])
        make_run(out, "unet_quickstart", "sqrt2", seed, SQRT2[seed], LOW_FD)
        # the U-ViT never reaches the threshold with either strategy
        make_run(out, "uvit13", "none", seed, [0.3, 0.4, 0.5, 0.6], LOW_FD)
    make_run(out, "uvit13", "sqrt2", 1, [0.3, 0.4, 0.5, 0.5], LOW_FD)
    make_run(out, "uvit13", "sqrt2", 2, [0.3, 0.4, 0.5, 0.5], LOW_FD)
    make_run(out, "uvit13", "sqrt2", 3, [0.3, 0.9], LOW_FD[:2], finished=False)  # stopped at step 100


def test_steps_to_the_threshold_are_the_first_evaluation_that_reaches_it_and_a_run_that_never_does_counts_its_horizon(
        tmp_path):
    reached = claim5.read_run(make_run(tmp_path, "c", "a", 1, [0.5, 0.79, 0.7, 0.9], [300, 150, 120, 90]), "c", "a", 1)
    assert claim5.steps_to(reached, "legibility", 0.78) == (100.0, False)  # the first crossing, not the last
    assert claim5.steps_to(reached, "legibility", 0.79) == (100.0, False)  # reaching it exactly counts
    assert claim5.steps_to(reached, "fd", 120.0) == (150.0, False)  # FD: at or below
    assert claim5.steps_to(reached, "legibility", 0.95) == (250.0, True)  # never: the horizon, 200 + 50
    unfinished = make_run(tmp_path, "c", "a", 2, [0.5, 0.9], [300, 150], finished=False)
    assert claim5.read_run(unfinished, "c", "a", 2) == "unfinished (evaluated up to step 100 of 200)"
    assert claim5.read_run(tmp_path / "c" / "a" / "seed_3", "c", "a", 3) == "not started"


def test_paired_differences_intervals_and_verdicts_are_those_computed_by_hand(tmp_path):
    make_sweep(tmp_path)
    runs, missing = claim5.collect(tmp_path, ["unet_quickstart", "uvit13"], ["none", "sqrt2"], [1, 2, 3])
    assert missing == {"uvit13/sqrt2/seed_3": "unfinished (evaluated up to step 100 of 200)"}
    results = claim5.analyse(runs, missing, ["unet_quickstart", "uvit13"], ["none", "sqrt2"], [1, 2, 3],
                             legibility_threshold=0.78)
    assert (results["finished"], results["planned"]) == (11, 12)
    # FD threshold: the median of none's final FDs (100, 110, 120)
    assert results["fd_threshold"]["unet_quickstart"] == 110.0
    unet = results["cells"]["unet_quickstart"]
    assert unet["none"]["steps_legibility"]["mean"] == pytest.approx((150 + 200 + 250) / 3)
    assert unet["none"]["censored_legibility"] == 1 and unet["sqrt2"]["censored_legibility"] == 0

    leg = unet["sqrt2"]["vs_none"]["steps_legibility"]
    diffs = [100 - 150, 100 - 200, 150 - 250]  # seed 3: none never reached, counted as 250
    assert leg["differences"] == diffs and leg["n"] == 3
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3)  # 4.303 * 28.87 / 1.732 = 71.7
    assert leg["mean"] == pytest.approx(-250 / 3) and leg["ci95"] == pytest.approx(half)
    assert half == pytest.approx(71.7, abs=0.1)
    assert leg["verdict"] == "faster"  # -83.3 + 71.7 < 0
    assert (leg["seeds_faster"], leg["seeds_slower"]) == (3, 0)
    assert (leg["pairs_one_censored"], leg["pairs_both_censored"]) == (1, 0)
    assert leg["ratio_of_means"] == pytest.approx(350 / 600)

    # FD 110: none reaches it at 200 (seeds 1, 2: 100, 110) and never for seed 3 (120); sqrt2 at 200
    fd = unet["sqrt2"]["vs_none"]["steps_fd"]
    assert fd["differences"] == [0.0, 0.0, -50.0] and fd["verdict"] == "not resolved"
    # mean legibility over the evaluations: higher is faster
    auc = unet["sqrt2"]["vs_none"]["mean_legibility"]
    expected = [np.mean(SQRT2[s]) - np.mean(NONE[s]) for s in (1, 2, 3)]
    assert auc["differences"] == pytest.approx(expected)
    m, h = np.mean(expected), stats.t.ppf(0.975, 2) * np.std(expected, ddof=1) / math.sqrt(3)
    assert auc["verdict"] == ("faster" if m - h > 0 else "slower" if m + h < 0 else "not resolved")

    uvit = results["cells"]["uvit13"]["sqrt2"]["vs_none"]
    assert uvit["seeds"] == [1, 2]  # seed 3 of sqrt2 is unfinished: no pair
    assert uvit["steps_legibility"]["verdict"] == "neither reaches it"
    assert uvit["steps_legibility"]["pairs_both_censored"] == 2
    # Two seeds agreeing is no verdict (claim5.MIN_PAIRS), however narrow their interval.
    assert uvit["mean_legibility"]["mean"] == pytest.approx(-0.025)
    assert uvit["mean_legibility"]["verdict"] == "too few seeds"


def test_the_default_legibility_threshold_is_one_that_none_reaches_on_every_backbone(tmp_path):
    """0.65, or per backbone the median final legibility of its none runs where that is lower: the
    U-ViT's none runs end at 0.6, where 0.65 would leave every run censored."""
    make_sweep(tmp_path)
    runs, missing = claim5.collect(tmp_path, ["unet_quickstart", "uvit13"], ["none", "sqrt2"], [1, 2, 3])
    results = claim5.analyse(runs, missing, ["unet_quickstart", "uvit13"], ["none", "sqrt2"], [1, 2, 3])
    assert results["legibility_threshold"] == {"unet_quickstart": 0.65, "uvit13": pytest.approx(0.6)}
    assert results["legibility_threshold_rule"].startswith("0.65, or the median final legibility")
    uvit = results["cells"]["uvit13"]
    assert uvit["none"]["steps_legibility"]["mean"] == 200.0 and uvit["none"]["censored_legibility"] == 0
    assert uvit["sqrt2"]["censored_legibility"] == 2  # its finished seeds end at 0.5
    # the UNet at 0.65: none at 150, 150, 150 (0.78, 0.7, 0.7 at step 150)
    assert results["cells"]["unet_quickstart"]["none"]["steps_legibility"]["mean"] == 150.0
    fixed = claim5.analyse(runs, missing, ["unet_quickstart", "uvit13"], ["none", "sqrt2"], [1, 2, 3],
                           legibility_threshold=0.78)
    assert fixed["legibility_threshold"] == {"unet_quickstart": 0.78, "uvit13": 0.78}
    assert fixed["legibility_threshold_rule"] == "fixed"


def _paired_steps(differences: list[float], every: int = 50) -> dict:
    base = dict(cell="c", censored_legibility=False, censored_fd=False, every=every, mean_legibility=0.5,
                steps_fd=300.0)
    values = []
    for seed, d in enumerate(differences, start=1):
        values.append({**base, "arm": "none", "seed": seed, "steps_legibility": 400.0})
        values.append({**base, "arm": "sqrt2", "seed": seed, "steps_legibility": 400.0 + d})
    return claim5.paired(values, "c", "sqrt2")["steps_legibility"]


def test_steps_are_resolved_no_finer_than_the_evaluation_interval():
    """Every seed one evaluation (50 steps) earlier: the t interval has zero width, but the steps are
    known only to 50, so it is not a verdict; two evaluations earlier at every seed is."""
    one = _paired_steps([-50.0, -50.0, -50.0])
    assert one["mean"] == -50.0 and one["ci95"] == 50.0 and one["verdict"] == "not resolved"
    two = _paired_steps([-100.0, -100.0, -100.0])
    assert two["ci95"] == 50.0 and two["verdict"] == "faster"
    spread = _paired_steps([-200.0, -100.0, -150.0])  # a wider t interval stands: 4.30 * 50 / sqrt(3)
    assert spread["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 50 / math.sqrt(3))
    assert _paired_steps([-100.0, -100.0])["verdict"] == "too few seeds"


def test_verdicts_follow_the_interval_and_the_direction_of_the_measure():
    assert claim5.verdict(-10.0, 5.0, lower_is_faster=True) == "faster"
    assert claim5.verdict(10.0, 5.0, lower_is_faster=True) == "slower"
    assert claim5.verdict(-4.0, 5.0, lower_is_faster=True) == "not resolved"
    assert claim5.verdict(0.0, 0.0, lower_is_faster=True) == "not resolved"  # every seed tied
    assert claim5.verdict(0.02, 0.01, lower_is_faster=False) == "faster"  # more legible along the way
    assert claim5.verdict(-50.0, math.inf, lower_is_faster=True) == "too few seeds"


def test_the_report_command_writes_the_tables_the_plot_and_names_what_is_missing(tmp_path):
    make_sweep(tmp_path / "out")
    (tmp_path / "out" / claim5.CPU_LEDGER).write_text(json.dumps(
        {"unet_quickstart/none/seed_1": {"cpu_seconds": 300.0, "wall_seconds": 310.0, "attempts": 1},
         "unet_quickstart/sqrt2/seed_1": {"cpu_seconds": 360.0, "wall_seconds": 370.0, "attempts": 2}}))
    script = str(ROOT / "scripts" / "claim5_study.py")
    common = ["--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs"), "--seeds", "1,2,3", "--threshold", "0.78"]
    report, no_none, bad_cell, no_runs = run_in_one_process(
        [[script, "--report-only", *common, "--arms", "none,sqrt2"],
         [script, "--report-only", *common, "--arms", "sqrt2"],
         [script, "--report-only", *common, "--cells", "unet"],
         [script, "--report-only", "--out", str(tmp_path / "empty"), "--docs", str(tmp_path / "empty_docs")]],
        cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "runs finished: 11 of 12 (missing: uvit13/sqrt2/seed_3)" in report.stdout
    results = json.loads((tmp_path / "docs" / "claim5.json").read_text())
    leg = results["cells"]["unet_quickstart"]["sqrt2"]["vs_none"]["steps_legibility"]
    assert leg["mean"] == pytest.approx(-250 / 3) and leg["verdict"] == "faster"
    assert results["cpu_seconds"] == {"total": 660.0, "runs": 2}
    assert results["fd_threshold_rule"] == "median final FD of the none runs"
    text = (tmp_path / "docs" / "claim5.md").read_text()
    assert "**11 of 12** planned (PARTIAL; missing: `uvit13/sqrt2/seed_3`: unfinished" in text
    assert "| sqrt2 | 3 | -83 ± 72 | faster | 3/0 | 1/0 | 0.58 |" in text
    assert "660 s over 2 runs" in text
    assert (tmp_path / "docs" / "claim5_legibility.png").read_bytes()[:4] == b"\x89PNG"
    assert no_none.returncode == 2 and no_none.stderr.strip().splitlines() == [
        "error: --arms must include none (every comparison is against it), got sqrt2"]
    assert bad_cell.returncode == 2 and "--cells: unet not in conf/claim5_cell; valid: unet_quickstart, uvit13" \
        in bad_cell.stderr and "Traceback" not in bad_cell.stderr
    assert no_runs.returncode == 2 and no_runs.stderr.startswith("error: no finished runs of the plan in ")
    assert not (tmp_path / "empty_docs").exists()  # no empty report over a real one


def test_the_sweep_runs_seeds_outermost_each_run_into_the_folder_of_the_multirun_with_its_config(tmp_path):
    order = claim5_study.plan(["unet_quickstart", "uvit13"], ["none", "sqrt2"], [1, 2])
    assert order[:4] == [(1, "unet_quickstart", "none"), (1, "unet_quickstart", "sqrt2"), (1, "uvit13", "none"),
                         (1, "uvit13", "sqrt2")] and len(order) == 8
    command = claim5_study.train_command(tmp_path, 3, "uvit13", "constant_k05", ["train.max_steps=10"])
    assert command[-1] == f"hydra.run.dir={tmp_path / 'uvit13' / 'constant_k05' / 'seed_3'}"
    cfg = compose([a for a in command[2:] if not a.startswith("hydra.")])
    assert cfg["seed"] == 3 and cfg["model"]["_target_"] == "scalelong.models.UViT" and cfg["model"]["depth"] == 12
    assert cfg["scaling"]["name"] == "constant" and cfg["scaling"]["kappa"] == 0.5
    assert cfg["train"]["max_steps"] == 10 and cfg["callbacks"]["digits_quality"]["every_n_steps"] == 50


def test_the_ledger_adds_the_cpu_time_of_attempts_that_trained_and_not_of_runs_already_finished(tmp_path, monkeypatch):
    # A stand-in for train.py: about 0.3 CPU-seconds of work, then metrics.json unless the run has one.
    fake = ("import json, os, sys, time\n"
            "folder = sys.argv[-1].split('=', 1)[1]\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\n"
            "if not os.path.exists(folder + '/metrics.json'):\n"
            "    os.makedirs(folder, exist_ok=True); json.dump({'step': 1}, open(folder + '/metrics.json', 'w'))\n")
    monkeypatch.setattr(claim5_study, "train_command",
                        lambda out, seed, cell, arm, overrides: [sys.executable, "-c", fake,
                                                                 f"hydra.run.dir={out}/{cell}/{arm}/seed_{seed}"])
    runs = [(1, "unet_quickstart", "none"), (1, "unet_quickstart", "sqrt2")]
    claim5_study.train_all(tmp_path, runs, [], jobs=2)
    claim5_study.train_all(tmp_path, runs, [], jobs=2)  # again: both finished, nothing is added
    ledger = json.loads((tmp_path / claim5.CPU_LEDGER).read_text())
    assert sorted(ledger) == ["unet_quickstart/none/seed_1", "unet_quickstart/sqrt2/seed_1"]
    for entry in ledger.values():
        assert entry["attempts"] == 1 and 0.3 <= entry["cpu_seconds"] < 2.0  # its own, not the other job's too


CTRL_C = '''
import os, signal, sys, threading
from scalelong.cli import claim5_study
# a stand-in for train.py, which saves a checkpoint and exits 0 on SIGTERM (Lightning exits 1 on Ctrl-C)
child = ("import signal, sys, time\\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\\n"
         "try:\\n    time.sleep(30)\\nexcept KeyboardInterrupt:\\n    sys.exit(1)\\n")
claim5_study.train_command = lambda out, seed, cell, arm, overrides: [sys.executable, "-c", child]
threading.Timer(1.0, lambda: os.killpg(os.getpgrp(), signal.SIGINT)).start()  # Ctrl-C in the terminal
claim5_study.train_all(sys.argv[1], [(seed, "unet_quickstart", "none") for seed in range(1, 7)], [], 2)
'''


def test_ctrl_c_stops_the_sweep_without_starting_another_run(tmp_path):
    (tmp_path / "ctrl_c.py").write_text(CTRL_C)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(tmp_path / "ctrl_c.py"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60, start_new_session=True)
    assert proc.returncode == 130, proc.stderr[-2000:]
    started = [line for line in proc.stdout.splitlines() if line.endswith(".log)")]
    assert len(started) == 2  # the two under way, not the four after them
    assert proc.stdout.count("stopped (the same command resumes it") == 2  # by SIGTERM: exit status 0, not 1
    assert "FAILED" not in proc.stdout
    ledger = json.loads((tmp_path / "out" / claim5.CPU_LEDGER).read_text())  # a stopped attempt's CPU counts
    assert sorted(ledger) == ["unet_quickstart/none/seed_1", "unet_quickstart/none/seed_2"]
    assert proc.stderr.strip().endswith("stopped; the same command resumes the sweep")
