"""Extending the framework from outside the repository, as the README shows: a strategy class and a
backbone class in the user's own module, one YAML each in the user's config folder (added with
hydra.searchpath). They train, sweep and appear in the report under their own names."""

from __future__ import annotations

import csv
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_in_one_process
from warm_python import run_warm

MODULE = '''
import torch
from torch import nn

from scalelong.scaling import ConstantCoefficients, build_skip_scaling


class HalfScaling(ConstantCoefficients):
    """Every long skip times ``factor``."""

    paper_name = "half-CS"

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.factor = float(factor)

    def coefficient(self, index):
        return self.factor


class TinyNet(nn.Module):
    """Two conv levels joined by two long skips (LSC 1 the outer one)."""

    def __init__(self, img_size: int, in_chans: int, width: int = 8, scaling=None):
        super().__init__()
        self.inp = nn.Conv2d(in_chans, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.time = nn.Linear(1, width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Conv2d(2 * width, in_chans, 3, padding=1)
        self.skip_scaling = build_skip_scaling(scaling)
        self.skip_scaling.setup([(width, img_size, img_size), (width, img_size // 2, img_size // 2)], "channels")

    def forward(self, x, timesteps, y=None):
        h1 = torch.relu(self.inp(x) + self.time(timesteps[:, None] / 1000)[:, :, None, None])
        h2 = torch.relu(self.down(h1))
        d, s = self.skip_scaling.merge(h2, h2, 2)
        d = torch.relu(self.up(torch.cat([d, s], 1)))
        d, s = self.skip_scaling.merge(d, h1, 1)
        return self.out(torch.cat([d, s], 1))
'''


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user_project")
    (root / "my_ext.py").write_text(textwrap.dedent(MODULE))
    (root / "conf" / "scaling").mkdir(parents=True)
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "scaling" / "half.yaml").write_text("_target_: my_ext.HalfScaling\nname: half\nfactor: 0.5\n")
    (root / "conf" / "model" / "tinynet.yaml").write_text(
        "_target_: my_ext.TinyNet\nimg_size: ${dataset.image_size}\nin_chans: ${dataset.channels}\nwidth: 8\n")
    return root


def user_env(extension: Path) -> dict[str, str]:
    """The environment of a user whose extension is importable (on PYTHONPATH)."""
    return {**os.environ, "PYTHONPATH": str(extension), "OMP_NUM_THREADS": "1"}


def run(cwd: Path, extension: Path, *args: str) -> subprocess.CompletedProcess:
    return run_warm(list(args), cwd=cwd, env=user_env(extension), timeout=300)


def test_a_strategy_and_a_backbone_from_outside_train_sweep_and_report(tmp_path, extension):
    searchpath = f"hydra.searchpath=[file://{extension / 'conf'}]"
    sweep = tmp_path / "sweep"
    # A sweep over a built-in strategy and the user's, on the user's backbone, 2 steps each; then
    # the report on it (both in one process: one interpreter's imports).
    proc, report_proc = run_in_one_process(
        [[str(ROOT / "train.py"), "-m", searchpath, "model=tinynet", "scaling=none,half", "experiment=smoke",
          "logger=csv", "train.max_steps=2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"],
         [str(ROOT / "scripts" / "report.py"), str(sweep)]], cwd=tmp_path, env=user_env(extension), timeout=600,
        warm=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (sweep / "1" / "config.yaml").read_text()
    assert "_target_: my_ext.HalfScaling" in config and "_target_: my_ext.TinyNet" in config
    # The user's strategy ran inside the user's backbone: it logged its coefficient 0.5 on both long
    # skips at every step, and the skips measured after it are half those before it (the built-in
    # `none` of run 0 logs 1 and leaves them alone).
    for run_dir, factor in (("1", 0.5), ("0", 1.0)):
        with open(sweep / run_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for lsc in ("lsc1", "lsc2"):
            logged = [float(r[f"scaling/{lsc}"]) for r in rows if r[f"scaling/{lsc}"]]
            assert logged == [factor, factor], (run_dir, lsc, logged)
            measured = [(float(r[f"skips/{lsc}_after"]), float(r[f"skips/{lsc}_before"]))
                        for r in rows if r[f"skips/{lsc}_after"]]
            assert measured and all(after == pytest.approx(factor * before, rel=1e-5) for after, before in measured)
    ckpt = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and any(k.startswith("net.up.") for k in ckpt["state_dict"])

    # The report names the new strategy (and its paper name from the class).
    assert report_proc.returncode == 0, report_proc.stderr[-3000:]
    report = (sweep / "report" / "report.md").read_text()
    assert "| half |" in report and "half (half-CS)" in report and "none (Org)" in report


def test_an_unknown_option_of_the_users_strategy_is_one_line(tmp_path, extension):
    searchpath = f"hydra.searchpath=[file://{extension / 'conf'}]"
    proc = run(tmp_path, extension, str(ROOT / "train.py"), searchpath, "scaling=half", "+scaling.fatcor=0.3",
               "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown option(s) fatcor for scaling 'half' (HalfScaling); its options: factor"]
    assert not (tmp_path / "run").exists()
