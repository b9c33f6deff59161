"""Exponential moving average of a network's weights, kept as a second copy of the network."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    The copy is a submodule, so it travels in the owner's ``state_dict`` (and checkpoints) and
    moves with ``.to(device)``. Its parameters do not require gradients, so DDP ignores them.
    Buffers (none in our backbones, but a BatchNorm would have them) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("EMA copy and model have different parameter lists")
        # lerp(ema, p, 1 - decay) = decay * ema + (1 - decay) * p, one fused kernel per group.
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def train(self, mode: bool = True) -> "EMA":
        # Always evaluate the average in eval mode (no dropout), whatever the owner's mode.
        super().train(mode)
        self.module.eval()
        return self
