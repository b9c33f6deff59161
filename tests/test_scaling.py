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
    build_skip_scaling,
)

TOKENS = [(257, 512)] * 6


def built(spec, shapes=TOKENS, layout="tokens"):
    s = build_skip_scaling(spec)
    s.setup(shapes, layout)
    return s


def test_the_five_strategies_are_registered():
    assert list(STRATEGIES) == ["none", "sqrt2", "constant", "learnable", "learnable_nonshared"]


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
