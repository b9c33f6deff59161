"""Sampling-time skip scaling (Skip-Tuning style): the syntax, where the factor multiplies on both
backbones, factor 1 as the identity, and the sample/evaluate commands with a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose, load_script
from PIL import Image

from scalelong.build import build_network, build_schedule, build_space
from scalelong.model import DiffusionModel
from scalelong.models import from_preset
from scalelong.scaling import parse_skip_scale, scaled_skips
from scalelong.utils.errors import ConfigError


@pytest.mark.parametrize("text, n, factors", [
    ("0.9", 4, [0.9] * 4),
    ("1.0:0.7", 4, [1.0, 0.9, 0.8, 0.7]),
    ("1.0:0.7", 1, [1.0]),
    ("1, 0.95,0.9", 3, [1.0, 0.95, 0.9]),
])
def test_the_three_forms_give_a_factor_per_skip_outermost_first(text, n, factors):
    assert parse_skip_scale(text).factors(n) == pytest.approx(factors, abs=1e-12)


@pytest.mark.parametrize("text, match", [
    ("abc", "is not a skip scale; write one factor"),
    ("1:0.9:0.8", "is not a skip scale"),
    ("0", "positive finite"),
    ("1,-0.5", "positive finite"),
])
def test_bad_skip_scales_name_the_syntax(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_skip_scale(text)


def test_a_list_of_the_wrong_length_names_the_skip_count():
    with pytest.raises(ConfigError, match="lists 2 factors, but this network has 6 long skips; give 6"):
        parse_skip_scale("1,0.9").factors(6)


def _skip_halves(model, backbone):
    """Per LSC index: the skip half the decoder concatenates, after one forward pass."""
    halves = {}
    if backbone == "uvit":
        for k, blk in enumerate(model.out_blocks):
            index = model.num_skips - k
            blk.skip_linear.register_forward_hook(
                lambda m, a, o, i=index: halves.update({i: a[0].chunk(2, dim=-1)[1]}))
    else:
        for blk in model.decoder_merge_blocks():
            blk.register_forward_pre_hook(lambda m, a: halves.update({m.skip_index: a[0][:, -m.skip_channels:]}))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 1, 16, 16, generator=g), torch.rand(2, generator=g) * 999
    return halves, (x, t)


@pytest.mark.parametrize("backbone, preset, scaling", [
    ("uvit", "uvit_tiny", {"name": "constant", "kappa": 0.7}),
    ("unet", "unet_tiny", "learnable"),
])
def test_the_factor_reaches_every_skip_after_the_trained_strategy(backbone, preset, scaling):
    torch.manual_seed(0)
    model = from_preset(preset, scaling=scaling).eval()
    halves, (x, t) = _skip_halves(model, backbone)
    with torch.no_grad():
        model(x, t)
        plain = dict(halves)
        with scaled_skips(model, "1.0:0.5") as factors:
            model(x, t)
        scaled = dict(halves)
        model(x, t)  # the block restored the strategy
    n = model.num_skips
    assert factors == pytest.approx([1.0 - 0.5 * k / (n - 1) for k in range(n)])
    # A skip comes from the encoder, which the factors do not touch, and the trained strategy scales
    # it from the skip alone: so at every LSC the skip half is exactly the unscaled one times its own
    # factor (1 on the outermost, 0.5 on the innermost).
    for i in range(1, n + 1):
        torch.testing.assert_close(scaled[i], plain[i] * factors[i - 1], rtol=0, atol=0,
                                   msg=lambda text, i=i: f"LSC {i}: {text}")
    assert all(torch.equal(halves[i], plain[i]) for i in range(1, n + 1))
    assert "merge" not in vars(model.skip_scaling)


def tiny_model(model="unet", scaling="none") -> DiffusionModel:
    # No zero-initialised output layers: an untrained UNet would otherwise ignore its skips. The
    # linear schedule: on the digits' cosine one, whose first step divides by alpha 0.0085, nearly
    # every pixel of an untrained network's samples saturates, and what the skips do is not seen.
    cfg = compose([f"model={model}", f"scaling={scaling}", "diffusion.schedule=linear"]
                  + (["model.zero_init=false"] if model == "unet" else []))
    torch.manual_seed(0)
    net = build_network(cfg["model"], cfg["scaling"], cfg["dataset"])
    return DiffusionModel(net, net, build_schedule(cfg["diffusion"]), build_space(cfg["dataset"]), config=cfg)


@pytest.mark.parametrize("model", ["unet", "uvit"])
def test_factor_one_reproduces_the_unscaled_samples_bit_for_bit(model):
    diffusion = tiny_model(model, "constant")
    plain = diffusion.generate(4, "euler_ode", 3, seed=5)
    for one in (1, "1.0", "1.0:1.0", ",".join(["1"] * diffusion.net.num_skips)):
        assert torch.equal(diffusion.generate(4, "euler_ode", 3, seed=5, skip_scale=one), plain)
    other = diffusion.generate(4, "euler_ode", 3, seed=5, skip_scale="1.0:0.6")
    # An untrained network's samples are mostly saturated; the unsaturated pixels move.
    assert (other != plain).float().mean() > 0.02


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from scalelong.cli.train import train

    # zero_init=false: after 2 steps a zero-initialised head would still hide the skips.
    run = train(compose(["experiment=smoke", "logger=none", "train.max_steps=2", "model.zero_init=false"],
                        tmp_path_factory.mktemp("skip_scale") / "run"))
    return run["checkpoint"]


def test_sample_takes_a_skip_scale(checkpoint, tmp_path, capsys):
    script = load_script("sample")
    args = [str(checkpoint), "--num", "3", "--steps", "2", "--device", "cpu"]
    assert script.main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert script.main(args + ["--skip-scale", "1", "--out", str(tmp_path / "one")]) == 0
    assert script.main(args + ["--skip-scale", "1.0:0.5"]) == 0  # default name: ..._skip1p0-0p5
    plain = np.load(tmp_path / "plain.npz")["samples"]
    assert np.array_equal(np.load(tmp_path / "one.npz")["samples"], plain)
    scaled = np.load(checkpoint.parent.parent / "samples" / "euler_ode_2steps_3_skip1p0-0p5.npz")["samples"]
    assert scaled.shape == plain.shape and not np.array_equal(scaled, plain)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(args + ["--skip-scale", "0.9,0.8"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: skip scale 0.9,0.8 lists 2 factors, but this network "
                                                      "has 6 long skips")


@pytest.fixture
def linear_inception(monkeypatch):
    from fid_helpers import LinearFeatures

    from scalelong.metrics import inception

    def load(mode="clean", path=None, device="cpu", *args, **kwargs):
        load.calls += 1
        extractor = LinearFeatures(mode=mode)
        extractor.weights = SimpleNamespace(path=Path("linear.pt"), source="test", describe=lambda: "linear features")
        return extractor

    load.calls = 0
    monkeypatch.setattr(inception, "load_inception", load)
    return load


def test_evaluate_sweeps_skip_scales_into_one_table(checkpoint, tmp_path, linear_inception):
    from fid_helpers import LinearFeatures

    from scalelong.data import load_digits_images
    from scalelong.metrics.reference import compute_reference, save_reference

    ref = tmp_path / "ref.npz"
    save_reference(ref, compute_reference(load_digits_images(16).images[:32], LinearFeatures(), {"dataset": "digits"},
                                          kid_max=32))
    out = tmp_path / "sweep"
    common = [str(checkpoint), "--num", "6", "--steps", "2", "--sampler", "euler_ode", "--device", "cpu",
              "--chunk-size", "3", "--kid-max", "6", "--workers", "1", "--feature-batch", "6", "--ref", str(ref)]
    evaluate = load_script("evaluate")
    assert evaluate.main(common + ["--skip-scale", "1", "0.8", "--skip-scale", "1.0:0.5", "--out", str(out)]) == 0
    assert linear_inception.calls == 1  # one Inception (and one reference) for the whole sweep
    rows = json.loads((out / "skip_scale.json").read_text())
    assert [r["skip_scale"] for r in rows] == ["1", "0.8", "1.0:0.5"]
    assert rows[1]["skip_factors"] == [0.8] * 6 and rows[2]["skip_factors"][0] == 1.0
    table = (out / "skip_scale.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| skip scale")]
    assert len(body) == 3 and [line.split(" | ")[0] for line in body] == ["| 1", "| 0.8", "| 1.0:0.5"]
    for row, line in zip(rows, body):
        assert f"| {row['fid']:.3f} |" in line
    assert Image.open(out / "skip_scale.png").size[0] > 300
    # each value's usual files, in its own folder; factor 1 is the unscaled evaluation exactly
    assert evaluate.main(common + ["--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "fid.json").read_text())
    one = json.loads((out / "skip_1" / "fid.json").read_text())
    assert plain["skip_scale"] is None and one["skip_scale"] == "1" and one["fid"] == plain["fid"]
    assert np.array_equal(np.load(out / "skip_1" / "samples_rank000.npz")["samples"],
                          np.load(tmp_path / "plain" / "samples_rank000.npz")["samples"])
    assert rows[1]["fid"] != rows[0]["fid"]
    assert sorted(p.name for p in (out / "skip_0p8").iterdir()) == ["fid.json", "grid.png", "samples_rank000.npz"]


def test_evaluate_rejects_a_bad_skip_scale_before_sampling(checkpoint, tmp_path, capsys, linear_inception):
    evaluate = load_script("evaluate")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(checkpoint), "--num", "4", "--device", "cpu", "--skip-scale", "1", "x"])
    assert exit_info.value.code == 2
    assert "error: skip scale 'x' is not a skip scale" in capsys.readouterr().err
    assert linear_inception.calls == 0
