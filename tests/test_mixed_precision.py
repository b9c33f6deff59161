"""fp16 mixed precision with a real loss scaler (torch's GradScaler on the CPU, fp16 autocast):
gradients are measured, clipped and guarded unscaled; overflow steps are the scaler's, not
divergence; a genuine non-finite loss is still caught."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import compose

from scalelong.cli.train import train
from scalelong.training.module import DiffusionModule

# The quickstart's UNet at a third of its width: fp16 autocast is emulated on the CPU (the full
# width costs 6x the CPU time), and the loss scaler sees the same overflows.
FP16 = ["experiment=smoke", "logger=none", "trainer.precision=16-mixed", "optim.fused=true",
        "train.batch_size=8", "trainer.log_every_n_steps=1", "model.base_channels=8"]


@pytest.fixture
def init_scale(monkeypatch):
    """``init_scale(s)``: the GradScaler Lightning builds for 16-mixed starts at scale ``s``."""
    real = torch.amp.GradScaler

    def set_scale(scale: float) -> None:
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(real, init_scale=scale))

    return set_scale


def _grad_norms(cfg, steps=1):
    """train/grad_norm of the first steps, as the module logs it, and the scale used."""
    seen = {}

    class Spy(DiffusionModule):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            seen[self.global_step] = (float(self.trainer.callback_metrics["train/grad_norm"]),
                                      float(self._loss_scaler().get_scale()))

    import scalelong.training.module as run_module

    original = run_module.DiffusionModule
    run_module.DiffusionModule = Spy
    try:
        train(cfg)
    finally:
        run_module.DiffusionModule = original
    return seen


def test_gradient_norm_does_not_depend_on_the_loss_scale(tmp_path, init_scale):
    """A fused AdamW steps with the scaled gradients itself; the norm (and clipping, and the
    stability monitor) must see them unscaled, whatever the scale."""
    norms = {}
    for scale in (2.0**4, 2.0**12):
        init_scale(scale)
        cfg = compose([*FP16, "train.max_steps=1", "model.dropout=0"], tmp_path / f"s{int(scale)}")
        step0 = _grad_norms(cfg)[0]
        assert step0[1] == scale  # no overflow at these scales: the scale was not touched yet
        norms[scale] = step0[0]
    assert 0 < norms[2.0**4] < 100
    assert norms[2.0**12] == pytest.approx(norms[2.0**4], rel=0.02)


def test_fp16_overflow_is_skipped_by_the_scaler_and_is_not_divergence(tmp_path, init_scale):
    # Far too large: fp16 gradients overflow until the scaler has halved it (measured: 14 steps in
    # a row, down to 2**16), then 6 steps train.
    init_scale(2.0**30)
    run = train(compose([*FP16, "train.max_steps=20", "train.max_nonfinite_in_row=5"], tmp_path))
    module = run["module"]
    assert module.nonfinite_total == 0 and run["metrics"]["train/nonfinite_skipped"] == 0
    assert module.overflow_total >= 10 and run["metrics"]["train/overflow_skipped"] == module.overflow_total
    scaler = run["trainer"].precision_plugin.scaler
    # Halved on every overflow the module counted, and never grown: GradScaler doubles the scale
    # only after growth_interval (2000) steps in a row without one.
    assert scaler.get_growth_interval() > 20
    assert scaler.get_scale() == 2.0**30 / 2**module.overflow_total
    assert all(torch.isfinite(p).all() for p in module.net.parameters())


def test_a_nonfinite_loss_under_the_loss_scaler_is_still_divergence(tmp_path, init_scale, monkeypatch):
    init_scale(2.0**8)
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if int(batch["step"]) in (2, 3) else loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    weights = {}

    def snapshot(self, *args, **kwargs):
        weights[self.global_step] = [p.detach().clone() for p in self.net.parameters()]

    monkeypatch.setattr(DiffusionModule, "on_train_batch_start", snapshot, raising=False)
    run = train(compose([*FP16, "train.max_steps=6"], tmp_path))
    assert run["module"].nonfinite_total == 2 and run["module"].overflow_total == 0
    for step, changed in [(2, False), (3, False), (4, True)]:
        same = all(torch.equal(a, b) for a, b in zip(weights[step], weights[step + 1]))
        assert same != changed, step


# The spy below replaces optimizer.step after the scheduler wrapped it, which torch notices.
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_clipping_acts_on_unscaled_gradients(tmp_path, init_scale):
    """With grad_clip, the gradients the (fused) optimizer steps with have that norm, unscaled."""
    init_scale(2.0**10)
    effective = []

    class Spy(DiffusionModule):
        def on_train_start(self):
            optimizer = self.trainer.optimizers[0]
            step = optimizer.step

            def spied_step(*args, **kwargs):
                # What the fused kernel applies: .grad, divided by grad_scale when it has one.
                grads = [p.grad for p in self.net.parameters() if p.grad is not None]
                scale = getattr(optimizer, "grad_scale", None)
                effective.append(float(torch.nn.utils.get_total_norm(grads)) / (1.0 if scale is None else float(scale)))
                return step(*args, **kwargs)

            optimizer.step = spied_step

    import scalelong.training.module as run_module

    original = run_module.DiffusionModule
    run_module.DiffusionModule = Spy
    try:
        run = train(compose([*FP16, "train.max_steps=3", "train.grad_clip=0.01"], tmp_path))
    finally:
        run_module.DiffusionModule = original
    assert run["module"].overflow_total == 0 and run["metrics"]["train/grad_norm"] > 0.01
    assert effective == pytest.approx([0.01] * 3, rel=1e-3)
