"""DDP's gradient buckets and the gradients agree in layout (no "Grad strides do not match bucket
view strides" copy and warning), and DDP in one process takes the step plain training takes."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import compose

from scalelong.build import build_network
from scalelong.cli.train import train
from scalelong.training.grad_layout import match_gradient_strides

# The quickstart's UNet at a third of its width: its middle attention block's 1x1 output
# projection gets a channels_last input, hence a gradient with other strides than its weight's.
SMALL = ["experiment=smoke", "logger=none", "train.batch_size=8", "train.max_steps=2", "model.base_channels=8",
         "model.dropout=0"]


@pytest.fixture
def two_threads():
    """The layout of that gradient depends on the thread count: on one thread (the suite's
    workers) the 1x1 convolution's backward returns the weight's own strides, on two it does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_gradients_arrive_with_their_parameters_strides(two_threads):
    cfg = compose(SMALL)
    net = build_network(cfg["model"], cfg["scaling"], cfg["dataset"])
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1.0, 500.0])
    net.zero_grad(set_to_none=True)
    net(x, t).square().mean().backward()
    other = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()}
    assert other == {"mid.attn.proj.weight"}
    assert match_gradient_strides(net) == 11  # the 1x1 convolutions and (C, 1)-shaped parameters
    before = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    net(x, t).square().mean().backward()
    assert all(p.grad.stride() == p.stride() for p in net.parameters() if p.grad is not None)
    assert all(torch.equal(p.grad, before[n]) for n, p in net.named_parameters() if p.grad is not None)


def test_one_process_under_ddp_steps_as_plain_training_without_the_stride_warning(tmp_path):
    plain = train(compose([*SMALL, "trainer=cpu"], tmp_path / "plain"))["module"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = train(compose([*SMALL, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"],
                            tmp_path / "ddp"))["module"]
    if torch.distributed.is_initialized():  # Lightning's gloo group of one: later tests run without it
        torch.distributed.destroy_process_group()
    assert not [w for w in caught if "Grad strides do not match" in str(w.message)]
    for (name, a), b in zip(plain.state_dict().items(), ddp.state_dict().values()):
        assert torch.equal(a, b), name  # a world of one averages over one: bit for bit
