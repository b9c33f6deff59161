"""model.compile: which runs compile (false, true, auto), what is compiled (each block, or the
network whole), and that Inductor's compiled network computes what the eager one does."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from scalelong.models import from_preset
from scalelong.models import compile as compile_mod
from scalelong.models.compile import (
    AUTO_MIN_EVALUATIONS,
    AUTO_MIN_STEPS,
    compile_for_sampling,
    compile_network,
    compile_options,
    compiled_blocks,
    training_compile,
)
from scalelong.training.stability import eager
from scalelong.utils.errors import ConfigError


def tiny_unet(**kw):
    # zero_init off: a zero-initialised head would make every output 0 and hide any difference
    torch.manual_seed(0)
    return from_preset("unet_tiny", scaling="learnable", zero_init=False, dropout=0.0, **kw)


def compiled_modules(net):
    return [name for name, m in net.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


# --- which runs compile ------------------------------------------------------------------------


def test_the_quickstart_and_cpu_runs_stay_eager_by_default(compose_cfg):
    cfg = compose_cfg(["train.max_steps=1000000"])  # long, but on the CPU
    assert cfg["model"]["compile"] == "auto"
    assert training_compile(cfg) is None


@pytest.mark.parametrize("overrides, compiled", [
    (["trainer=gpu", f"train.max_steps={AUTO_MIN_STEPS}"], True),
    (["trainer=gpu", f"train.max_steps={AUTO_MIN_STEPS - 1}"], False),  # too short to repay the compile
    (["trainer=gpu", "train.max_steps=500000", "model.compile=false"], False),
    (["trainer=cpu", "train.max_steps=10", "model.compile=true"], True),  # asked for: compiled anywhere
])
def test_compile_auto_is_on_for_long_cuda_runs(compose_cfg, overrides, compiled):
    cfg = compose_cfg(["model=ddpm_cifar10", "dataset=cifar10", *overrides])
    options = training_compile(cfg)
    assert (options is not None) == compiled
    if compiled:
        assert options == {"mode": None, "scope": "blocks"}


def test_accelerator_auto_compiles_when_cuda_is_there(compose_cfg, monkeypatch):
    cfg = compose_cfg(["trainer=gpu", "train.max_steps=500000"])
    cfg["trainer"]["accelerator"] = "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_compile(cfg) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_compile(cfg) == {"mode": None, "scope": "blocks"}


@pytest.mark.parametrize("node, message", [
    ({"compile": "yes"}, "model.compile='yes' is not one of false, true, auto"),
    ({"compile": True, "compile_scope": "layers"}, "model.compile_scope='layers' is not one of blocks, whole"),
    ({"compile": True, "compile_mode": "fast"}, "model.compile_mode='fast' is not one of"),
])
def test_a_bad_compile_setting_is_a_clear_error(node, message):
    with pytest.raises(ConfigError, match=message):
        compile_options(node)


@pytest.mark.parametrize("device, num, steps, setting, compiled", [
    ("cuda", 50_000, 1_000, "auto", True),  # the protocol's FID-50k
    ("cuda", AUTO_MIN_EVALUATIONS // 100, 100, "auto", True),
    ("cuda", 64, 50, "auto", False),  # a grid
    ("cpu", 50_000, 1_000, "auto", False),
    ("cpu", 4, 2, True, True),
])
def test_sampling_compiles_the_checkpoints_networks_as_configured(monkeypatch, device, num, steps, setting, compiled):
    calls = []
    monkeypatch.setattr(compile_mod, "compile_network", lambda net, mode, scope: calls.append((net, mode, scope)))
    net, ema = object(), object()
    model = SimpleNamespace(net=net, ema_net=ema, device=torch.device(device),
                            config={"model": {"compile": setting, "compile_scope": "whole"}})
    compile_for_sampling(model, num, steps)
    assert calls == ([(ema, None, "whole"), (net, None, "whole")] if compiled else [])


# --- what is compiled --------------------------------------------------------------------------


def test_blocks_scope_compiles_each_block_and_keeps_the_names():
    net = tiny_unet()
    keys = list(net.state_dict())
    compile_network(net, scope="blocks")
    names = compiled_modules(net)
    # every encoder and decoder step, the down/upsampling and the middle block; not the stem
    # convolution (one torch layer), the embeddings, the gates or the network as a whole
    assert names == [name for name, m in net.named_modules() if m in compiled_blocks(net)]
    assert "mid" in names and any(n.startswith("down.") for n in names) and any(n.startswith("up.") for n in names)
    assert "" not in names and "stem" not in names and not any(n.startswith("skip_scaling") for n in names)
    assert list(net.state_dict()) == keys
    with eager(net):  # the stability monitor's hooks need the eager blocks
        assert compiled_modules(net) == []
    assert compiled_modules(net) == names


def test_whole_scope_compiles_the_network():
    net = tiny_unet()
    compile_network(net, scope="whole")
    assert compiled_modules(net) == [""]


# --- Inductor, really ---------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager(monkeypatch):
    """model.compile=true, as training runs it: each block through Inductor (C++ kernels on the
    CPU; Triton on a GPU), forward and backward, against the eager network in fp32: outputs and
    gradients within 1e-4 (kernels sum in another order), parameter names unchanged. A tiny
    UNet (one level, 8 channels) keeps Inductor's cold compile short."""
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    torch._dynamo.reset()
    eager_net = tiny_unet(base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], img_size=8,
                          in_chans=1)
    net = tiny_unet(base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], img_size=8,
                    in_chans=1)
    keys = list(net.state_dict())
    compile_network(net, scope="blocks")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0])

    def step(m):
        m.zero_grad(set_to_none=True)
        out = m(x, t)
        out.square().mean().backward()
        return [out.detach()] + [p.grad for p in m.parameters()]

    start = time.perf_counter()
    compiled = step(net)
    took = time.perf_counter() - start
    expected = step(eager_net)
    assert compiled_modules(net) and list(net.state_dict()) == keys
    assert expected[0].abs().max() > 0.1
    for a, b in zip(compiled, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    print(f"Inductor compile and first step: {took:.1f}s")  # shown with -s / -rA
