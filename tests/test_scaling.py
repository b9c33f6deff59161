"""The strategy module on its own: factory, errors, coefficients, gates."""

import math

import pytest
import torch

from scalelong.scaling import (
    STRATEGIES,
    ChannelGate,
    ConstantScaling,
    LearnableNonSharedScaling,
    LearnableScaling,
    ScalingConfigError,
    TokenGate,
    _MeanStd,
    build_skip_scaling,
)

TOKENS = [(257, 512)] * 6


def built(spec, shapes=TOKENS, layout="tokens"):
    s = build_skip_scaling(spec)
    s.setup(shapes, layout)
    return s


def test_the_five_strategies_are_registered_first_then_the_literature_ones():
    # Registration order is report order: the paper's five first, then docs/strategies.md's.
    assert list(STRATEGIES)[:5] == ["none", "sqrt2", "constant", "learnable", "learnable_nonshared"]
    assert list(STRATEGIES)[5:] == ["mp_cat", "learnable_scalar"]


def test_constant_coefficients_outermost_first():
    s = built({"name": "constant", "kappa": 0.5})
    assert [c.mean for c in s.coefficients()] == [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert all(c.std == 0 for c in s.coefficients())


def test_none_and_sqrt2_coefficients():
    assert [c.mean for c in built("none").coefficients()] == [1.0] * 6
    assert [c.mean for c in built("sqrt2").coefficients()] == [2**-0.5] * 6


def test_constant_multiplies_the_skip_by_its_coefficient():
    s = built({"name": "constant", "kappa": 0.8})
    skip = torch.randn(2, 257, 512)
    for i in range(1, 7):
        torch.testing.assert_close(s(skip, i), skip * 0.8 ** (i - 1), rtol=0, atol=0)


def test_kappa_one_returns_the_skip_unchanged():
    skip = torch.randn(2, 257, 512)
    s = built({"name": "constant", "kappa": 1.0})
    assert all(torch.equal(s(skip, i), skip) for i in range(1, 7))


@pytest.mark.parametrize("kappa", [0, 0.0, -0.3, 1.5, float("nan"), float("inf"), "abc"])
def test_bad_kappa_is_rejected_with_the_valid_range(kappa):
    with pytest.raises(ScalingConfigError, match=r"kappa must .*\(0, 1\]"):
        build_skip_scaling({"name": "constant", "kappa": kappa})


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ScalingConfigError) as err:
        build_skip_scaling("lernable")
    msg = str(err.value)
    assert "'lernable'" in msg
    for name in STRATEGIES:
        assert name in msg


def test_unknown_option_is_rejected():
    with pytest.raises(ScalingConfigError, match="kapa"):
        build_skip_scaling({"name": "constant", "kapa": 0.5})


def test_shared_token_gate_matches_the_official_size():
    s = built("learnable")
    assert isinstance(s.gate, TokenGate)
    # Linear(257 -> 16) + Linear(16 -> 257), biases included.
    assert sum(p.numel() for p in s.parameters()) == 8497
    ns = built("learnable_nonshared")
    assert sum(p.numel() for p in ns.parameters()) == 6 * 8497


def test_gates_lie_in_unit_interval_and_start_near_half():
    torch.manual_seed(0)
    s = built("learnable")
    skip = torch.randn(4, 257, 512)
    gate = s.gate(skip)
    assert gate.shape == (4, 257, 1)
    assert 0 < gate.min() and gate.max() < 1
    assert abs(gate.mean().item() - 0.5) < 0.1
    for i in range(1, 7):
        s(skip, i)
    coeffs = s.coefficients()
    assert len(coeffs) == 6 and all(abs(c.mean - 0.5) < 0.1 and c.std > 0 for c in coeffs)


def test_learnable_coefficients_are_nan_before_the_first_forward():
    assert all(math.isnan(c.mean) for c in built("learnable").coefficients())


def test_nonshared_gate_i_serves_lsc_i():
    torch.manual_seed(0)
    s = built("learnable_nonshared")
    skip = torch.randn(2, 257, 512)
    for i in range(1, 7):
        torch.testing.assert_close(s(skip, i), skip * s.gates[i - 1](skip))


def test_channel_gate_is_shape_independent():
    gate = ChannelGate()
    for shape in [(2, 32, 16, 16), (2, 64, 8, 8), (2, 17, 48)]:
        g = gate(torch.randn(shape))
        expected = (2, shape[1], 1, 1) if len(shape) == 4 else (2, 1, 48)
        assert g.shape == expected and 0 < g.min() and g.max() < 1


def test_one_shared_channel_gate_for_skips_of_different_shapes():
    shapes = [(32, 16, 16), (64, 8, 8), (64, 4, 4)]
    s = built("learnable", shapes, "channels")
    n_one = sum(p.numel() for p in ChannelGate().parameters())
    assert sum(p.numel() for p in s.parameters()) == n_one
    ns = built("learnable_nonshared", shapes, "channels")
    assert len(ns.gates) == 3 and sum(p.numel() for p in ns.parameters()) == 3 * n_one


def test_token_gate_on_feature_maps_is_a_clear_error():
    with pytest.raises(ScalingConfigError, match="gate=channel"):
        built({"name": "learnable", "gate": "token"}, [(32, 16, 16)], "channels")


def test_strategy_objects_pass_through_the_factory():
    s = ConstantScaling(kappa=0.7)
    assert build_skip_scaling(s) is s
    assert isinstance(build_skip_scaling({"name": "learnable"}), LearnableScaling)
    assert isinstance(build_skip_scaling({"name": "learnable_nonshared"}), LearnableNonSharedScaling)


def test_a_strategy_object_serves_one_backbone_only():
    s = built("none")
    with pytest.raises(ScalingConfigError, match="already set up"):
        s.setup(TOKENS, "tokens")


# --- the channel gate's fast statistics against a plain computation ---------------------------


def reference_channel_gate(gate: ChannelGate, skip: torch.Tensor) -> torch.Tensor:
    """The gate written plainly: torch.std_mean over positions, autograd for the backward."""
    flat = skip.transpose(1, 2) if skip.dim() == 3 else skip.flatten(2)
    std, mean = torch.std_mean(flat.float(), dim=-1, correction=0)
    descriptor = torch.stack([mean, std], dim=1).to(skip.dtype)
    g = torch.sigmoid(gate.mix2(torch.relu(gate.mix1(descriptor))))[:, 0]
    return g.unsqueeze(1) if skip.dim() == 3 else g[:, :, None, None]


def gated_and_grads(gate_fn, gate: ChannelGate, skip: torch.Tensor, upstream: torch.Tensor):
    gate.zero_grad(set_to_none=True)
    x = skip.detach().clone().requires_grad_(True)
    out = x * gate_fn(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in gate.parameters()]


def random_skip_shapes(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    maps = [(r(1, 5), r(1, 40), r(1, 12), r(1, 12)) for _ in range(n)]  # (B, C, H, W)
    tokens = [(r(1, 5), r(1, 70), r(1, 40)) for _ in range(n)]  # (B, L, D)
    return maps + tokens


@pytest.mark.parametrize("shape", random_skip_shapes(0) + [(8, 128, 32, 32), (2, 257, 512)])
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_channel_gate_equals_the_plain_computation(shape, offset):
    torch.manual_seed(sum(shape))
    gate = ChannelGate()
    # Channels with their own scale and an offset: the statistics must not lose precision to it.
    skip = torch.randn(shape) * torch.rand(shape[:2] + (1,) * (len(shape) - 2)) * 2 + offset
    upstream = torch.randn(shape)
    # Outputs and input gradients within 1e-6 / 1e-5; the gate's parameter gradients sum
    # B * C * positions terms, so they are compared relative to their largest entry.
    fast = gated_and_grads(gate, gate, skip, upstream)
    plain = gated_and_grads(lambda x: reference_channel_gate(gate, x), gate, skip, upstream)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("shape, dims", [((3, 5, 4, 6), (2, 3)), ((2, 7, 5), (1,)), ((4, 3, 1, 1), (2, 3))])
def test_fast_mean_std_is_std_mean_with_its_exact_gradient(shape, dims):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) + 2).requires_grad_(True)
    mean, std = _MeanStd.apply(x, dims)
    ref_std, ref_mean = torch.std_mean(x, dim=dims, correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, ref_std, rtol=1e-12, atol=1e-12)
    g_mean, g_std = torch.randn_like(mean), torch.randn_like(std)
    grad = torch.autograd.grad((mean * g_mean).sum() + (std * g_std).sum(), x)[0]
    ref = torch.autograd.grad((ref_mean * g_mean).sum() + (ref_std * g_std).sum(), x)[0]
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)
    if shape[-1] > 1:  # finite differences (a 1x1 map has std = 0, where std is not smooth)
        assert torch.autograd.gradcheck(lambda t: _MeanStd.apply(t, dims), (x,))


def test_channel_gate_on_constant_channels_and_channels_last_maps():
    torch.manual_seed(0)
    gate = ChannelGate()
    skip = torch.randn(3, 6, 5, 4)
    skip[0, 2] = 1.5  # std = 0: no gradient through the std, as torch.std_mean's backward
    skip[1] = 0.0
    upstream = torch.randn(skip.shape)
    plain = gated_and_grads(lambda x: reference_channel_gate(gate, x), gate, skip, upstream)
    for x in (skip, skip.contiguous(memory_format=torch.channels_last)):
        fast = gated_and_grads(gate, gate, x, upstream)
        assert torch.isfinite(fast[1]).all()
        for a, b in zip([fast[0], fast[1], *fast[2]], [plain[0], plain[1], *plain[2]]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["learnable", "learnable_nonshared"])
@pytest.mark.parametrize("layout", ["channels", "tokens"])
def test_coefficients_are_the_mean_and_spread_of_the_last_gate(spec, layout):
    torch.manual_seed(0)
    shapes = [(8, 6, 6), (16, 3, 3)] if layout == "channels" else [(20, 12), (20, 12)]
    s = built({"name": spec, "gate": "channel"}, shapes, layout)
    gates = []
    for i, shape in enumerate(shapes, start=1):
        skip = torch.randn(3, *shape)
        s(skip, i)
        gates.append(s._gate_for(i)(skip))
    for c, g in zip(s.coefficients(), gates):
        std, mean = torch.std_mean(g, correction=0)
        assert (c.mean, c.std) == pytest.approx((mean.item(), std.item()), rel=1e-6)


def test_token_gate_is_the_official_formula():
    torch.manual_seed(0)
    s = built("learnable", [(20, 12)] * 2)
    skip = torch.randn(3, 20, 12, requires_grad=True)
    out = s(skip, 2)
    g = s.gate
    expected = skip * torch.sigmoid(g.layer2(torch.relu(g.layer1(skip.mean(-1))))).unsqueeze(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert list(dict(s.named_parameters())) == ["gate.layer1.weight", "gate.layer1.bias",
                                                "gate.layer2.weight", "gate.layer2.bias"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_gate_on_half_precision_skips_keeps_fp32_statistics(dtype):
    torch.manual_seed(0)
    gate = ChannelGate().to(dtype)
    skip, upstream = (torch.randn(2, 12, 6, 6) + 1).to(dtype), torch.randn(2, 12, 6, 6).to(dtype)
    fast = gated_and_grads(gate, gate, skip, upstream)
    plain = gated_and_grads(lambda x: reference_channel_gate(gate, x), gate, skip, upstream)
    assert fast[0].dtype == fast[1].dtype == dtype
    for a, b in zip([fast[0], fast[1], *fast[2]], [plain[0], plain[1], *plain[2]]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


def test_channel_gate_under_bf16_autocast_matches_fp32():
    """precision=bf16-mixed: fp32 gate parameters, a bf16 skip from the autocast convolutions.
    The product and the skip's gradient come back in bf16, the parameters' gradients in fp32,
    all within bf16 rounding of the fp32 computation."""
    torch.manual_seed(0)
    gate = ChannelGate()
    skip, upstream = torch.randn(2, 12, 6, 6) + 1, torch.randn(2, 12, 6, 6)
    exact = gated_and_grads(gate, gate, skip, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gated_and_grads(gate, gate, skip.bfloat16(), upstream.bfloat16())
    assert mixed[0].dtype == mixed[1].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in mixed[2])
    for a, b in zip([mixed[0], mixed[1], *mixed[2]], [exact[0], exact[1], *exact[2]]):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_compiled_channel_gate_matches_the_eager_one():
    """model.compile=true traces the gate, hand-written statistics included, as one graph
    (fullgraph) and gives the same outputs and gradients as eager. Skips of several shapes, as
    in a UNet, so the recompilation makes the shapes dynamic. TorchDynamo and AOTAutograd (the
    backward's graph) without Inductor, whose C++ build of the kernels cost 20-34 CPU-seconds here
    on a fresh machine (GPUs get Inductor's Triton kernels instead, not testable on this CPU)."""
    torch.manual_seed(0)
    shapes = [(6, 5, 5), (12, 3, 3), (12, 2, 2)]
    s = built("learnable", shapes, "channels")
    skips = [torch.randn(2, *shape) + 1.0 for shape in shapes]
    upstream = [torch.randn(2, *shape) for shape in shapes]

    def step(strategy):
        xs = [skip.clone().requires_grad_(True) for skip in skips]
        outs = [strategy(x, i) for i, x in enumerate(xs, start=1)]
        sum((out * up).sum() for out, up in zip(outs, upstream)).backward()
        grads = [x.grad for x in xs] + [p.grad.clone() for p in s.parameters()]
        s.zero_grad(set_to_none=True)
        return [out.detach() for out in outs] + grads

    eager = step(s)
    compiled = step(torch.compile(s, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
