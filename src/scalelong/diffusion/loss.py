"""The epsilon-prediction loss that training minimises (U-ViT's ``LSimple``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from scalelong.diffusion.schedules import TRAIN_T_EPS, VPSchedule


def noise_prediction_loss(
    net: Callable[..., Tensor],
    x0: Tensor,
    sde: VPSchedule,
    cond_kwargs: Mapping[str, Any] | None = None,
    *,
    t_eps: float = TRAIN_T_EPS,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    return_per_sample: bool = False,
    min_snr_gamma: float | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The simple epsilon-prediction loss (official U-ViT ``LSimple`` with ``pred='noise_pred'``).

    Draws t with ``sde.sample_t`` (U(t_eps, T), or n / N for a discrete schedule) and eps ~ N(0, I)
    per sample unless given, forms x_t = alpha_t x0 + sigma_t eps and calls
    ``net(x_t, t * sde.time_input_scale, **cond_kwargs)``. U-ViT takes the mean of squares per
    sample and then the batch mean, which equals the plain mean over all elements returned here.
    Training calls it with its own keyed draws (``t``, ``noise``).

    Args:
        net: the backbone, ``net(x, timesteps, **cond) -> eps_pred`` shaped like x.
        x0: clean data, (B, ...).
        sde: the noise schedule.
        cond_kwargs: extra keyword arguments for ``net`` (e.g. ``y`` labels, ``context``).
        t_eps: lower end of the training time range (continuous schedules).
        generator: optional generator for t and eps (must live on x0's device).
        t: the times (B,) to use instead of drawing them.
        noise: the noise (like x0) to use instead of drawing it.
        return_per_sample: also return the per-sample losses (B,) and the times t (B,).
        min_snr_gamma: None for the plain mean (the paper's); a number gamma weights each sample's
            loss by min(SNR, gamma) / SNR (min-SNR-gamma, Hang et al. 2023): the almost clean
            times, which the plain loss favours, count less. The per-sample losses returned are the
            unweighted ones.

    Returns:
        The scalar loss (0-d tensor, float32 or wider), or ``(loss, per_sample_loss, t)``.
    """
    batch = x0.shape[0]
    if t is None:
        # t stays float32 (float64 for float64 data) even for half-precision x0, to keep its resolution.
        t_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        t = sde.sample_t(batch, eps=t_eps, device=x0.device, dtype=t_dtype, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = sde.marginal(x0, t, noise)
    eps_pred = net(x_t, t * sde.time_input_scale, **dict(cond_kwargs or {}))
    # float32 at least: a bf16/fp16 network output is compared with the noise in full precision
    wide = torch.promote_types(eps_pred.dtype, torch.float32)
    per_sample = (eps_pred.to(wide) - noise.to(wide)).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is None:
        loss = per_sample.mean()
    else:
        loss = (per_sample * min_snr_weight(sde, t, min_snr_gamma).to(wide)).mean()
    if return_per_sample:
        return loss, per_sample, t
    return loss


def min_snr_weight(sde: VPSchedule, t: Tensor, gamma: float) -> Tensor:
    """min(SNR, gamma) / SNR at the times t, SNR = alpha_t^2 / sigma_t^2: 1 where the noise is
    strong (SNR <= gamma), gamma / SNR below that noise level. Taken in log space (log SNR is
    2 lambda_t), which stays finite at the smallest t."""
    return torch.exp(torch.clamp(math.log(gamma) - 2 * sde.lambda_(t), max=0.0))
