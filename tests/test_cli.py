"""The command line: bad input gives one readable line, a non-zero exit and no run folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


def run_train(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    return proc, run_dir


@pytest.mark.parametrize("overrides, expected", [
    (["scaling.name=lernable"], "valid strategies: none, sqrt2, constant, learnable, learnable_nonshared"),
    (["scaling=constant", "scaling.kappa=0"], "kappa must lie in (0, 1], got 0"),
    (["scaling=constant", "scaling.kappa=1.5"], "kappa must lie in (0, 1], got 1.5"),
])
def test_bad_scaling_is_one_line_and_leaves_no_run_folder(tmp_path, overrides, expected):
    proc, run_dir = run_train(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_unknown_config_group_option_is_hydras_clear_error(tmp_path):
    proc, run_dir = run_train(tmp_path, "scaling=lernable")
    assert proc.returncode != 0
    # Hydra names the group and lists the available options.
    assert "scaling" in proc.stderr and "learnable_nonshared" in proc.stderr
    assert not run_dir.exists()


def test_a_plain_run_makes_its_own_named_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=csv",
                           "scaling=constant", "scaling.kappa=0.7"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_digits_unet_constant")
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file() and (runs[0] / "config.yaml").is_file()
    # The same command with resume= continues in that folder and makes no new one.
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=csv",
                           "scaling=constant", "scaling.kappa=0.7", "train.max_steps=6", f"resume={runs[0]}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "outputs" / "runs").iterdir()) == runs
    assert "Restored all states" in proc.stderr + proc.stdout


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={blocker / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot create the run folder {blocker / 'run'}: {blocker} is a file, not a folder; "
        "choose another place with hydra.run.dir=..."]
