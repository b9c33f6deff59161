"""Continuous-time VP-SDE noise schedules, the noise-prediction loss and the guided noise predictor.

Conventions (the official U-ViT ones):

* time ``t`` is continuous in ``[t_min, T]`` with ``T = sde.T`` (1 for the linear schedule, a little
  below 1 for the cosine one; ``t_min`` is 0 except for a discrete schedule); the network sees
  ``t * sde.time_input_scale`` as its ``timesteps`` argument (999, or N for a discrete schedule);
* the forward marginal is ``x_t = alpha_t * x_0 + sigma_t * eps`` with ``alpha_t**2 + sigma_t**2 = 1``;
* the network predicts ``eps`` (noise prediction);
* ``lambda_t = log(alpha_t / sigma_t)`` is the half log-SNR that DPM-Solver steps in.

All schedule methods take ``t`` as a float tensor of any shape (or a Python float) and return a
tensor of the same shape and dtype (a float ``t`` gives a float64 0-d tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = [
    "VPSchedule",
    "LinearVPSDE",
    "CosineVPSDE",
    "DiscreteVPSchedule",
    "SDES",
    "get_sde",
    "register_sde",
    "TIME_INPUT_SCALE",
    "TRAIN_T_EPS",
    "noise_prediction_loss",
    "NoisePredictor",
    "EpsFn",
]

# The network's ``timesteps`` input is the continuous time times 999 (official U-ViT ``ScoreModel.predict``).
TIME_INPUT_SCALE = 999.0

# Training draws t ~ U(TRAIN_T_EPS, T). The official code draws U[0, 1); at t = 0 the target is
# unpredictable (x_t = x_0), so we keep t a hair above 0; the samplers never go below 1e-4.
TRAIN_T_EPS = 1e-5

# eps_fn(x, t) -> eps: x (B, ...), t (B,) continuous time in [0, T]; returns eps shaped like x.
EpsFn = Callable[[Tensor, Tensor], Tensor]


def _as_tensor(t: Tensor | float) -> Tensor:
    """A float ``t`` becomes a float64 0-d tensor; a tensor passes through."""
    if isinstance(t, Tensor):
        return t
    return torch.tensor(float(t), dtype=torch.float64)


def _broadcast_to(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) to (B, 1, ..., 1) so it scales ``x`` (B, ...)."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


class VPSchedule:
    """A variance-preserving SDE ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw`` on ``t in [0, T]``.

    Subclasses define ``log_mean_coef`` (log alpha_t), ``beta`` and ``_t_from_log_mean_coef``
    (the inverse of ``log_mean_coef``); everything else follows from these.
    """

    name: str = "vp"
    T: float = 1.0  # the largest time the schedule is defined on; sampling starts here
    t_min: float = 0.0  # the smallest time it is defined on; samplers end at or above it
    time_input_scale: float = TIME_INPUT_SCALE  # the network sees t * time_input_scale

    # --- defined by each schedule ---------------------------------------------------------
    def log_mean_coef(self, t: Tensor | float) -> Tensor:
        """log alpha_t (<= 0), same shape as ``t``."""
        raise NotImplementedError

    def beta(self, t: Tensor | float) -> Tensor:
        """beta(t) = d(-2 log alpha_t)/dt, the SDE's squared diffusion coefficient (per unit t)."""
        raise NotImplementedError

    def _t_from_log_mean_coef(self, log_alpha: Tensor) -> Tensor:
        """The time t with log alpha_t = ``log_alpha`` (inverse of ``log_mean_coef``)."""
        raise NotImplementedError

    # --- derived -----------------------------------------------------------------------------
    def mean_coef(self, t: Tensor | float) -> Tensor:
        """alpha_t, the signal coefficient of x_t = alpha_t x_0 + sigma_t eps."""
        return self.log_mean_coef(t).exp()

    def std(self, t: Tensor | float) -> Tensor:
        """sigma_t = sqrt(1 - alpha_t^2), the noise coefficient (expm1 keeps it accurate near t = 0)."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_mean_coef(t)))

    def log_std(self, t: Tensor | float) -> Tensor:
        """log sigma_t."""
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_mean_coef(t)))

    def lambda_(self, t: Tensor | float) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t), the half log-SNR; strictly decreasing in t."""
        return self.log_mean_coef(t) - self.log_std(t)

    def inverse_lambda(self, lam: Tensor | float) -> Tensor:
        """The time t with lambda_t = ``lam``."""
        lam = _as_tensor(lam)
        # alpha^2 = 1 / (1 + exp(-2 lambda))  =>  log alpha = -log(1 + exp(-2 lambda)) / 2
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return self._t_from_log_mean_coef(log_alpha)

    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise; x0, noise (B, ...), t (B,)."""
        alpha = _broadcast_to(self.mean_coef(t), x0).to(x0.dtype)
        sigma = _broadcast_to(self.std(t), x0).to(x0.dtype)
        return alpha * x0 + sigma * noise

    def sample_t(
        self,
        batch: int,
        eps: float = TRAIN_T_EPS,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Training times t ~ U(eps, T), shape (batch,)."""
        u = torch.rand(batch, device=device, dtype=dtype, generator=generator)
        return eps + (self.T - eps) * u

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


SDES: dict[str, type[VPSchedule]] = {}


def register_sde(name: str) -> Callable[[type[VPSchedule]], type[VPSchedule]]:
    """Class decorator: make a schedule available to ``get_sde(name)``."""

    def decorate(cls: type[VPSchedule]) -> type[VPSchedule]:
        if name in SDES:
            raise ValueError(f"schedule {name!r} is already registered")
        cls.name = name
        SDES[name] = cls
        return cls

    return decorate


@register_sde("linear")
class LinearVPSDE(VPSchedule):
    """The linear schedule beta(t) = beta_min + t (beta_max - beta_min) on t in [0, 1]
    (Song et al. 2021; the official U-ViT ``VPSDE`` with beta_min = 0.1, beta_max = 20).

    log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0.0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.T = 1.0

    def log_mean_coef(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _t_from_log_mean_coef(self, log_alpha: Tensor) -> Tensor:
        # Solve a t^2 + b t = c (c = -log alpha >= 0) in the cancellation-free form 2c / (b + sqrt(b^2 + 4ac)).
        a = 0.25 * (self.beta_max - self.beta_min)
        b = 0.5 * self.beta_min
        c = -log_alpha
        return 2.0 * c / (b + torch.sqrt(b * b + 4.0 * a * c))

    def __repr__(self) -> str:
        return f"LinearVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"


@register_sde("cosine")
class CosineVPSDE(VPSchedule):
    """The cosine schedule of Nichol & Dhariwal (2021) in continuous time:

        alpha_t^2 = f(t) / f(0),  f(t) = cos^2((t + s) / (1 + s) * pi / 2),  s = 0.008,

    so log alpha_t = log cos(u_t) - log cos(u_0) with u_t = (t + s) / (1 + s) * pi / 2, and
    beta(t) = pi / (1 + s) * tan(u_t). alpha_t reaches 0 at t = 1, where beta blows up, so the
    time range stops at ``t_max`` (default 0.9946, DPM-Solver's choice for this schedule; there
    alpha ~ 8.5e-3, lambda ~ -4.77, beta ~ 368, comparable to the linear schedule's end at t = 1).
    Times above ``t_max`` are clamped to it, which keeps alpha positive and every quantity finite.
    """

    def __init__(self, s: float = 0.008, t_max: float = 0.9946):
        if not 0.0 < t_max < 1.0:
            raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
        self.s = float(s)
        self.t_max = float(t_max)
        self.T = self.t_max
        self._log_cos_u0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def _u(self, t: Tensor) -> Tensor:
        return (t.clamp(max=self.t_max) + self.s) / (1.0 + self.s) * (math.pi / 2.0)

    def log_mean_coef(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return torch.log(torch.cos(self._u(t))) - self._log_cos_u0

    def beta(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return math.pi / (1.0 + self.s) * torch.tan(self._u(t))

    def _t_from_log_mean_coef(self, log_alpha: Tensor) -> Tensor:
        u = torch.arccos(torch.exp(log_alpha + self._log_cos_u0))
        return u * (2.0 * (1.0 + self.s) / math.pi) - self.s

    def __repr__(self) -> str:
        return f"CosineVPSDE(s={self.s}, t_max={self.t_max})"


@register_sde("sd_discrete")
class DiscreteVPSchedule(VPSchedule):
    """Stable Diffusion's discrete schedule, as U-ViT's text-to-image code uses it (MS-COCO).

    betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2; step n (1..N) has
    alpha_bar_n = prod_{i <= n} (1 - beta_i). In continuous time t = n / N, log alpha_t is
    linear between those knots (and extended linearly past them), which is how DPM-Solver
    treats a discrete model. Training draws an integer n uniform in 1..N, and the network sees
    t * N = n, as in U-ViT's ``train_t2i_discrete.py``; sampling runs on [1/N, 1].
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000):
        if not 0.0 < beta_start <= beta_end < 1.0 or int(num_steps) < 2:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1 and num_steps >= 2, got {beta_start}, "
                             f"{beta_end}, {num_steps}")
        self.beta_start, self.beta_end, self.N = float(beta_start), float(beta_end), int(num_steps)
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.N, dtype=torch.float64) ** 2
        self.t_knots = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
        self.log_alpha_knots = 0.5 * torch.log1p(-betas).cumsum(0)  # strictly decreasing
        self.T = 1.0
        self.t_min = 1.0 / self.N
        self.time_input_scale = float(self.N)

    @staticmethod
    def _segment(x: Tensor, xp: Tensor) -> Tensor:
        """Index k of the knot segment [xp[k], xp[k+1]] that x falls in (the end ones beyond)."""
        return (torch.searchsorted(xp, x.contiguous()) - 1).clamp(0, len(xp) - 2)

    def _interp(self, x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
        xp, fp = xp.to(x.device, x.dtype), fp.to(x.device, x.dtype)
        k = self._segment(x, xp)
        slope = (fp[k + 1] - fp[k]) / (xp[k + 1] - xp[k])
        return fp[k] + (x - xp[k]) * slope

    def log_mean_coef(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self._interp(t, self.t_knots, self.log_alpha_knots)

    def beta(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        xp, fp = self.t_knots.to(t.device, t.dtype), self.log_alpha_knots.to(t.device, t.dtype)
        k = self._segment(t, xp)
        return -2.0 * (fp[k + 1] - fp[k]) / (xp[k + 1] - xp[k])

    def _t_from_log_mean_coef(self, log_alpha: Tensor) -> Tensor:
        # log alpha decreases in t: interpolate on the flipped (increasing) knots
        return self._interp(log_alpha, self.log_alpha_knots.flip(0), self.t_knots.flip(0))

    def sample_t(self, batch: int, eps: float = TRAIN_T_EPS, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> Tensor:
        """Training times t = n / N with n uniform in 1..N (``eps`` is not used), shape (batch,)."""
        n = torch.randint(1, self.N + 1, (batch,), device=device, generator=generator)
        return n.to(dtype) / self.N

    def __repr__(self) -> str:
        return f"DiscreteVPSchedule(beta_start={self.beta_start}, beta_end={self.beta_end}, num_steps={self.N})"


def get_sde(name: str = "linear", **kwargs: Any) -> VPSchedule:
    """Build a registered schedule: ``"linear"`` (U-ViT's VP-SDE), ``"cosine"`` or ``"sd_discrete"``."""
    if name not in SDES:
        raise KeyError(f"unknown schedule {name!r}; known: {sorted(SDES)}")
    return SDES[name](**kwargs)


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
    loss = per_sample.mean()
    if return_per_sample:
        return loss, per_sample, t
    return loss


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
