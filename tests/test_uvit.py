"""U-ViT: faithfulness to the official model, where the coefficient multiplies, and sizes."""

from pathlib import Path

import pytest
import torch

from scalelong.models import UViT, convert_official_uvit_state_dict, from_preset
from scalelong.scaling import STRATEGIES, TokenGate

FIXTURE = Path(__file__).parent / "fixtures" / "official_uvit.pt"
SPECS = {
    "none": "none",
    "sqrt2": "sqrt2",
    "constant": {"name": "constant", "kappa": 0.5},
    "learnable": "learnable",
    "learnable_nonshared": "learnable_nonshared",
    "mp_cat": "mp_cat",
    "learnable_scalar": {"name": "learnable_scalar", "init": "constant", "kappa": 0.5},
}


def tiny(scaling="none", **kw):
    torch.manual_seed(0)
    return from_preset("uvit_tiny", scaling=scaling, **kw)


def inputs(batch=3, chans=1, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, chans, size, size, generator=g), torch.rand(batch, generator=g) * 999


@pytest.fixture(scope="module")
def uvit_s2_learnable():
    torch.manual_seed(0)
    return from_preset("uvit_s2_32", scaling="learnable")


def test_uvit_s2_parameter_count(uvit_s2_learnable):
    gate = sum(p.numel() for p in uvit_s2_learnable.skip_scaling.parameters())
    trunk = sum(p.numel() for p in uvit_s2_learnable.parameters()) - gate
    assert gate == 8497
    assert abs(trunk / 1e6 - 44.26) < 0.01, trunk
    assert uvit_s2_learnable.num_tokens == 257 and uvit_s2_learnable.num_skips == 6


def test_uvit_s2_constant_reports_the_paper_coefficients():
    model = from_preset("uvit_s2_32", scaling={"name": "constant", "kappa": 0.5})
    assert [c.mean for c in model.skip_scaling.coefficients()] == [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]


def test_uvit_s2_nonshared_has_six_gates():
    model = from_preset("uvit_s2_32", scaling="learnable_nonshared")
    assert sum(p.numel() for p in model.skip_scaling.parameters()) == 6 * 8497


def test_uvit_s2_gates_start_near_half(uvit_s2_learnable):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = uvit_s2_learnable(x, torch.tensor([10.0, 700.0]))
    assert out.shape == x.shape
    coeffs = uvit_s2_learnable.skip_scaling.coefficients()
    assert len(coeffs) == 6
    for c in coeffs:
        assert 0 < c.mean < 1 and abs(c.mean - 0.5) < 0.1


@pytest.mark.parametrize("name", list(FIXTURE.exists() and torch.load(FIXTURE, weights_only=False)) or ["missing"])
def test_official_checkpoint_loads_strictly_and_matches(name):
    """State dicts saved by the official U-ViT / ScaleLong classes (scripts/make_official_uvit_fixture.py)."""
    case = torch.load(FIXTURE, weights_only=False)[name]
    config = dict(case["config"])
    if "clip_dim" in config:  # the official text-to-image class names these differently
        config["context_dim"] = config.pop("clip_dim")
        config["num_context_tokens"] = config.pop("num_clip_token")
    model = UViT(**config, scaling=case["scaling"]).eval()
    model.load_state_dict(convert_official_uvit_state_dict(case["state_dict"]), strict=True)
    with torch.no_grad():
        if "context" in case:
            out = model(case["x"], case["t"], context=case["context"])
        else:
            out = model(case["x"], case["t"], case["y"])
    torch.testing.assert_close(out, case["out"], rtol=1e-5, atol=1e-5)


def test_official_nonshared_gates_are_reordered_by_lsc():
    # Official se.0 serves the first decoder block, i.e. the innermost LSC (index N).
    sd = {"se.0.layer1.weight": torch.zeros(1), "se.5.layer1.weight": torch.ones(1), "pos_embed": torch.ones(1)}
    out = convert_official_uvit_state_dict(sd)
    assert torch.equal(out["skip_scaling.gates.5.layer1.weight"], torch.zeros(1))
    assert torch.equal(out["skip_scaling.gates.0.layer1.weight"], torch.ones(1))
    assert "pos_embed" in out


def test_kappa_one_equals_none_exactly():
    x, t = inputs()
    ref = tiny("none").eval()
    cs = tiny({"name": "constant", "kappa": 1.0}).eval()
    cs.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(ref(x, t), cs(x, t))


def _merge_inputs(model, x, t):
    """Run the model and return, per decoder block, (decoder half, skip half) of its concat, the
    encoder outputs, and the mid-block output."""
    merges, encoder, mid = [], [], []
    hooks = [blk.skip_linear.register_forward_hook(lambda m, a, o: merges.append(a[0].chunk(2, dim=-1)))
             for blk in model.out_blocks]
    hooks += [blk.register_forward_hook(lambda m, a, o: encoder.append(o)) for blk in model.in_blocks]
    hooks.append(model.mid_block.register_forward_hook(lambda m, a, o: mid.append(o)))
    decoder_out = []
    hooks += [blk.register_forward_hook(lambda m, a, o: decoder_out.append(o)) for blk in model.out_blocks]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return merges, encoder, mid[0], decoder_out


@pytest.mark.parametrize("spec, coef", [
    ("sqrt2", lambda i: 2**-0.5),
    ({"name": "constant", "kappa": 0.6}, lambda i: 0.6 ** (i - 1)),
])
def test_only_the_skip_is_scaled(spec, coef):
    model = tiny(spec).eval()
    x, t = inputs()
    merges, encoder, mid, decoder_out = _merge_inputs(model, x, t)
    n = model.num_skips
    for k, (dec_half, skip_half) in enumerate(merges):
        index = n - k  # the first decoder block merges the innermost LSC
        torch.testing.assert_close(skip_half, encoder[index - 1] * coef(index), rtol=0, atol=0)
        # The decoder path arrives untouched: exactly what the previous block produced.
        previous = mid if k == 0 else decoder_out[k - 1]
        assert torch.equal(dec_half, previous)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_trains(name):
    model = tiny(SPECS[name])
    x, t = inputs()
    out = model(x, t)
    assert out.shape == x.shape
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname
    gates = [n for n, _ in model.named_parameters() if n.startswith("skip_scaling.")]
    assert bool(gates) == name.startswith("learnable")


def test_tiny_learnable_uses_the_official_token_gate():
    model = tiny("learnable")
    assert isinstance(model.skip_scaling.gate, TokenGate)
    assert model.skip_scaling.gate.layer1.in_features == model.num_tokens == 17


def test_class_and_text_tokens():
    torch.manual_seed(0)
    cond = from_preset("uvit_tiny", num_classes=10, scaling="learnable")
    x, t = inputs(2)
    with torch.no_grad():
        a, b = cond(x, t, torch.tensor([0, 1])), cond(x, t, torch.tensor([2, 3]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert cond.num_tokens == 2 + 16
    text = UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=2,
                context_dim=24, num_context_tokens=5, scaling="learnable_nonshared")
    assert text.num_tokens == 1 + 5 + 16
    out = text(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), context=torch.randn(2, 5, 24))
    assert out.shape == (2, 4, 8, 8)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="valid strategies: none, sqrt2, constant, learnable, learnable_nonshared"):
        tiny("lernable")
    for kappa in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            tiny({"name": "constant", "kappa": kappa})
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        UViT(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown model=uvit_xl; valid choices: .*uvit_s2_32"):
        from_preset("uvit_xl", dataset="cifar10")
