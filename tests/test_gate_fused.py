"""All channel gates in one pass (``prepare``, called by the UNet when its encoder is done) give
the values and gradients of the gates one by one, up to rounding."""

from __future__ import annotations

import pytest
import torch

from scalelong.models import from_preset
from scalelong.scaling import build_skip_scaling

# Skips of a UNet: widths and sizes differ, so the batched pass pads and masks.
MAPS = [(6, 5, 5), (12, 5, 5), (12, 3, 3), (12, 2, 2), (7, 1, 1)]
TOKENS = [(9, 6), (9, 10), (9, 6)]


def strategy(name, shapes, layout):
    torch.manual_seed(0)
    s = build_skip_scaling({"name": name, "gate": "channel"})
    s.setup(shapes, layout)
    for p in s.parameters():  # away from the initialisation, so every term of the gate matters
        p.data.add_(torch.randn_like(p) * 0.3)
    return s


def gated_step(s, skips, upstream, batched: bool, dtype=None):
    """Outputs, the skips' gradients and the gate parameters' gradients of one pass."""
    s.zero_grad(set_to_none=True)
    xs = [x.detach().clone().requires_grad_(True) for x in skips]
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        if batched:
            s.prepare(xs)
        outs = [s(x, i) for i, x in enumerate(xs, start=1)]
    assert not s._prepared  # every prepared gate was taken by its skip
    sum((o.float() * u).sum() for o, u in zip(outs, upstream)).backward()
    return [o.detach().float() for o in outs] + [x.grad.float() for x in xs] + [p.grad.clone() for p in s.parameters()]


def skips_for(shapes, batch=3, seed=1, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    skips = []
    for shape in shapes:
        # each channel its own scale and an offset: the statistics must keep their precision
        x = torch.randn(batch, *shape, generator=g) * (torch.rand(batch, shape[0], *(1,) * (len(shape) - 1),
                                                                  generator=g) * 2) + 2.0
        skips.append(x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x)
    skips[0][0, 1] = 0.7  # a constant channel: std = 0, no gradient through it (as torch.std_mean)
    return skips, [torch.randn(x.shape, generator=g) for x in skips]


@pytest.mark.parametrize("name", ["learnable", "learnable_nonshared"])
@pytest.mark.parametrize("layout, channels_last", [("channels", False), ("channels", True), ("tokens", False)])
def test_batched_gates_equal_the_gates_one_by_one(name, layout, channels_last):
    shapes = MAPS if layout == "channels" else TOKENS
    s = strategy(name, shapes, layout)
    skips, upstream = skips_for(shapes, channels_last=channels_last)
    one_by_one = gated_step(s, skips, upstream, batched=False)
    batched = gated_step(s, skips, upstream, batched=True)
    # fp32: outputs and skip gradients within 1e-5 relative; parameter gradients sum thousands
    # of terms, so they are compared relative to their largest entry.
    n_values = 2 * len(shapes)
    for k, (a, b) in enumerate(zip(batched, one_by_one)):
        atol = 1e-6 if k < n_values else 1e-5 * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", ["learnable", "learnable_nonshared"])
def test_batched_gates_under_bf16_autocast_are_within_bf16_rounding(name):
    """precision=bf16-mixed: the batched gates against the one-by-one ones, both in bf16."""
    s = strategy(name, MAPS, "channels")
    skips, upstream = skips_for(MAPS)
    skips = [x.bfloat16() for x in skips]
    one_by_one = gated_step(s, skips, upstream, batched=False, dtype=torch.bfloat16)
    batched = gated_step(s, skips, upstream, batched=True, dtype=torch.bfloat16)
    for a, b in zip(batched, one_by_one):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_a_skip_that_was_not_prepared_gets_its_own_gate():
    """The prepared gate belongs to the skip tensor it was computed from; another tensor at the
    same LSC (a hook or wrapper that replaced it) is gated from its own values."""
    s = strategy("learnable", MAPS, "channels")
    skips, _ = skips_for(MAPS)
    other = skips[2] * 3 - 1
    with torch.no_grad():
        s.prepare(skips)
        replaced = s(other, 3)
        torch.testing.assert_close(replaced, other * s.gate(other), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s(skips[1], 2), skips[1] * s.gate(skips[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["learnable", "learnable_nonshared"])
def test_the_unet_with_batched_gates_trains_as_with_gates_one_by_one(name, monkeypatch):
    """The UNet's forward and backward (prepare called after the encoder) against the same UNet
    whose strategy gates each skip on its own."""
    torch.manual_seed(0)
    net = from_preset("unet_tiny", scaling=name, dropout=0.0, zero_init=False)
    x, t = torch.randn(3, net.in_chans, net.img_size, net.img_size), torch.rand(3) * 999

    def step():
        net.zero_grad(set_to_none=True)
        out = net(x, t)
        out.square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in net.parameters()]

    batched = step()
    monkeypatch.setattr(type(net.skip_scaling), "prepare", lambda self, skips: None)
    one_by_one = step()
    for a, b in zip(batched, one_by_one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 + 1e-5 * b.abs().max().item())
