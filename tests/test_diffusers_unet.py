"""Any diffusers UNet2DModel as a backbone: the strategy acts on exactly its long skips, ``none`` is
diffusers' own network bit for bit, it trains and is measured through the real trainer, and its
checkpoints export to a folder diffusers loads with the same outputs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import compose, load_script

from scalelong.models import DiffusersUNet
from scalelong.scaling import STRATEGIES
from scalelong.utils.errors import ConfigError

pytest.importorskip("diffusers")

TINY = dict(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, norm_num_groups=4)


def tiny(scaling="none", **overrides) -> DiffusersUNet:
    torch.manual_seed(0)
    return DiffusersUNet(**{**TINY, **overrides}, scaling=scaling).eval()


def inputs(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = net.sample_size
    return torch.randn(batch, net.in_channels, size, size, generator=g), torch.rand(batch, generator=g) * 999


def test_the_long_skips_are_the_res_samples_outermost_first():
    net = tiny()
    # conv_in, one layer and a downsample at 8x8, one layer at 4x4
    assert net.skip_shapes == [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)] and net.num_skips == 4
    names = [n for n, _ in net.stability_blocks()]
    assert names == ["in_00", "in_01", "in_02", "in_03", "mid", "out_00", "out_01", "out_02", "out_03"]
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: outputs.update({n: o}))
             for n, m in net.stability_blocks() if n.startswith("in_")]
    with torch.no_grad():
        net(*inputs(net))
    for h in hooks:
        h.remove()
    assert [tuple(outputs[f"in_{k:02d}"].shape[1:]) for k in range(4)] == net.skip_shapes


def _merges(net):
    """Per up-block resnet (execution order): (LSC, decoder width, its input as diffusers made it,
    the input after the strategy), and the outputs of the modules producing each long skip."""
    raw, merged, produced = [], [], []
    hooks = [m.register_forward_hook(lambda m, a, o: produced.append(o)) for m in net.skip_producers()]
    for resnet in net.skip_consumers():
        hooks.append(resnet.register_forward_pre_hook(lambda m, a: raw.append(a[0]), prepend=True))
        hooks.append(resnet.register_forward_hook(
            lambda m, a, o: merged.append((m.scalelong_lsc, m.scalelong_decoder_channels, a[0]))))
    with torch.no_grad():
        net(*inputs(net))
    for h in hooks:
        h.remove()
    return [(i, split, r, m) for r, (i, split, m) in zip(raw, merged)], produced


@pytest.mark.parametrize("scaling, skip_factor, decoder_factor", [
    ({"name": "constant", "kappa": 0.5}, lambda i, na, nb: 0.5 ** (i - 1), lambda i, na, nb: 1.0),
    ("sqrt2", lambda i, na, nb: 2**-0.5, lambda i, na, nb: 1.0),
    ({"name": "mp_cat", "t": 0.3},
     lambda i, na, nb: 0.3 * ((na + nb) / (0.49 + 0.09)) ** 0.5 / nb**0.5,
     lambda i, na, nb: 0.7 * ((na + nb) / (0.49 + 0.09)) ** 0.5 / na**0.5),
])
def test_a_strategy_changes_exactly_the_long_skips(scaling, skip_factor, decoder_factor):
    net = tiny(scaling)
    merges, produced = _merges(net)
    assert [i for i, *_ in merges] == [4, 3, 2, 1]  # the first up resnet takes the deepest skip
    for index, split, raw, merged in merges:
        na, nb = split, raw.shape[1] - split
        # the skip half diffusers concatenated is the long skip itself ...
        assert torch.equal(raw[:, split:], produced[index - 1])
        # ... and the resnet gets it, and the decoder half, times the strategy's factors
        torch.testing.assert_close(merged[:, split:], raw[:, split:] * skip_factor(index, na, nb), rtol=1e-6, atol=0)
        torch.testing.assert_close(merged[:, :split], raw[:, :split] * decoder_factor(index, na, nb),
                                   rtol=1e-6, atol=0)


def test_none_is_diffusers_own_unet_bit_for_bit():
    from diffusers import UNet2DModel

    for overrides in ({}, {"num_class_embeds": 3}):
        net = tiny("none", **overrides)
        plain = UNet2DModel.from_config(net.unet.config)
        plain.load_state_dict(net.unet.state_dict())
        plain.eval()
        x, t = inputs(net)
        y = torch.tensor([0, 2]) if overrides else None
        with torch.no_grad():
            ours = net(x, t, y)
            theirs = plain(x, t, class_labels=y).sample
        assert torch.equal(ours, theirs)
        assert net.merges_are_identity()
    assert not tiny("sqrt2").merges_are_identity()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_forward_and_backward(name):
    net = tiny(name).train()
    x, t = inputs(net)
    net(x, t).square().mean().backward()
    own = list(net.skip_scaling.parameters())
    assert bool(own) == name.startswith("learnable") and all(p.grad is not None for p in own)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_the_ema_copy_merges_through_its_own_strategy():
    import copy

    net = tiny("learnable_scalar")
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.skip_scaling.scales[0].fill_(0.0)
    x, t = inputs(net)
    with torch.no_grad():
        assert not torch.equal(twin(x, t), net(x, t))  # the copy's hooks use the copy's scalars
        assert torch.equal(net(x, t), copy.deepcopy(net)(x, t))


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ConfigError, match=r"^model diffusers_unet needs diffusers: pip install -e '\.\[diffusers\]'$"):
        DiffusersUNet(**TINY)


@pytest.mark.parametrize("overrides, match", [
    ({"down_block_types": ("SkipDownBlock2D", "DownBlock2D")}, "SkipDownBlock2D not supported .* supported: DownBlock2D"),
    ({"sample_size": 7}, r"sample_size 7 is not divisible by 2\*\*1 \(2 levels\)"),
    ({"norm_num_groups": 3}, "model diffusers_unet: "),
])
def test_bad_configurations_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny(**overrides)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 steps of the real trainer with the tiny preset: one run with mp_cat on Stable Diffusion's
    discrete schedule (the network sees t * 1000), one with none on the linear one (t * 999)."""
    from scalelong.cli.train import train

    root = tmp_path_factory.mktemp("diffusers_runs")
    out = {}
    for scaling, schedule in (("mp_cat", "sd_discrete"), ("none", "linear")):
        cfg = compose(["experiment=smoke", "logger=csv", "model=diffusers_unet_tiny", f"scaling={scaling}",
                       f"diffusion.schedule={schedule}", "train.max_steps=2", "callbacks.stability.every_n_steps=1"],
                      root / scaling)
        out[scaling] = {"result": train(cfg), "dir": root / scaling, "config": cfg}
    return out


def test_two_training_steps_through_the_trainer_with_stability_measurements(runs):
    import csv

    run = runs["mp_cat"]
    assert run["config"]["model"]["_target_"] == "scalelong.models.DiffusersUNet"
    assert run["config"]["model"]["sample_size"] == run["config"]["dataset"]["image_size"] == 8
    assert run["config"]["model"]["in_channels"] == 1
    module = run["result"]["module"]
    assert isinstance(module.net, DiffusersUNet) and module.net.skip_scaling.name == "mp_cat"
    assert sum(p.numel() for p in module.net.parameters()) == 1_112_801  # the preset's comment
    rows = list(csv.DictReader(open(next(run["dir"].glob("csv/version_*/metrics.csv")))))
    logged = {k for r in rows for k, v in r.items() if v}
    n = module.net.num_skips
    assert {f"features/in_{k:02d}" for k in range(n)} | {"features/mid"} <= logged
    assert {f"skips/lsc{i}_after" for i in range(1, n + 1)} | {f"scaling/lsc{n}"} <= logged
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    assert run["result"]["checkpoint"].is_file()


def test_the_export_loads_in_diffusers_with_the_same_outputs(runs, tmp_path, capsys):
    from diffusers import UNet2DModel

    from scalelong.model import DiffusionModel

    checkpoint = runs["none"]["result"]["checkpoint"]
    script = load_script("export_diffusers")
    assert script.main([str(checkpoint), str(tmp_path / "export")]) == 0
    assert "EMA weights of" in capsys.readouterr().out
    loaded = UNet2DModel.from_pretrained(tmp_path / "export").eval()
    model = DiffusionModel.from_checkpoint(checkpoint)
    x, t = inputs(model.ema_net, batch=3)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model.ema_net(x, t))
        assert not torch.equal(loaded(x, t).sample, model.net(x, t))  # the EMA, not the raw weights
    record = json.loads((tmp_path / "export" / "scalelong_export.json").read_text())
    assert record["weights"] == "ema" and record["exact"] and record["strategy"] == "none"
    assert record["checkpoint_step"] == 2
    assert record["time_input_scale"] == 999.0 and record["timesteps"].startswith("t * 999, ")
    # --no-ema exports the raw weights
    assert script.main([str(checkpoint), str(tmp_path / "raw"), "--no-ema"]) == 0
    raw = UNet2DModel.from_pretrained(tmp_path / "raw").eval()
    with torch.no_grad():
        assert torch.equal(raw(x, t).sample, model.net(x, t))


def test_an_export_that_would_drop_the_strategy_is_refused_unless_asked(runs, tmp_path, capsys):
    checkpoint = runs["mp_cat"]["result"]["checkpoint"]
    script = load_script("export_diffusers")
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(checkpoint), str(tmp_path / "refused")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: this run's strategy 'mp_cat' changes the long skips") and "--drop-strategy" in err
    assert not (tmp_path / "refused").exists()
    assert script.main([str(checkpoint), str(tmp_path / "dropped"), "--drop-strategy"]) == 0
    assert "WITHOUT the run's strategy" in capsys.readouterr().out
    record = json.loads((tmp_path / "dropped" / "scalelong_export.json").read_text())
    assert record["strategy_dropped"] and not record["exact"]
    # The discrete schedule's network saw t * N in training: the record gives that, not the 999 of
    # the continuous schedules.
    assert record["diffusion"]["schedule"] == "sd_discrete"
    assert record["time_input_scale"] == 1000.0 and record["timesteps"].startswith("t * 1000, ")


def test_only_diffusers_runs_export(tmp_path, capsys):
    from scalelong.cli.train import train

    other = train(compose(["experiment=smoke", "logger=none", "train.max_steps=1"], tmp_path / "unet"))
    with pytest.raises(SystemExit):
        load_script("export_diffusers").main([str(other["checkpoint"])])
    assert "holds a UNet; only runs of a diffusers UNet" in capsys.readouterr().err
