"""DDP on the CPU (gloo): same training as one process, sweeps whose jobs keep to themselves,
and checkpoints that resume in a single process. The tests share one two-process launch (each
costs two interpreters' imports and a gloo rendezvous): a DDP sweep whose first job fails and
whose second trains with the in-training FID callback (test_fid_callback.py tests it in one
process)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose
from warm_python import run_warm

from scalelong.cli.train import train
from scalelong.training.fid_callback import best_entry, read_history

# Dropout masks are drawn per rank, so they differ between 1 and 2 processes: switch it off to
# compare the two runs step by step.
COMMON = ["experiment=smoke", "logger=csv", "train.batch_size=16", "train.max_steps=5", "model.dropout=0",
          "checkpoint.every_n_steps=5", "model.base_channels=8"]


def train_cli(cwd: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # The tests folder (fid_helpers, collective_helpers) in front of the caller's path, which rank
    # 1 (a fresh interpreter) needs too, to import the same scalelong as rank 0.
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return run_warm([ROOT / "train.py", *overrides], cwd=cwd, timeout=timeout, env={**os.environ, **env})


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def fid_overrides(ref: Path) -> list[str]:
    """The FID callback every 2 steps on 7 samples, a fixed random linear map for Inception."""
    return ["callbacks=fid", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=7",
            "callbacks.fid.sampler=euler_ode", "callbacks.fid.steps=2", "callbacks.fid.chunk_size=2",
            "callbacks.fid.kid_max=7", f"callbacks.fid.ref={ref}",
            "+callbacks.fid.feature_extractor._target_=fid_helpers.LinearFeatures"]


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory, ref_path):
    """One two-process launch for the tests below (each costs two interpreters' imports and a
    gloo rendezvous): a DDP sweep over the global batch, 7 then 16. 7 cannot be split over 2
    processes, so job 0 fails; job 1 trains 5 steps with the FID callback on both ranks."""
    work = tmp_path_factory.mktemp("ddp")
    sweep = work / "sweep"
    proc = train_cli(work, "-m", *COMMON, *fid_overrides(ref_path), "trainer.devices=2", "trainer.strategy=ddp",
                     "train.batch_size=7,16", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
                     *COUNT_COLLECTIVES)
    return work, sweep, proc


# Every torch.distributed call listed per rank (collective_helpers), and the ranks' agreement on a
# pre-emption stop spaced an hour apart: after the first step, none within these 5 steps.
COUNT_COLLECTIVES = ["+callbacks.collectives._target_=collective_helpers.CountCollectives",
                     "checkpoint.stop_check_seconds=3600"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(ddp_sweep, ref_path):
    """Both runs carry the FID callback (it samples with its own seeded generators, so it leaves
    the training as it is); under DDP two gloo ranks share its samples, log once, write one
    history and save the best checkpoint together."""
    work, sweep, proc = ddp_sweep
    ddp_dir = sweep / "1"
    assert (ddp_dir / "metrics.json").is_file(), proc.stderr[-3000:]
    fid = fid_overrides(ref_path)
    single = train(compose([*COMMON, *fid], work / "single"))

    a, b = losses(ddp_dir), losses(work / "single")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    # Same global batch, same noise: only the order of float additions differs (the gradient
    # all-reduce averages two half-batch means), so the curves agree to float32 rounding.
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # Weights: Adam scales each update to about lr, so where a gradient is close to zero the
    # rounding noise can change an update by up to lr per step: 5 steps x lr bound the gap
    # (measured: 1.7e-4 at most, on the biases of the zero-initialised output convolutions).
    lr = single["module"].trainer.optimizers[0].defaults["lr"]
    ddp_state = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k, v in single["module"].state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=0, atol=5 * lr, msg=k)

    # The FID callback under two processes: one history of 7 samples per evaluation, shared by
    # the 2 ranks, and the best checkpoint is the one the history names.
    history = read_history(ddp_dir / "fid_history.json")
    assert [(e["step"], e["num"], e["world_size"]) for e in history] == [(2, 7, 2), (4, 7, 2)]
    ckpt = torch.load(ddp_dir / "checkpoints" / "best_fid.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == best_entry(history)["step"]

    # The DDP checkpoint resumes in a single process (with the callbacks it was saved with).
    resumed = train(compose([*COMMON, *fid, "train.max_steps=7",
                             f"ckpt_path={ddp_dir / 'checkpoints' / 'last.ckpt'}"], work / "resumed"))
    assert resumed["trainer"].global_step == 7


@pytest.mark.slow
def test_no_collective_per_step_for_the_stop_signal(ddp_sweep):
    """Each rank's own collectives (those of Python code; DDP's gradient all-reduce is in C++)
    over the 5 steps: Lightning's broadcast of its SIGTERM flag and PeriodicCheckpoint's agreement
    on a stop were one each per step (5 + 5 per rank); now the agreement comes once, after the
    first step, and Lightning's broadcast not at all. What remains per step is the guard's
    all-reduce of the loss's finiteness, which nothing reads on the host."""
    work, sweep, proc = ddp_sweep
    for rank in (0, 1):
        path = sweep / "1" / f"collectives_rank{rank}.json"
        assert path.is_file(), proc.stderr[-3000:]
        calls = json.loads(path.read_text())
        by_origin = {}
        for step, name, origin in calls:
            by_origin.setdefault(origin, []).append(step)
        assert not any(o.startswith("training_epoch_loop.py") for o in by_origin), by_origin
        assert by_origin.pop("callbacks.py:_stop_agreed") == [1], rank
        assert by_origin.pop("module.py:on_before_optimizer_step") == [0, 1, 2, 3, 4]
        # self.log's sync_dist of the loss (a barrier and an all-reduce) on the logging steps:
        # every step in experiment=smoke.
        assert by_origin.pop("result.py:update") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        # The rest: the FID evaluations at steps 2 and 4 and their checkpoint, the checkpoint at
        # step 5; nothing at steps 1 and 3.
        rest = sorted(step for steps in by_origin.values() for step in steps)
        assert 1 not in rest and 3 not in rest, by_origin


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_others(ddp_sweep):
    work, sweep, proc = ddp_sweep
    # Global batch 7 cannot be split over 2 processes: job 0 fails, job 1 must still run.
    assert proc.returncode != 0
    assert "global batch 7 is not divisible by the world size 2" in proc.stderr
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "0").exists()  # the failed job left no half-written folder
    # Job 1 ran once, on both ranks, in its own folder: the second rank re-runs only its job, not
    # the sweep (test_readme runs the README's DDP sweep with a world of one).
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["1"]
    logged = []
    for path in (sweep / "1").glob("csv/version_*/metrics.csv"):
        with open(path) as f:
            logged += [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert sorted(logged) == [0, 1, 2, 3, 4]  # five steps, logged once each
    # The gradients fit DDP's buckets: no copy into another layout, no warning (grad_layout.py).
    assert "Grad strides do not match bucket view strides" not in proc.stderr
    assert "batch_size: 16" in (sweep / "1" / "config.yaml").read_text()
