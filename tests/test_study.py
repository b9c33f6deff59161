"""The multi-seed study at toy size, end to end: its configuration sweeps cells x strategies x seeds
into a fixed folder, running it again skips what is done, and the study report's intervals and
verdicts are the ones computed from the runs' own files."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, run_in_one_process
from warm_python import run_warm
from scipy import stats

from scalelong.analysis import study

TOY = ["study_cell=unet", "study_arm=none,constant_k05", "seed=1,2", "train.max_steps=6", "train.warmup_steps=0",
       "model.base_channels=8", "quick_eval=null", "callbacks.digits_quality.every_n_steps=3",
       "callbacks.digits_quality.num_samples=16", "callbacks.digits_quality.steps=2",
       "callbacks.stability.every_n_steps=1", "callbacks.stability.robustness_every_n_steps=3",
       "callbacks.stability.loss_window=2", "sample.num=4", "sample.steps=2", "checkpoint.every_n_steps=3",
       "trainer.log_every_n_steps=1"]


def test_the_study_configuration_is_the_designed_one():
    cfg = compose(["experiment=study_cpu", "study_cell=uvit25", "study_arm=constant_k08"])
    assert cfg["model"]["_target_"] == "scalelong.models.UViT" and cfg["model"]["depth"] == 24
    assert cfg["scaling"]["name"] == "constant" and cfg["scaling"]["kappa"] == 0.8
    assert cfg["train"]["max_steps"] == 600 and cfg["ema"]["warmup"] is True
    assert cfg["callbacks"]["digits_quality"]["fid_key"] == "eval/fd_digits"
    cells = sorted(p.stem for p in (ROOT / "conf" / "study_cell").glob("*.yaml"))
    assert len(cells) >= 5 and {"uvit13", "uvit25", "unet"} <= set(cells)


@pytest.mark.slow
def test_a_toy_study_runs_resumes_and_reports_intervals_from_the_runs(tmp_path):
    sweep = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALELONG_CACHE": str(tmp_path / "cache")}
    command = [str(ROOT / "train.py"), "-m", "experiment=study_cpu", *TOY, f"hydra.sweep.dir={sweep}"]
    # The sweep, the same command again and the report, one after the other in one process.
    proc, again, report = run_in_one_process([command, command, [str(ROOT / "scripts" / "study.py"), str(sweep)]],
                                             cwd=tmp_path, env=env, timeout=900, warm=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert [str(r.relative_to(sweep)) for r in runs] == [
        "unet/constant_k05/seed_1", "unet/constant_k05/seed_2", "unet/none/seed_1", "unet/none/seed_2"]
    history = json.loads((runs[0] / "fd_digits_history.json").read_text())
    assert [e["step"] for e in history] == [3, 6] and history[0]["num"] == 16  # quality along training
    # ... with the legibility of the same 16 samples (a softmax's largest value is at least 0.1)
    assert 0.1 <= history[0]["legibility"] <= 1 and sum(history[0]["class_counts"]) == 16
    # The same command again: every run is done, none trains again.
    assert again.returncode == 0 and again.stdout.count("finished already") == 4, again.stdout[-2000:]

    assert report.returncode == 0, report.stderr[-3000:]
    results = json.loads((sweep / "report" / "results.json").read_text())
    cell = next(iter(results["cells"]))
    assert cell.startswith("UNet") and cell.endswith("lr 0.003")

    # Recompute one measure from the CSV logs: the mean log gradient norm over the second half.
    def grad_log_norm(run):
        rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
        pts = [(int(r["step"]), float(r["grads/total"])) for r in rows if r.get("grads/total")]
        last = max(s for s, _ in pts)
        return float(np.mean([math.log(v) for s, v in pts if s >= last / 2]))

    by_seed = {(r.parts[-2], r.parts[-1]): grad_log_norm(r) for r in runs}
    diffs = [by_seed[("constant_k05", s)] - by_seed[("none", s)] for s in ("seed_1", "seed_2")]
    half = stats.t.ppf(0.975, 1) * np.std(diffs, ddof=1) / math.sqrt(2)
    got = results["cells"][cell]["constant κ=0.5"]["grad_log_norm_minus_none"]
    assert got["n"] == 2
    assert got["mean"] == pytest.approx(np.mean(diffs), rel=1e-9) and got["ci95"] == pytest.approx(half, rel=1e-9)
    expected = "held" if got["mean"] + half < 0 else "did not hold" if got["mean"] - half > 0 else "inconclusive"
    assert got["verdict"] == expected
    mean_none = np.mean([by_seed[("none", s)] for s in ("seed_1", "seed_2")])
    assert results["cells"][cell]["none"]["grad_log_norm"]["mean"] == pytest.approx(mean_none, rel=1e-9)
    # The claim's verdict per strategy comes from that strategy's paired comparisons.
    claim2 = [results["cells"][cell]["constant κ=0.5"][f"{k}_minus_none"]["verdict"]
              for k in ("grad_log_norm", "grad_oscillation", "loss_spread")]
    assert results["claims"]["2"]["by_strategy"] == {"constant κ=0.5": study.overall(claim2)}
    text = (sweep / "report" / "report.md").read_text()
    assert "Scale: 16x16 images (digits), 6 steps at batch 32, 2 seeds." in text
    # Collapse: the mean loss of the last 10% of logged steps above 0.5, counted per cell.
    def last_losses(run):
        rows = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(
            open(run / "csv" / "version_0" / "metrics.csv")) if r.get("train/loss")]
        last = max(s for s, _ in rows)
        return [v for s, v in rows if s >= 0.9 * last]

    losses = {(r.parts[-2], r.parts[-1]): last_losses(r) for r in runs}
    expected_collapsed = sum(np.mean(v) > 0.5 for k, v in losses.items() if k[0] == "none")
    assert results["collapsed"]["none"][cell] == expected_collapsed
    assert results["cells"][cell]["none"]["final_loss"]["mean"] == pytest.approx(
        np.mean([np.mean(v) for k, v in losses.items() if k[0] == "none"]), rel=1e-9)
    assert "| constant κ=0.5 | log gradient norm, 2nd half |" in text and "**Claim 2.**" in text
    assert (sweep / "report" / "quality.png").is_file()


def test_a_claims_verdict_needs_half_of_its_comparisons_and_no_contrary_one():
    assert study.overall(["held", "held", "inconclusive"]) == "held"
    assert study.overall(["held", "inconclusive", "inconclusive"]) == "inconclusive"  # one of three
    assert study.overall(["held", "held", "did not hold"]) == "inconclusive"  # contradicted
    assert study.overall(["did not hold", "inconclusive"]) == "did not hold"
    assert study.overall([]) == "inconclusive"


def test_the_paper_comparison_is_the_papers_cifar10_setup():
    cfg = compose(["experiment=paper_comparison", "scaling=learnable"])
    assert cfg["dataset"]["name"] == "cifar10" and cfg["model"]["embed_dim"] == 512 and cfg["model"]["depth"] == 12
    assert cfg["train"]["max_steps"] == 500_000 and cfg["train"]["batch_size"] == 128
    fid = cfg["callbacks"]["fid"]
    assert (fid["every_n_steps"], fid["num_samples"], fid["sampler"], fid["steps"]) == (50_000, 10_000, "dpm_solver", 50)
    check = compose(["experiment=paper_comparison_check", "scaling=none"])
    assert check["train"]["max_steps"] == 1000 and check["callbacks"]["fid"]["every_n_steps"] == 500
    assert check["model"] == compose(["experiment=paper_comparison", "scaling=none"])["model"]


@pytest.mark.slow
def test_the_gpu_comparison_runs_on_the_cpu_at_toy_size_and_ends_with_its_report(tmp_path):
    """The documented GPU command with two strategies, two steps and FID of 8 samples at step 2
    (real Inception, reference statistics built from generated CIFAR10 files): every job trains and
    evaluates, and the sweep ends with the report, its FID columns and the hours a 500k-step job
    takes at the pace each job measured."""
    from test_data_cifar10 import write_folder

    data = tmp_path / "cifar"
    write_folder(data)
    sweep = tmp_path / "comparison"
    command = [ROOT / "train.py", "experiment=paper_comparison_check", "scaling=none,learnable",
               "trainer.accelerator=cpu", f"dataset.data_dir={data}", "dataset.download=false",
               "model.depth=2", "model.embed_dim=16", "model.num_heads=2", "train.batch_size=4", "train.max_steps=2",
               "eval_every_n_steps=2", "callbacks.fid.num_samples=8", "callbacks.fid.steps=2",
               f"callbacks.fid.ref={tmp_path / 'cifar10_ref.npz'}", "sample.every_n_steps=2", "sample.num=2",
               "sample.steps=2", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1",
               "callbacks.stability.every_n_steps=1", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_warm(command, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for strategy in ("none", "learnable"):
        history = json.loads((sweep / strategy / "fid_history.json").read_text())
        assert [e["step"] for e in history] == [2] and history[0]["num"] == 8
        assert math.isfinite(history[0]["fid"])
    report = (sweep / "report" / "report.md").read_text()
    assert "best FID (step)" in report and "hours for 500,000 steps" in report
    table = report.split("## Time", 1)[1].split("##", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # below the header
    assert [row.split("|")[1].strip() for row in rows] == ["none", "learnable"]
    for row in rows:  # seconds per step x 500k / 3600 = the hours column
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4]) == pytest.approx(float(cells[2]) * 500_000 / 3600, rel=0.01, abs=0.05)


def test_the_digit_quality_measure_separates_real_digits_from_damaged_ones(tmp_path):
    """The study's quality along training: the Frechet distance in a digit classifier's features.
    The classifier is trained and cached the first time (here in tmp_path); it must classify the
    held-out digits, and its distance must rank real < slightly noised < noise."""
    from scalelong.data import load_digits_images
    from scalelong.metrics.digits import DigitFeatures
    from scalelong.metrics.frechet import frechet_distance

    features = DigitFeatures(str(tmp_path / "classifier.pt"))
    assert features.accuracy >= 0.9 and (tmp_path / "classifier.pt").is_file()
    again = DigitFeatures(str(tmp_path / "classifier.pt"))  # read back, not retrained
    assert again.sha1 == features.sha1

    images = load_digits_images(16).images
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=g)
    a, b = images[order[:800]], images[order[800:1600]]

    def fd(x, y):
        fx, fy = (features(im.float().repeat(1, 3, 1, 1)).double().numpy() for im in (x, y))
        return frechet_distance(fx.mean(0), np.cov(fx, rowvar=False), fy.mean(0), np.cov(fy, rowvar=False))

    noised = (b.float() + 60 * torch.randn(b.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8)
    real, damaged, random = fd(a, b), fd(a, noised), fd(a, noise)
    assert real < 0.5 * damaged and damaged < 0.1 * random, (real, damaged, random)  # about 13, 38, 1100
