"""A backbone as the samplers' ``eps_fn(x, t)``, with classifier-free guidance in one batched call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from scalelong.diffusion.schedules import TIME_INPUT_SCALE


def _concat_cond(cond: Mapping[str, Any], null_cond: Mapping[str, Any]) -> dict[str, Any]:
    """Stack the conditional and null keyword arguments along the batch (tensors) for one 2B call."""
    if set(cond) != set(null_cond):
        raise ValueError(
            f"cond_kwargs and null_cond_kwargs need the same keys, got {sorted(cond)} and {sorted(null_cond)}"
        )
    merged: dict[str, Any] = {}
    for key, value in cond.items():
        null_value = null_cond[key]
        if isinstance(value, Tensor) and isinstance(null_value, Tensor):
            merged[key] = torch.cat([value, null_value.to(device=value.device, dtype=value.dtype)], dim=0)
        elif value is None and null_value is None:
            merged[key] = None
        else:
            raise TypeError(f"cannot batch cond argument {key!r} of type {type(value).__name__}")
    return merged


class NoisePredictor(nn.Module):
    """Turns a backbone into ``eps_fn(x, t)`` for the samplers, with optional classifier-free guidance.

    ``eps_fn(x, t) = (1 + w) * net(x, s t, **cond) - w * net(x, s t, **null_cond)``, s the time input scale
    (U-ViT convention: ``guidance_scale`` w = 0 means no guidance). With w != 0 both branches run
    in one forward pass of batch 2B.

    Args:
        net: the backbone, ``net(x, timesteps, **cond) -> eps``.
        cond_kwargs: conditioning for the batch being sampled, e.g. ``{"y": labels (B,)}`` or
            ``{"context": text_emb (B, L, D)}``; tensors must have batch size B.
        null_cond_kwargs: the "no condition" counterpart with the same keys and batch size, e.g.
            ``{"y": torch.full((B,), num_classes)}`` for U-ViT's null class token, or the empty
            prompt's embedding repeated B times. Required when ``guidance_scale != 0``.
        guidance_scale: w >= 0.
        time_input_scale: the network sees t times this (``sde.time_input_scale``).
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        cond_kwargs: Mapping[str, Any] | None = None,
        null_cond_kwargs: Mapping[str, Any] | None = None,
        guidance_scale: float = 0.0,
        time_input_scale: float = TIME_INPUT_SCALE,
    ):
        super().__init__()
        self.net = net
        self.time_input_scale = float(time_input_scale)
        self.cond_kwargs = dict(cond_kwargs or {})
        self.null_cond_kwargs = None if null_cond_kwargs is None else dict(null_cond_kwargs)
        self.guidance_scale = float(guidance_scale)
        if self.guidance_scale != 0.0 and self.null_cond_kwargs is None:
            raise ValueError("classifier-free guidance (guidance_scale != 0) needs null_cond_kwargs")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, ...) noisy input; t: (B,) continuous time in [0, T]. Returns eps, shaped like x."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        # t keeps its own (float32) dtype: 999 * t in bf16 would lose the time resolution.
        timesteps = t * self.time_input_scale
        w = self.guidance_scale
        if w == 0.0:
            return self.net(x, timesteps, **self.cond_kwargs)
        assert self.null_cond_kwargs is not None
        both = _concat_cond(self.cond_kwargs, self.null_cond_kwargs)
        eps_both = self.net(torch.cat([x, x], dim=0), torch.cat([timesteps, timesteps], dim=0), **both)
        eps_cond, eps_uncond = eps_both.chunk(2, dim=0)
        return (1.0 + w) * eps_cond - w * eps_uncond
