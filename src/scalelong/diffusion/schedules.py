"""Variance-preserving noise schedules: the continuous VP-SDE (linear, cosine) and Stable Diffusion's
discrete one. x_t = alpha_t x_0 + sigma_t eps; the network sees t * ``time_input_scale``; see
``docs/design.md`` for the conventions."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "VPSchedule",
    "LinearVPSDE",
    "CosineVPSDE",
    "DiscreteVPSchedule",
    "SNRShifted",
    "SDES",
    "get_sde",
    "register_sde",
    "TIME_INPUT_SCALE",
    "TRAIN_T_EPS",
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


class SNRShifted(VPSchedule):
    """``base`` with its signal-to-noise ratio alpha^2 / sigma^2 multiplied by ``shift`` at every t
    (the shifted schedules of Hoogeboom et al., 2023, "simple diffusion"); times, time range and
    the network's time input stay the base's.

    Why: a pixel of an image downsampled k times along each side averages k^2 pixels of the
    original, and with them k^2 independent noises, so at the same sigma the small image keeps
    less of its content. ``shift = k^2`` gives it the noise levels, in what can still be read
    from the image, of the large one: the quickstart draws its digits at their native 8x8 with the
    cosine schedule of the 16x16 ones at ``snr_shift: 4``.
    """

    def __init__(self, base: VPSchedule, shift: float):
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
            raise ValueError(f"snr_shift must be a positive number (1: the schedule as it is), got {shift!r}")
        self.base, self.shift = base, float(shift)
        self._log_shift = math.log(self.shift)
        self.name, self.T, self.t_min = base.name, base.T, base.t_min
        self.time_input_scale = base.time_input_scale

    @staticmethod
    def _moved(log_alpha: Tensor, log_shift: float) -> Tensor:
        """log alpha once log SNR = log alpha^2 - log(1 - alpha^2) moves by ``log_shift``."""
        log_snr = 2.0 * log_alpha - torch.log(-torch.expm1(2.0 * log_alpha)) + log_shift
        return 0.5 * F.logsigmoid(log_snr)  # alpha^2 = sigmoid(log SNR)

    def log_mean_coef(self, t: Tensor | float) -> Tensor:
        return self._moved(self.base.log_mean_coef(t), self._log_shift)

    def beta(self, t: Tensor | float) -> Tensor:
        # beta = -(d log SNR / dt) sigma^2 for any VP schedule, and the shift keeps d log SNR / dt;
        # where the base's sigma^2 is 0 (t = 0) the ratio's limit is 1 / shift.
        base_var = -torch.expm1(2.0 * self.base.log_mean_coef(t))
        var = -torch.expm1(2.0 * self.log_mean_coef(t))
        ratio = torch.where(base_var > 0, var / base_var.clamp(min=torch.finfo(base_var.dtype).tiny),
                            torch.full_like(var, 1.0 / self.shift))
        return self.base.beta(t) * ratio

    def _t_from_log_mean_coef(self, log_alpha: Tensor) -> Tensor:
        return self.base._t_from_log_mean_coef(self._moved(log_alpha, -self._log_shift))

    def sample_t(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.base.sample_t(*args, **kwargs)  # a discrete base draws its own steps

    def __repr__(self) -> str:
        return f"SNRShifted({self.base!r}, shift={self.shift:g})"


def get_sde(name: str = "linear", snr_shift: float = 1.0, **kwargs: Any) -> VPSchedule:
    """Build a registered schedule: ``"linear"`` (U-ViT's VP-SDE), ``"cosine"`` or ``"sd_discrete"``;
    ``snr_shift`` other than 1 multiplies its SNR (``SNRShifted``)."""
    if name not in SDES:
        raise KeyError(f"unknown schedule {name!r}; known: {sorted(SDES)}")
    base = SDES[name](**kwargs)
    return base if snr_shift == 1 and not isinstance(snr_shift, bool) else SNRShifted(base, snr_shift)
