"""Exponential moving average of a network's weights, kept as a second copy of the network."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scalelong.training.power_ema import power_decay


class EMA(nn.Module):
    """``ema = d * ema + (1 - d) * weights`` after every optimizer step, d = ``decay``.

    With ``gamma`` (a power-function EMA, EDM2), update n uses d = (1 - 1/n)^(gamma + 1) instead:
    the average of all steps so far weighted by step^gamma, whose length grows with the run
    (``scalelong.training.power_ema``; ``ema.sigma_rel`` or ``ema.gamma`` select it for a run).

    With ``warmup``, step n uses d = min(decay, (1 + n) / (10 + n)): the average forgets the
    random initial weights within the first hundreds of steps, which a run of a few thousand
    steps needs (at 0.995 without it, 37% of the average is still the initial weights at step
    200). The paper's runs (500k steps at 0.9999) use none.

    The copy is a submodule, so it travels in the owner's ``state_dict`` (and checkpoints) and
    moves with ``.to(device)``. Its parameters do not require gradients, so DDP ignores them.
    Buffers (none in our backbones, but a BatchNorm would have them) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, gamma: float | None = None):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.gamma = None if gamma is None else float(gamma)
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1 for the first)."""
        if self.gamma is not None:
            return power_decay(step, self.gamma)
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        decay = self.decay_at(step)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("EMA copy and model have different parameter lists")
        # lerp(ema, p, 1 - decay) = decay * ema + (1 - decay) * p, one fused kernel per group.
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def train(self, mode: bool = True) -> "EMA":
        # Always evaluate the average in eval mode (no dropout), whatever the owner's mode.
        super().train(mode)
        self.module.eval()
        return self
