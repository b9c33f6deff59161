"""Tests for the DDPM/ADM UNet and its long-skip scaling (tiny preset; runs in seconds on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from scalelong.models import from_preset
from scalelong.models.unet import UNet
from scalelong.scaling import STRATEGIES, ChannelGate

B = 3  # a few samples: the gates' batch statistics and GroupNorm need more than one


def tiny(scaling="none", **kw) -> UNet:
    # zero_init=False: zero-initialised residual branches and head would hide most paths.
    torch.manual_seed(0)
    return from_preset("unet_tiny", scaling=scaling, dropout=0.0, zero_init=False, **kw)


def inputs(model: UNet, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_chans, model.img_size, model.img_size, generator=g)
    t = torch.rand(B, generator=g) * 999
    return x, t


def strategy_spec(name: str):
    return {"name": "constant", "kappa": 0.5} if name == "constant" else name


def count(params) -> int:
    return sum(p.numel() for p in params)


# --- construction ---------------------------------------------------------------------------


def test_ddpm_cifar10_parameter_count():
    with torch.device("meta"):
        model = from_preset("ddpm_cifar10")
    n = count(model.parameters())
    assert abs(n - 35.7e6) < 0.1e6, n
    assert model.num_skips == 12 == len(model.skip_shapes)
    assert model.skip_shapes[0] == (128, 32, 32) and model.skip_shapes[-1] == (256, 4, 4)


def test_presets_build_on_meta():
    for name in ("ddpm_cifar10", "ddpm_64", "unet_tiny"):
        with torch.device("meta"):
            model = from_preset(name)
        assert model.num_skips == len(model.skip_shapes) > 0
    with pytest.raises(ValueError, match="unknown model=nope; valid choices"):
        from_preset("nope", dataset="cifar10")


def test_merge_blocks_and_skip_sources_line_up():
    model = tiny()
    merges = model.decoder_merge_blocks()
    assert [b.skip_index for b in merges] == list(range(1, model.num_skips + 1))
    assert [b.skip_channels for b in merges] == [s[0] for s in model.skip_shapes]
    assert len(model.encoder_skip_modules()) == model.num_skips


# --- every strategy -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_forward_backward(name):
    model = tiny(strategy_spec(name))
    x, t = inputs(model)
    out = model(x, t)
    assert out.shape == x.shape
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    gate_params = list(model.skip_scaling.parameters())
    if name.startswith("learnable"):
        assert gate_params and all(p.grad.abs().sum() > 0 for p in gate_params)
    else:
        assert not gate_params


def test_kappa_one_equals_none():
    base = tiny("none")
    same = tiny({"name": "constant", "kappa": 1.0})
    same.load_state_dict(base.state_dict())
    x, t = inputs(base)
    with torch.no_grad():
        assert torch.equal(base(x, t), same(x, t))


# --- what the decoder actually receives ----------------------------------------------------------


def capture_merges(model: UNet):
    """Run a forward pass recording encoder features, merge-block inputs and decoder stage outputs.

    Returns (encoder features by LSC index, [(merge block, its input, previous decoder output)]).
    """
    enc: dict[int, torch.Tensor] = {}
    merges = []
    last_stage = {}
    handles = []
    for i, mod in enumerate(model.encoder_skip_modules(), start=1):
        handles.append(mod.register_forward_hook(lambda m, a, o, i=i: enc.__setitem__(i, o.detach().clone())))
    # Decoder stages in execution order: mid, every decoder block, every upsample.
    stages = [model.mid] + [m for lvl in model.up for m in [*lvl.blocks, lvl.upsample] if m is not None]
    for mod in stages:
        handles.append(mod.register_forward_hook(lambda m, a, o: last_stage.__setitem__("h", o.detach().clone())))
    for block in model.decoder_merge_blocks():
        handles.append(
            block.register_forward_pre_hook(
                lambda m, a: merges.append((m, a[0].detach().clone(), last_stage["h"]))
            )
        )
    x, t = inputs(model)
    with torch.no_grad():
        model(x, t)
    for h in handles:
        h.remove()
    return enc, merges


@pytest.mark.parametrize(
    "spec, coef",
    [
        ("sqrt2", lambda i: 2**-0.5),
        ({"name": "constant", "kappa": 0.5}, lambda i: 0.5 ** (i - 1)),
        ({"name": "constant", "kappa": 0.8}, lambda i: 0.8 ** (i - 1)),
    ],
)
def test_skip_half_is_scaled_encoder_feature_and_decoder_half_is_not(spec, coef):
    model = tiny(spec)
    enc, merges = capture_merges(model)
    assert len(merges) == model.num_skips == len(enc)
    seen = []
    for block, cat, prev in merges:
        i, c = block.skip_index, block.skip_channels
        seen.append(i)
        skip_half, dec_half = cat[:, cat.shape[1] - c :], cat[:, : cat.shape[1] - c]
        assert skip_half.shape[1:] == model.skip_shapes[i - 1]
        expected = enc[i] if coef(i) == 1.0 else enc[i] * coef(i)
        torch.testing.assert_close(skip_half, expected, rtol=0, atol=0)
        assert torch.equal(dec_half, prev), f"decoder path of LSC {i} was altered"
    # The decoder consumes the innermost LSC first.
    assert seen == list(range(model.num_skips, 0, -1))


# --- learnable gates ----------------------------------------------------------------------------


def gate_outputs(model: UNet):
    """The gate modules, and the gate each LSC applied in one forward pass (all computed in one
    batched pass when the encoder is done, not by calling each gate module)."""
    gates = [m for m in model.skip_scaling.modules() if isinstance(m, ChannelGate)]
    x, t = inputs(model)
    with torch.no_grad():
        model(x, t)
    last = model.skip_scaling._last_gate
    return gates, [last[i] for i in sorted(last)]


def test_learnable_shares_one_gate():
    model = tiny("learnable")
    gates, outs = gate_outputs(model)
    assert len(gates) == 1
    assert count(model.skip_scaling.parameters()) == count(ChannelGate().parameters())
    assert len(outs) == model.num_skips  # the one gate served every LSC
    check_gates(model, outs)


def test_learnable_nonshared_has_one_gate_per_skip():
    model = tiny("learnable_nonshared")
    gates, outs = gate_outputs(model)
    assert len(gates) == model.num_skips == len(model.skip_scaling.gates)
    assert count(model.skip_scaling.parameters()) == model.num_skips * count(ChannelGate().parameters())
    check_gates(model, outs)


def check_gates(model: UNet, outs):
    for g in outs:
        assert g.shape[0] == B and g.shape[2:] == (1, 1)
        assert ((g > 0) & (g < 1)).all()
        assert abs(g.mean().item() - 0.5) < 0.15
    coefs = model.skip_scaling.coefficients()
    assert len(coefs) == model.num_skips
    assert all(math.isfinite(c.mean) and math.isfinite(c.std) for c in coefs)


def test_learnable_coefficients_nan_before_forward():
    model = tiny("learnable")
    assert all(math.isnan(c.mean) for c in model.skip_scaling.coefficients())


# --- conditioning, checkpointing, errors --------------------------------------------------------


def test_class_conditional():
    model = tiny(num_classes=10)
    x, t = inputs(model)
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 1, 2]))
        b = model(x, t, torch.tensor([3, 4, 5]))
    assert a.shape == x.shape
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


def test_gradient_checkpointing_matches():
    plain = tiny("learnable")
    ckpt = tiny("learnable", use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs(plain)
    for m in (plain, ckpt):
        m(x, t).square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("scaling", ["none", "learnable"])
def test_channels_last_matches(scaling):
    """model.channels_last=true (used on CUDA): the same outputs and gradients in NHWC memory."""
    plain, nhwc = tiny(scaling), tiny(scaling).to(memory_format=torch.channels_last)
    x, t = inputs(plain)
    outs = []
    for m, xm in ((plain, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        out = m(xm, t)
        out.square().mean().backward()
        outs.append(out)
    # oneDNN sums in another order for NHWC: fp32 rounding, a few 1e-6 on outputs of order 1.
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    # Against the largest gradient: a conv bias before a GroupNorm has an exact gradient of 0,
    # which leaves only rounding noise that differs in relative terms.
    scale = max(p.grad.abs().max().item() for p in plain.parameters())
    for (n, p), q in zip(plain.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5 * scale, msg=n)


def test_zero_init_starts_at_zero():
    torch.manual_seed(0)
    model = from_preset("unet_tiny")
    x, t = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros_like(x))


def test_bad_strategy_name():
    with pytest.raises(ValueError, match="valid strategies") as info:
        from_preset("unet_tiny", scaling="sqrt3")
    for name in STRATEGIES:
        assert name in str(info.value)


@pytest.mark.parametrize("kappa", [0, 1.5, float("nan")])
def test_bad_kappa(kappa):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        from_preset("unet_tiny", scaling={"name": "constant", "kappa": kappa})


def test_bad_attention_resolution():
    with pytest.raises(ValueError, match="resolutions"):
        from_preset("unet_tiny", attn_resolutions=(7,))


def test_norm_groups_caps_the_groups_of_every_group_norm():
    """norm_groups bounds every GroupNorm (residual blocks, attention, middle, head); the default
    keeps DDPM's 32, which at 32 channels normalises each channel alone."""
    def groups(model):
        return {(m.num_channels, m.num_groups) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}

    assert groups(tiny()) == {(32, 32), (64, 32), (96, 32), (128, 32)}
    model = tiny(norm_groups=8)
    assert model.norm_groups == 8
    assert groups(model) == {(32, 8), (64, 8), (96, 8), (128, 8)}
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == \
        sum(isinstance(m, torch.nn.GroupNorm) for m in tiny().modules())
    x, t = inputs(model)
    assert model(x, t).shape == x.shape
    with pytest.raises(ValueError, match="norm_groups must be a positive int"):
        from_preset("unet_tiny", norm_groups=0)
