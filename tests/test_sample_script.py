"""scripts/sample.py: a grid PNG and an npz of uint8 N x H x W x C samples from a checkpoint."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import ROOT, compose
from PIL import Image

from scalelong.cli.train import train


def load_script():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_samples_from_a_checkpoint(tmp_path, capsys):
    cfg = compose(["experiment=smoke", "logger=none", "train.max_steps=2"], tmp_path / "run")
    size = cfg["dataset"]["image_size"]  # 8: the quickstart draws the digits at their native size
    run = train(cfg)
    script = load_script()
    assert script.main([str(run["checkpoint"]), "--num", "6", "--steps", "3", "--sampler", "dpm_solver",
                        "--device", "cpu", "--out", str(tmp_path / "out" / "s")]) == 0
    arr = np.load(tmp_path / "out" / "s.npz")["samples"]
    assert arr.shape == (6, size, size, 1) and size == 8 and arr.dtype == np.uint8
    assert Image.open(tmp_path / "out" / "s.png").mode == "L"
    assert "6 samples in" in capsys.readouterr().out
    # Default location: next to the run's other samples.
    script.main([str(run["checkpoint"]), "--num", "2", "--steps", "2", "--device", "cpu"])
    assert (tmp_path / "run" / "samples" / "euler_ode_2steps_2.npz").is_file()


def test_missing_or_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "nope.ckpt"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(SystemExit):
        script.main([str(bad), "--device", "cpu"])
    assert "truncated or not a checkpoint" in capsys.readouterr().err
