"""The strategies from other papers (docs/strategies.md): EDM2's mp_cat and a learnable scalar per
long skip. Their formulas, where they multiply on both backbones, their options and configs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose

from scalelong.build import build_strategy
from scalelong.models import from_preset
from scalelong.scaling import (LearnableScalarScaling, MagnitudePreservingConcat, ScalingConfigError,
                               build_skip_scaling)


def edm2_weights(na: int, nb: int, t: float) -> tuple[float, float]:
    """EDM2's mp_cat as written there: C = sqrt((Na + Nb) / ((1 - t)^2 + t^2))."""
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return c / math.sqrt(na) * (1 - t), c / math.sqrt(nb) * t


def inputs(chans=1, size=16, batch=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, chans, size, size, generator=g), torch.rand(batch, generator=g) * 999


@pytest.mark.parametrize("na, nb, t", [(64, 32, 0.5), (32, 64, 0.3), (128, 128, 0.7), (512, 512, 0.5)])
def test_mp_cat_weights_are_edm2s_formula(na, nb, t):
    wa, wb = MagnitudePreservingConcat(t=t).weights(na, nb)
    ref_a, ref_b = edm2_weights(na, nb, t)
    assert wa == pytest.approx(ref_a, rel=1e-12) and wb == pytest.approx(ref_b, rel=1e-12)
    # magnitude preserving: unit-variance halves give a unit-variance concatenation
    assert (na * wa**2 + nb * wb**2) / (na + nb) == pytest.approx(1.0, rel=1e-12)


def _unet_merges(model):
    """Per decoder block of the tiny UNet: (its LSC, the encoder output of that LSC, the input it
    got as cat([decoder half, skip half]), the output of the module that ran just before it)."""
    enc, merges, last = [], [], {}
    hooks = [m.register_forward_hook(lambda m, a, o: enc.append(o)) for m in model.encoder_skip_modules()]
    hooks.append(model.mid.register_forward_hook(lambda m, a, o: last.update(out=o)))
    for level in model.up:
        for block in level.blocks:
            hooks.append(block.register_forward_pre_hook(
                lambda m, a: merges.append((m.skip_index, m.skip_channels, a[0], last["out"]))))
            hooks.append(block.register_forward_hook(lambda m, a, o: last.update(out=o)))
        if level.upsample is not None:
            hooks.append(level.upsample.register_forward_hook(lambda m, a, o: last.update(out=o)))
    with torch.no_grad():
        model(*inputs())
    for h in hooks:
        h.remove()
    return enc, merges


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_mp_cat_weights_both_halves_of_every_unet_merge(t):
    torch.manual_seed(0)
    model = from_preset("unet_tiny", scaling={"name": "mp_cat", "t": t}, dropout=0.0, zero_init=False)
    enc, merges = _unet_merges(model)
    assert [i for i, *_ in merges] == list(range(model.num_skips, 0, -1))
    scaled = 0
    for index, skip_channels, cat, before in merges:
        na, nb = cat.shape[1] - skip_channels, skip_channels
        wa, wb = edm2_weights(na, nb, t)
        torch.testing.assert_close(cat[:, :na], before * wa, rtol=1e-6, atol=0)
        torch.testing.assert_close(cat[:, na:], enc[index - 1] * wb, rtol=1e-6, atol=0)
        scaled += not (wa == pytest.approx(1) and wb == pytest.approx(1))
    assert scaled >= 2  # unequal widths on this UNet: some merges are really reweighted
    # coefficients() reports the skip's factor wb, outermost first
    widths = {i: cat.shape[1] - c for i, c, cat, _ in merges}
    expected = [edm2_weights(widths[i], model.skip_shapes[i - 1][0], t)[1] for i in range(1, model.num_skips + 1)]
    assert [c.mean for c in model.skip_scaling.coefficients()] == pytest.approx(expected, rel=1e-12)
    assert [c.mean for c in model.skip_scaling.decoder_coefficients()] == pytest.approx(
        [edm2_weights(widths[i], model.skip_shapes[i - 1][0], t)[0] for i in range(1, model.num_skips + 1)])


def test_mp_cat_before_a_unet_merge_reports_nan_and_on_uvit_knows_its_widths():
    unet = from_preset("unet_tiny", scaling="mp_cat")
    assert all(math.isnan(c.mean) for c in unet.skip_scaling.coefficients())
    uvit = from_preset("uvit_tiny", scaling={"name": "mp_cat", "t": 0.25})
    wb = edm2_weights(uvit.embed_dim, uvit.embed_dim, 0.25)[1]
    assert [c.mean for c in uvit.skip_scaling.coefficients()] == pytest.approx([wb] * uvit.num_skips)


def test_mp_cat_at_equal_widths_and_half_balance_is_exactly_none_on_uvit():
    torch.manual_seed(0)
    base = from_preset("uvit_tiny", scaling="none")
    mp = from_preset("uvit_tiny", scaling="mp_cat")
    mp.load_state_dict(base.state_dict())
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(mp(x, t), base(x, t))
    # and with another balance the U-ViT output changes
    other = from_preset("uvit_tiny", scaling={"name": "mp_cat", "t": 0.3})
    other.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(x, t), base(x, t), atol=1e-4)


def test_the_stability_monitor_sees_mp_cats_skip_factor():
    """The monitor hooks the strategy's forward; mp_cat's merge goes through it for the skip half."""
    model = from_preset("unet_tiny", scaling={"name": "mp_cat", "t": 0.3})
    seen = {}
    model.skip_scaling.register_forward_hook(lambda m, a, o: seen.update({int(a[1]): (a[0], o)}))
    with torch.no_grad():
        model(*inputs())
    assert sorted(seen) == list(range(1, model.num_skips + 1))
    for i, c in enumerate(model.skip_scaling.coefficients(), start=1):
        before, after = seen[i]
        torch.testing.assert_close(after, before * c.mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("t", [0, 1, -0.5, 1.5, float("nan"), "half"])
def test_mp_cat_balance_outside_the_open_interval_is_one_line(t):
    with pytest.raises(ScalingConfigError, match=r"scaling.t must .*\(0, 1\)") as err:
        build_skip_scaling({"name": "mp_cat", "t": t})
    assert "\n" not in str(err.value)


def test_learnable_scalar_starts_at_one_or_at_the_constant_schedule():
    one = from_preset("unet_tiny", scaling="learnable_scalar")
    assert [c.mean for c in one.skip_scaling.coefficients()] == [1.0] * one.num_skips
    cs = from_preset("unet_tiny", scaling={"name": "learnable_scalar", "init": "constant", "kappa": 0.7})
    assert [c.mean for c in cs.skip_scaling.coefficients()] == pytest.approx([0.7**i for i in range(cs.num_skips)])
    # one parameter per long skip, nothing else
    assert [n for n, _ in cs.named_parameters() if n.startswith("skip_scaling.")] == \
        [f"skip_scaling.scales.{k}" for k in range(cs.num_skips)]


def test_learnable_scalar_multiplies_the_skip_and_learns():
    torch.manual_seed(0)
    model = from_preset("uvit_tiny", scaling={"name": "learnable_scalar", "init": "constant", "kappa": 0.5})
    strategy = model.skip_scaling
    skip = torch.randn(2, model.num_tokens, model.embed_dim)
    for i in range(1, model.num_skips + 1):
        torch.testing.assert_close(strategy(skip, i), skip * 0.5 ** (i - 1), rtol=0, atol=0)
    x, t = inputs()
    model(x, t).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in strategy.scales)
    with torch.no_grad():
        strategy.scales[2].fill_(0.25)
    assert strategy.coefficients()[2].mean == 0.25


def test_learnable_scalar_keeps_a_half_precision_skip_in_its_dtype():
    strategy = build_skip_scaling("learnable_scalar")
    strategy.setup([(4, 8)], "tokens")
    assert strategy(torch.ones(1, 4, 8, dtype=torch.bfloat16), 1).dtype == torch.bfloat16


@pytest.mark.parametrize("spec, match", [
    ({"name": "learnable_scalar", "init": "zero"}, "unknown scaling.init='zero'; valid: one, constant"),
    ({"name": "learnable_scalar", "init": "constant", "kappa": 2}, r"kappa must lie in \(0, 1\]"),
    ({"name": "mp_cat", "kappa": 0.5}, "unknown option.*kappa.*its options: t"),
])
def test_bad_options_are_one_line_errors(spec, match):
    with pytest.raises(ScalingConfigError, match=match):
        build_skip_scaling(spec)


@pytest.mark.parametrize("name, cls, options", [
    ("mp_cat", MagnitudePreservingConcat, {"t": 0.5}),
    ("learnable_scalar", LearnableScalarScaling, {"init": "one", "kappa": 0.5}),
])
def test_the_yaml_builds_the_class_with_its_defaults(name, cls, options):
    node = compose([f"scaling={name}"])["scaling"]
    assert node == {"_target_": f"scalelong.scaling.{cls.__name__}", "name": name, **options}
    strategy = build_strategy(node)
    assert type(strategy) is cls and strategy.name == name and strategy.paper_name
