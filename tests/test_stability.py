"""Stability measurements: hooks report the tensors they claim, robustness, theory, logging."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose
from torch import nn

from scalelong.data import StepBatchSampler, build_dataset
from scalelong.models import UNet, UViT
from scalelong.cli.train import train
from scalelong.cli.train import build_module
from scalelong.training.stability import (
    ActivationNormRecorder,
    StabilityMonitor,
    block_grad_norms,
    named_blocks,
    perturbation_gain,
    scaled_direction,
    sum_kappa2_tail,
    theory_summary,
)


def tiny_uvit(scaling="none") -> UViT:
    return UViT(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=4, num_heads=2, scaling=scaling).eval()


def tiny_unet(scaling="none") -> UNet:
    # zero_init=False: zero residual branches would make several blocks identity maps.
    return UNet(img_size=8, in_chans=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0, scaling=scaling, zero_init=False).eval()


def by_hand(t: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norm written out: sqrt of the sum of squares over all but dim 0."""
    return (t.double() ** 2).sum(dim=tuple(range(1, t.dim()))).sqrt()


def recorded_and_raw(net: nn.Module, x: torch.Tensor, t: torch.Tensor):
    """Run net once with the recorder and with plain hooks that keep every block's output."""
    blocks = named_blocks(net)
    recorder = ActivationNormRecorder(blocks, net.skip_scaling)
    outputs, skips = {}, {}
    keep = [m.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o.detach().clone()))
            for n, m in blocks]
    keep.append(net.skip_scaling.register_forward_hook(
        lambda m, a, o: skips.__setitem__(int(a[1]), (a[0].detach().clone(), o.detach().clone()))))
    recorder.attach()
    with torch.no_grad():
        net(x, t)
    recorder.detach()
    for h in keep:
        h.remove()
    return recorder.stats, outputs, skips


@pytest.mark.parametrize("make", [tiny_uvit, tiny_unet], ids=["uvit", "unet"])
def test_block_and_skip_norms_are_those_of_the_hooked_tensors(make):
    torch.manual_seed(0)
    net = make({"name": "constant", "kappa": 0.5})
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([10.0, 200.0, 500.0, 800.0, 999.0])
    stats, outputs, skips = recorded_and_raw(net, x, t)
    n = net.num_skips
    names = [name for name, _ in named_blocks(net)]
    assert names == [f"in_{k:02d}" for k in range(n)] + ["mid"] + [f"out_{k:02d}" for k in range(n)]
    for name, out in outputs.items():
        norms = by_hand(out)
        assert stats[f"features/{name}"].item() == pytest.approx(norms.mean().item(), rel=1e-5)
        assert stats[f"features/{name}_std"].item() == pytest.approx(norms.std(correction=0).item(), rel=1e-4, abs=1e-6)
    for i in range(1, n + 1):
        before, after = stats[f"skips/lsc{i}_before"].item(), stats[f"skips/lsc{i}_after"].item()
        assert before == pytest.approx(by_hand(skips[i][0]).mean().item(), rel=1e-5)
        # CS: the skip of LSC i leaves the strategy kappa^(i-1) times as long.
        assert after == pytest.approx(0.5 ** (i - 1) * before, rel=1e-5)
        # in_{i-1} is the encoder block whose output is the skip of LSC i.
        assert before == pytest.approx(stats[f"features/in_{i - 1:02d}"].item(), rel=1e-6)
    # out_k consumes LSC N-k: the block's input skip is the one the strategy returned for N-k.
    assert set(skips) == set(range(1, n + 1))


def test_recorder_hooks_exist_only_while_attached():
    net = tiny_uvit()
    recorder = ActivationNormRecorder(named_blocks(net), net.skip_scaling)

    def hooked():
        return sum(len(m._forward_hooks) for m in net.modules())

    assert hooked() == 0
    recorder.attach()
    assert hooked() == 2 * 4 // 2 + 1 + 1  # 2 in, 1 mid, 2 out blocks, and the strategy
    recorder.detach()
    assert hooked() == 0
    with torch.no_grad():
        net(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    assert recorder.stats == {}  # nothing recorded while detached


def test_a_compiled_network_is_measured_on_every_measurement_step():
    # Compiled graphs ignore hooks registered after compilation; the recorder runs such a
    # network eagerly while attached, and leaves the compiled graph for the other steps.
    torch.manual_seed(0)
    net = tiny_uvit({"name": "constant", "kappa": 0.5})
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 500.0])
    expected, _, _ = recorded_and_raw(net, x, t)
    net.compile(backend="eager")
    compiled = net._compiled_call_impl
    recorder = ActivationNormRecorder(named_blocks(net), net.skip_scaling, root=net)
    for _ in range(3):
        with torch.no_grad():
            net(x, t)  # an ordinary (compiled) step
        recorder.attach()
        with torch.no_grad():
            net(x, t)
        recorder.detach()
        assert recorder.stats.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(recorder.stats[k], v)
        assert net._compiled_call_impl is compiled


def test_block_grad_norms_match_the_parameters_gradients():
    torch.manual_seed(0)
    net = tiny_uvit().train()
    net(torch.randn(3, 1, 8, 8), torch.tensor([1.0, 300.0, 900.0])).square().mean().backward()
    groups = [(name, list(m.parameters())) for name, m in named_blocks(net)] + [("total", list(net.parameters()))]
    norms = block_grad_norms(groups)
    for name, params in groups:
        expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))
        assert norms[name].item() == pytest.approx(expected, rel=1e-5)
    assert norms["total"] > norms["in_00"] > 0


def test_robustness_of_a_linear_map_is_its_gain_along_the_direction():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    a = u @ torch.diag(sigma) @ v.T

    def f(x):
        return x @ a.T

    x = torch.randn(4, 6, dtype=torch.float64)
    # d along the k-th right singular vector: ||A d|| / ||d|| = sigma_k exactly.
    for k in range(6):
        d = 1e-3 * v[:, k].expand(4, 6)
        torch.testing.assert_close(perturbation_gain(f, x, d), sigma[k].expand(4))
    # Any other direction: between the smallest and the largest singular value.
    d = scaled_direction(x, 1e-3, torch.Generator().manual_seed(1))
    gain = perturbation_gain(f, x, d)
    assert torch.all(gain <= 5.0 + 1e-6) and torch.all(gain >= 0.25 - 1e-6)
    torch.testing.assert_close(by_hand(d), 1e-3 * by_hand(x))


def test_theory_sums_of_kappa_squared():
    n = 6
    kappa = 0.5
    expected = [sum(kappa ** (2 * (j - 1)) for j in range(i, n + 1)) for i in range(1, n + 1)]
    closed = [kappa ** (2 * (i - 1)) * (1 - kappa ** (2 * (n - i + 1))) / (1 - kappa**2) for i in range(1, n + 1)]
    assert sum_kappa2_tail([kappa**i for i in range(n)]) == pytest.approx(expected)
    assert expected == pytest.approx(closed)
    assert sum_kappa2_tail([1.0] * n) == [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # Org: N - i + 1

    net = tiny_uvit({"name": "constant", "kappa": kappa})  # N = 2
    assert theory_summary(net.skip_scaling)["sum_kappa2"] == pytest.approx([1.25, 0.25])
    assert theory_summary(tiny_uvit("sqrt2").skip_scaling)["sum_kappa2"] == pytest.approx([1.0, 0.5])
    assert theory_summary(tiny_uvit({"name": "learnable_nonshared", "gate": "channel"}).skip_scaling) is None


def read_metrics_csv(run_dir) -> dict[str, dict[int, float]]:
    """key -> {step: value} from csv/version_0/metrics.csv."""
    out: dict[str, dict[int, float]] = {}
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for k, v in row.items():
                if v != "":
                    out.setdefault(k, {})[step] = float(v)
    return out


def first_block_norm_at_step0(cfg) -> float:
    """features/in_00 of step 0 by hand: the initial net on the step-0 training input."""
    torch.manual_seed(cfg["seed"])
    module = build_module(cfg)
    data = build_dataset(cfg["dataset"])
    batch = int(cfg["train"]["batch_size"])
    images = data.images[StepBatchSampler(len(data), batch, cfg["seed"]).global_indices(0)]
    draws = module._global_draws(0, batch)
    t = draws["t"]
    x_t = module.sde.marginal(images.float() / 127.5 - 1.0, t, draws["noise"])
    first = named_blocks(module.net)[0][1]
    out = {}
    handle = first.register_forward_hook(lambda m, a, o: out.__setitem__("x", o.detach()))
    with torch.no_grad():
        module.net.train()(x_t, t * 999)  # the in_00 blocks have no dropout before them
    handle.remove()
    return by_hand(out["x"]).mean().item()


@pytest.mark.parametrize("model, scaling", [("uvit", "constant"), ("unet", "learnable")])
def test_monitor_logs_every_measurement_to_metrics_csv(tmp_path, model, scaling):
    cfg = compose(["experiment=smoke", "logger=csv", "callbacks=stability", f"model={model}", f"scaling={scaling}",
                   "train.max_steps=3", "callbacks.stability.every_n_steps=1",
                   "callbacks.stability.robustness_every_n_steps=2", "callbacks.stability.loss_window=2",
                   "callbacks.stability.probe_size=4"], tmp_path)
    result = train(cfg)
    m = read_metrics_csv(tmp_path)
    net = result["module"].net
    n = net.num_skips
    blocks = [name for name, _ in named_blocks(net)]

    for name in blocks:
        assert set(m[f"features/{name}"]) == {0, 1, 2} and set(m[f"grads/{name}"]) == {0, 1, 2}
        assert f"features/{name}_std" in m
    for i in range(1, n + 1):
        assert set(m[f"skips/lsc{i}_before"]) == {0, 1, 2}
    for t in ("0.1", "0.5", "0.9"):
        assert set(m[f"robustness/t{t}"]) == {0, 2}
        # The UNet's zero-initialised output conv gives exactly 0 before the first update.
        assert all(0 <= v < math.inf for v in m[f"robustness/t{t}"].values()) and m[f"robustness/t{t}"][2] > 0
    assert set(m["loss/rolling_std"]) == {1, 2}  # once the 2-step window is full
    # grads/total is the norm the module logs as train/grad_norm (before clipping), same step.
    for step, v in m["train/grad_norm"].items():
        assert m["grads/total"][step] == pytest.approx(v, rel=1e-5)
    # The logged first-block norm is that of the real training input at step 0.
    assert m["features/in_00"][0] == pytest.approx(first_block_norm_at_step0(cfg), rel=1e-5)
    # Coefficients stay the module's (scaling/lsc*): logged once, not again by the monitor.
    assert not any(k.startswith("coefficients/") for k in m)
    # Ordinary steps pay nothing: no hook is left on the network.
    assert sum(len(mod._forward_hooks) for mod in net.modules()) == 0
    assert net.training
    # Measuring changes nothing: the same run without the monitor ends with the same weights.
    plain = train({**cfg, "callbacks": {}, "run_dir": str(tmp_path / "plain")})["module"]
    for (k, a), b in zip(result["module"].state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k

    theory = tmp_path / "stability_theory.json"
    if scaling == "constant":
        for i in range(1, n + 1):
            assert m[f"skips/lsc{i}_after"][1] == pytest.approx(0.5 ** (i - 1) * m[f"skips/lsc{i}_before"][1], rel=1e-5)
        expected = sum_kappa2_tail([0.5**i for i in range(n)])
        assert json.loads(theory.read_text())["sum_kappa2"] == pytest.approx(expected)
        assert [m[f"theory/sum_kappa2_lsc{i}"][0] for i in range(1, n + 1)] == pytest.approx(expected)
    else:
        assert not theory.exists() and not any(k.startswith("theory/") for k in m)


def test_probe_is_a_fixed_conditioned_training_batch(tmp_path):
    cfg = compose(["experiment=smoke", "model=uvit", "dataset.conditional=true"], tmp_path)
    module = build_module(cfg)
    data = build_dataset(cfg["dataset"])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(data=data))
    monitor = StabilityMonitor(probe_size=5, probe_seed=3, robustness_relative_size=1e-2)
    monitor._probe = probe = monitor._make_probe(trainer, module)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[:5]
    assert torch.equal(probe["cond"]["y"], data.labels[idx])  # labels kept: no condition dropout
    for t, (x_t, d, tt) in probe["points"].items():
        assert torch.all(tt == t) and x_t.shape == (5, *module.space.image_shape)
        torch.testing.assert_close(by_hand(d), 1e-2 * by_hand(x_t))
    again = monitor._make_probe(trainer, module)["points"][0.5][0]
    assert torch.equal(again, probe["points"][0.5][0])  # the same probe every time (fixed seed)
    gains = monitor.robustness(module.net.train())
    assert sorted(gains) == ["robustness/t0.1", "robustness/t0.5", "robustness/t0.9"]
    assert all(0 < float(v) < math.inf for v in gains.values()) and module.net.training


def test_monitor_rejects_times_outside_the_unit_interval():
    with pytest.raises(ValueError, match="robustness_times"):
        StabilityMonitor(robustness_times=(0.0, 0.5))
