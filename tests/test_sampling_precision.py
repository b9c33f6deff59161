"""Sampling and evaluation precision: bf16 autocast of the network on CUDA by default, fp32 on the
CPU, either on request; the sampler's own arithmetic in float32 (``scalelong.precision``).

No GPU here: the one place that asks whether a device is CUDA (``runs_on_cuda``) is mocked, and
bf16 autocast is checked on the CPU, where it runs the same way (slowly)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, load_script
from torch import nn

import scalelong.precision as precision_module
from scalelong.data.space import DataSpace
from scalelong.diffusion import get_sde
from scalelong.model import DiffusionModel
from scalelong.precision import autocast_settings, sampling_precision
from scalelong.utils.errors import ConfigError


class AutocastProbe(nn.Module):
    """A network that records, at every call, the autocast state and its input's dtype."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.seen: list[tuple[bool, torch.dtype, torch.dtype, torch.dtype]] = []

    def forward(self, x, t):
        out = self.conv(x) * 0.1
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), x.dtype, out.dtype))
        return out


def probe_model() -> DiffusionModel:
    torch.manual_seed(0)
    net = AutocastProbe()
    return DiffusionModel(net, net, get_sde("linear"), DataSpace("probe", (1, 8, 8)))


def test_default_is_bf16_on_cuda_and_fp32_on_the_cpu_either_on_request():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sampling_precision(cuda) == "bf16" and sampling_precision("cuda:1") == "bf16"
    assert sampling_precision(cpu) == "fp32"
    assert sampling_precision(cuda, "fp32") == "fp32" and sampling_precision(cpu, "bf16") == "bf16"
    # the autocast of the network call on CUDA, without entering it (no GPU here)
    assert autocast_settings(cuda, "bf16") == {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": True}
    assert autocast_settings(cuda, "fp32") == {"device_type": "cuda", "enabled": False}
    with pytest.raises(ConfigError, match=r"^--precision 'fp16x' is not a sampling precision; give fp32 or bf16"):
        sampling_precision(cuda, "fp16x")


def test_the_network_runs_under_bf16_autocast_where_cuda_would_and_the_sampler_in_fp32(monkeypatch):
    model = probe_model()
    monkeypatch.setattr(precision_module, "runs_on_cuda", lambda device: True)  # as on a GPU machine
    bf16 = model.generate(4, "euler_maruyama", 5, seed=3)  # precision not given: the CUDA default
    seen = model.net.seen
    assert len(seen) == 5
    # autocast on, in bf16, around the network; the sampler hands it float32 and gets bf16 back
    assert all(s == (True, torch.bfloat16, torch.float32, torch.bfloat16) for s in seen)
    seen.clear()
    # fp32 on request: autocast switched off inside the network call, even inside a bf16 region
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = model.generate(4, "euler_maruyama", 5, seed=3, precision="fp32")
    assert all(s[0] is False and s[2:] == (torch.float32, torch.float32) for s in seen)
    # the same noise: samples that bf16's rounding moves by a few of 255 levels here and there (another
    # draw would move most pixels by up to 255)
    assert bf16.dtype == fp32.dtype == torch.uint8
    diff = (bf16.int() - fp32.int()).abs()
    assert 0 < diff.max() <= 8 and diff.float().mean() < 0.5
    monkeypatch.undo()
    seen.clear()
    model.generate(2, "euler_ode", 2, seed=3)  # on the CPU the default is fp32
    assert [s[0] for s in seen] == [False, False]


def test_a_bad_precision_is_one_line_before_anything_loads(tmp_path, capsys):
    for script in ("sample", "evaluate"):
        with pytest.raises(SystemExit) as exit_info:
            load_script(script).main([str(tmp_path / "missing.ckpt"), "--device", "cpu", "--precision", "fp16x"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err == ("error: --precision 'fp16x' is not a sampling precision; give fp32 or bf16 (or leave it out: "
                       "bf16 on CUDA, fp32 elsewhere)\n"), script
    from scalelong.training.fid_callback import FIDCallback

    with pytest.raises(ConfigError, match=r"^callbacks.fid.precision 'half' is not a sampling precision"):
        FIDCallback(precision="half")


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory, ref_path):
    """Two smoke steps with the FID callback in bf16 (a linear map stands in for Inception)."""
    from scalelong.cli.train import train

    run = tmp_path_factory.mktemp("precision") / "run"
    # The linear schedule: a 2-step network's samples on the digits' cosine one saturate (its first
    # step divides by alpha 0.0085), which amplifies bf16's rounding past the bound checked below.
    cfg = compose(["experiment=smoke", "logger=none", "train.max_steps=2", "diffusion.schedule=linear"], run)
    cfg["callbacks"] = {"fid": {"_target_": "scalelong.training.fid_callback.FIDCallback", "every_n_steps": 2,
                                "num_samples": 4, "sampler": "euler_ode", "steps": 2, "ref": str(ref_path),
                                "chunk_size": 4, "kid_max": 4, "verbose": False, "precision": "bf16",
                                "feature_extractor": {"_target_": "fid_helpers.LinearFeatures"}}}
    return train(cfg), run


def test_the_fid_callback_samples_in_the_precision_its_config_names(fid_run):
    _, run = fid_run
    (entry,) = json.loads((run / "fid_history.json").read_text())
    assert entry["step"] == 2 and entry["precision"] == "bf16"


def test_sample_script_uses_bf16_where_cuda_and_fp32_on_request(fid_run, tmp_path, monkeypatch, capsys):
    import numpy as np

    result, _ = fid_run
    monkeypatch.setattr(precision_module, "runs_on_cuda", lambda device: True)
    script = load_script("sample")
    samples = {}
    for requested in (None, "fp32"):
        out = tmp_path / f"{requested}"
        argv = [str(result["checkpoint"]), "--num", "4", "--steps", "3", "--device", "cpu", "--out", str(out)]
        assert script.main(argv + (["--precision", requested] if requested else [])) == 0
        samples[requested or "default"] = np.load(out.with_suffix(".npz"))["samples"].astype(int)
        assert f"network in {requested or 'bf16'}" in capsys.readouterr().out
    # the same seeds: the two precisions draw the same samples, up to bf16's rounding
    assert np.abs(samples["default"] - samples["fp32"]).max() <= 8


def test_tf32_is_on_while_sampling_on_cuda_and_put_back_after(monkeypatch):
    from scalelong.precision import tf32_on_cuda

    before = torch.get_float32_matmul_precision()
    with tf32_on_cuda("cpu"):  # nothing changes off CUDA
        assert torch.get_float32_matmul_precision() == before
    monkeypatch.setattr(precision_module, "runs_on_cuda", lambda device: True)
    torch.set_float32_matmul_precision("highest")  # an fp32 training run's own setting
    try:
        with tf32_on_cuda("cuda"):
            assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
