"""DDP on the CPU (gloo): same training as one process, sweeps whose jobs keep to themselves,
and checkpoints that resume in a single process."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, compose

from scalelong.cli.train import train

# Dropout masks are drawn per rank, so they differ between 1 and 2 processes: switch it off to
# compare the two runs step by step.
COMMON = ["experiment=smoke", "logger=csv", "train.batch_size=16", "train.max_steps=5", "model.dropout=0",
          "checkpoint.every_n_steps=5"]


def train_cli(cwd: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1"}
    import os

    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def test_two_process_ddp_matches_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    proc = train_cli(tmp_path, *COMMON, "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={ddp_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(compose(COMMON[:1] + COMMON[1:], tmp_path / "single"))

    a, b = losses(ddp_dir), losses(tmp_path / "single")
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

    # The DDP checkpoint resumes in a single process.
    resumed = train(compose([*COMMON, "train.max_steps=7", f"ckpt_path={ddp_dir / 'checkpoints' / 'last.ckpt'}"],
                            tmp_path / "resumed"))
    assert resumed["trainer"].global_step == 7


def test_a_failing_sweep_job_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    # Global batch 7 cannot be split over 2 processes: job 0 fails, job 1 must still run.
    proc = train_cli(tmp_path, "-m", *COMMON, "train.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp",
                     "train.batch_size=7,8", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}")
    assert proc.returncode != 0
    assert "global batch 7 is not divisible by the world size 2" in proc.stderr
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "0").exists()  # the failed job left no half-written folder
