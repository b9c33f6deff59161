"""Sweeps: an Optuna search over kappa, and the SLURM launcher configuration."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from conftest import CONF, ROOT


def test_optuna_search_over_kappa_runs_its_trials(tmp_path):
    sweep = tmp_path / "opt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "hparams_search=kappa", "experiment=smoke", "logger=csv",
         "train.max_steps=2", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.3 <= result["best_params"]["scaling.kappa"] <= 1.0
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    # Each trial's value is the final loss its run reported.
    values = [yaml.safe_load((sweep / j / "metrics.json").read_text())["train/loss"] for j in jobs]
    assert result["best_value"] == min(values)


def test_slurm_launcher_config_composes_with_one_task_per_gpu():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=4", "run_dir=."])
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (4, 2, "ddp")
