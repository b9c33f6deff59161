"""Post-hoc EMA in real runs: a killed and resumed run saves the snapshots of an uninterrupted one,
bit for bit; the reconstruction CLI writes checkpoints that scalelong-sample reads; the run's own
EMA set by ema.sigma_rel is the tracked EMA of that length."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, run_in_one_process
from test_robustness import LONG, start, wait_for_step

from scalelong.cli.train import train

POSTHOC = ["ema.posthoc.every_n_steps=2", "ema.posthoc.dtype=float32", "ema.sigma_rel=0.10",
           "train.max_steps=14", "checkpoint.every_n_steps=4"]


def snapshots(run: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run / "ema_snapshots").glob("step_*.pt"))}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return train(compose([*LONG, *POSTHOC], tmp_path_factory.mktemp("posthoc") / "full"))


def test_sigkill_then_resume_saves_the_snapshots_of_an_uninterrupted_run(tmp_path, full_run):
    run = tmp_path / "killed"
    proc = start(run, *POSTHOC, "train.max_steps=10000")  # would run long: we kill it
    wait_for_step(proc, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] in (8, 9)
    train(compose([*LONG, *POSTHOC, f"resume={run}"], run))

    full, resumed = snapshots(full_run["run_dir"]), snapshots(run)
    assert list(full) == [f"step_{s:07d}.pt" for s in range(2, 15, 2)] == list(resumed)
    for name in full:
        a, b = full[name], resumed[name]
        assert a["step"] == b["step"] and a["sigma_rels"] == b["sigma_rels"] == [0.05, 0.10]
        for i in range(2):
            assert a["averages"][i].keys() == b["averages"][i].keys()
            for k in a["averages"][i]:
                assert torch.equal(a["averages"][i][k], b["averages"][i][k]), (name, i, k)
    assert not list((run / "ema_snapshots").glob(".*.tmp"))  # no half-written snapshot left


def test_the_runs_own_ema_of_sigma_rel_010_is_the_tracked_one(full_run):
    last = torch.load(full_run["checkpoint"], weights_only=True)["state_dict"]
    tracked = snapshots(full_run["run_dir"])["step_0000014.pt"]["averages"][1]
    for k, v in tracked.items():
        assert torch.equal(last[f"ema.module.{k}"], v), k


def test_reconstruct_then_sample_through_the_commands(full_run):
    run = full_run["run_dir"]
    made, sampled, refused = run_in_one_process([
        [ROOT / "scripts" / "posthoc_ema.py", run, "--sigma-rel", "0.08,0.1"],
        [ROOT / "scripts" / "sample.py", run / "checkpoints" / "posthoc_sigma0.080_step0000014.ckpt",
         "--num", "4", "--steps", "3", "--sampler", "ancestral", "--skip-scale", "0.9", "--out", run / "s" / "x"],
        [ROOT / "scripts" / "posthoc_ema.py", run, "--sigma-rel", "0.005,0.1"],
    ], cwd=ROOT, warm=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "sigma_rel 0.08 (gamma 9.452) at step 14: profile fit error" in made.stdout
    ckpt = torch.load(run / "checkpoints" / "posthoc_sigma0.100_step0000014.ckpt", weights_only=True)
    assert ckpt["posthoc_ema"]["fit_error"] < 1e-6  # a tracked length: its own last snapshot
    tracked = snapshots(run)["step_0000014.pt"]["averages"][1]
    for k, v in tracked.items():
        torch.testing.assert_close(ckpt["state_dict"][f"ema.module.{k}"], v, rtol=0, atol=1e-6)

    assert sampled.returncode == 0, sampled.stderr[-2000:]
    images = np.load(run / "s" / "x.npz")["samples"]
    c, h, w = full_run["module"].space.image_shape
    assert images.shape == (4, h, w, c) and images.dtype == np.uint8 and images.std() > 0

    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("error: sigma_rel 0.005 (fit error")
    assert "they represent sigma_rel" in line
    assert not (run / "checkpoints" / "posthoc_sigma0.005_step0000014.ckpt").exists()
