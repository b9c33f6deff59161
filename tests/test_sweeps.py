"""Sweeps: an Optuna search over kappa (launched by test_readme.py, the README's line at toy size),
and the SLURM launcher configuration."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import CONF


def check_optuna_search_over_kappa(sweep: Path) -> None:
    """The Optuna search over kappa ran its 2 trials (``hydra.sweeper.n_trials=2``) into ``sweep``.

    Its run is the README's line ``python train.py hparams_search=kappa``, which
    test_readme.py::test_every_train_command_of_the_readme_runs launches at toy size with 2 trials
    and checks with this function (one launch of the same search instead of two)."""
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
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    # DDP, with a collective timeout of minutes (README "When a process dies")
    strategy = cfg.trainer.strategy
    assert (strategy._target_, strategy.timeout.minutes) == ("pytorch_lightning.strategies.DDPStrategy", 5)
