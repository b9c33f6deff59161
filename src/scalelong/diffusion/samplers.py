"""Samplers of epsilon-prediction VP models, all ``sampler(eps_fn, sde, x_T, steps, ...) -> x_0``:
Euler-Maruyama and Euler ODE (U-ViT's grids), DDPM's ancestral steps, DPM-Solver-fast,
DPM-Solver++(2M) and U-ViT's text-to-image DPM-Solver++. Grids and orders of each:
``docs/design.md``, "Samplers"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from .schedules import EpsFn, VPSchedule

__all__ = [
    "SAMPLERS",
    "register_sampler",
    "sample",
    "euler_maruyama",
    "euler_ode",
    "ancestral",
    "dpm_solver",
    "dpm_solver_pp",
    "dpm_solver_pp_fast",
    "dpm_solver_fast_orders",
    "logsnr_time_grid",
    "EULER_T_END",
]

# Last grid time before the final noiseless step to t = 0 (official U-ViT ``euler_maruyama`` eps).
EULER_T_END = 1e-3

Progress = bool | Callable[[int, int], None]


class Sampler(Protocol):
    def __call__(
        self,
        eps_fn: EpsFn,
        sde: VPSchedule,
        x_T: Tensor,
        steps: int,
        **kwargs: Any,
    ) -> Tensor: ...


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    """Decorator: make a sampler available to ``sample(..., sampler=name)``."""

    def decorate(fn: Sampler) -> Sampler:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn

    return decorate


# --- helpers ------------------------------------------------------------------------------------


class _Steps:
    """Iterates over step indices, reporting to tqdm (``progress=True``) or a callback(done, total)."""

    def __init__(self, total: int, progress: Progress, desc: str):
        self.total = total
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)

    def __iter__(self):
        try:
            for i in range(self.total):
                yield i
                if self.bar is not None:
                    self.bar.update(1)
                if self.callback is not None:
                    self.callback(i + 1, self.total)
        finally:
            if self.bar is not None:
                self.bar.close()


def _time_dtype(x: Tensor) -> torch.dtype:
    # Times go to the network in float32 (float64 only for float64 inputs), whatever x's precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Coefs:
    """Schedule values at scalar times, computed in float64 on the CPU and returned as Python floats."""

    def __init__(self, sde: VPSchedule):
        self.sde = sde

    def _f64(self, t: float) -> Tensor:
        return torch.tensor(t, dtype=torch.float64)

    def alpha(self, t: float) -> float:
        return float(self.sde.mean_coef(self._f64(t)))

    def sigma(self, t: float) -> float:
        return float(self.sde.std(self._f64(t)))

    def beta(self, t: float) -> float:
        return float(self.sde.beta(self._f64(t)))

    def lam(self, t: float) -> float:
        return float(self.sde.lambda_(self._f64(t)))

    def t_of_lam(self, lam: float) -> float:
        return float(self.sde.inverse_lambda(self._f64(lam)))


def _eval(eps_fn: EpsFn, x: Tensor, t: float) -> Tensor:
    """eps_fn at the same scalar time t for the whole batch."""
    t_vec = torch.full((x.shape[0],), t, dtype=_time_dtype(x), device=x.device)
    return eps_fn(x, t_vec).to(x.dtype)


def _check(sde: VPSchedule, steps: int, t_end: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_min = getattr(sde, "t_min", 0.0)
    if not (0.0 < t_end < sde.T and t_end >= t_min):
        raise ValueError(f"t_end must lie in [{t_min:g}, T={sde.T}) and above 0, got {t_end}")


def _dpm_default_t_end(steps: int) -> float:
    # DPM-Solver's advice: end at 1e-3 for <= 15 NFE, 1e-4 above (U-ViT samples 50 NFE to 1e-4).
    return 1e-4 if steps > 15 else 1e-3


def euler_time_grid(sde: VPSchedule, steps: int, t_end: float = EULER_T_END) -> list[float]:
    """The official U-ViT Euler grid: ``steps`` points uniform from T down to t_end, then the
    schedule's t_min (0 for continuous schedules): steps + 1 values."""
    grid = torch.linspace(sde.T, t_end, steps, dtype=torch.float64).tolist()
    return grid + [float(getattr(sde, "t_min", 0.0))]


def logsnr_time_grid(sde: VPSchedule, intervals: int, t_start: float, t_end: float) -> list[float]:
    """``intervals + 1`` times from t_start down to t_end, uniform in lambda_t = log(alpha_t / sigma_t)."""
    coefs = _Coefs(sde)
    lams = torch.linspace(coefs.lam(t_start), coefs.lam(t_end), intervals + 1, dtype=torch.float64)
    grid = sde.inverse_lambda(lams).tolist()
    grid[0], grid[-1] = t_start, t_end  # exact endpoints, free of round-trip error
    return grid


def dpm_solver_fast_orders(steps: int) -> list[int]:
    """Per-interval orders of DPM-Solver-fast for a budget of ``steps`` NFE (sum(orders) == steps).

    K = steps // 3 + 1 intervals: all order 3, except that the tail is [2, 1] (steps % 3 == 0),
    [1] (steps % 3 == 1) or [2] (steps % 3 == 2) -- the split of DPM-Solver's Sec. 3.4.
    """
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


# --- Euler samplers -----------------------------------------------------------------------------


def _euler(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int,
    t_end: float,
    generator: torch.Generator | None,
    progress: Progress,
    stochastic: bool,
) -> Tensor:
    _check(sde, steps, t_end)
    coefs = _Coefs(sde)
    grid = euler_time_grid(sde, steps, t_end)
    x = x_T
    for i in _Steps(steps, progress, "euler_maruyama" if stochastic else "euler_ode"):
        t, s = grid[i], grid[i + 1]
        dt = t - s  # > 0: we integrate backwards in time
        beta, sigma = coefs.beta(t), coefs.sigma(t)
        eps = _eval(eps_fn, x, t)
        # Reverse drift f - g^2 score with f = -beta x / 2, g^2 = beta, score = -eps / sigma; the
        # probability-flow ODE halves the score term and drops the noise.
        score_weight = beta / sigma if stochastic else 0.5 * beta / sigma
        x = x + (0.5 * beta * dt) * x - (score_weight * dt) * eps
        if stochastic and i < steps - 1:  # the last step (to t_min) returns the mean, as U-ViT does
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            x = x + math.sqrt(beta * dt) * noise
    return x


@register_sampler("euler_maruyama")
@torch.no_grad()
def euler_maruyama(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int = 1000,
    *,
    t_end: float = EULER_T_END,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> Tensor:
    """Euler-Maruyama on the reverse SDE (official U-ViT protocol: 1000 steps for FID-50k).

    Args:
        eps_fn: ``eps_fn(x (B, ...), t (B,)) -> eps`` with t continuous in [0, T].
        sde: the noise schedule.
        x_T: initial noise (B, ...), N(0, I).
        steps: NFE; ``steps`` grid points uniform in [t_end, T] then a final noiseless step to 0.
        t_end: the last grid time before 0 (1e-3, the official value).
        generator: optional generator for the per-step noise (on x_T's device).
        progress: True for a tqdm bar, or a callback(done_steps, total_steps).

    Returns:
        x_0, shaped like x_T.
    """
    return _euler(eps_fn, sde, x_T, steps, t_end, generator, progress, stochastic=True)


@register_sampler("euler_ode")
@torch.no_grad()
def euler_ode(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int = 50,
    *,
    t_end: float = EULER_T_END,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> Tensor:
    """Euler on the probability-flow ODE (the official U-ViT sample grids use 50 steps).

    Same grid and arguments as ``euler_maruyama``; deterministic (``generator`` is unused).
    """
    return _euler(eps_fn, sde, x_T, steps, t_end, generator, progress, stochastic=False)


@register_sampler("ancestral")
@torch.no_grad()
def ancestral(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int = 100,
    *,
    t_end: float = EULER_T_END,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> Tensor:
    """Ancestral sampling (DDPM's sampler on the continuous schedule): each step draws x_s from the
    Gaussian posterior q(x_s | x_t, x_0) with x_0 replaced by the model's estimate, and the last
    step returns that estimate itself (no noise is left at the end).

    Exact at any step size where x_t determines x_0 (one-point data); otherwise the estimate's own
    spread is dropped at each step, so samples come out a little narrow at few steps (Gaussian
    data, linear schedule: std 9% low at 100 steps, 16% at 50), and never noisy. The CPU
    quickstart's sampler (50 steps; clean digits where Euler-Maruyama needs 200 and leaves noise).
    Same grid as ``euler_maruyama``: ``steps`` times uniform in [t_end, T], then 0. Not part of
    the official protocol.
    """
    _check(sde, steps, t_end)
    coefs = _Coefs(sde)
    grid = euler_time_grid(sde, steps, t_end)
    x = x_T
    for i in _Steps(steps, progress, "ancestral"):
        t, s = grid[i], grid[i + 1]
        alpha_t, sigma_t = coefs.alpha(t), coefs.sigma(t)
        x0 = (x - sigma_t * _eval(eps_fn, x, t)) / alpha_t
        if i == steps - 1:
            break  # the last step returns the estimate
        alpha_s, sigma_s = coefs.alpha(s), coefs.sigma(s)
        # x_t = a x_s + b n with a = alpha_t / alpha_s, b^2 = sigma_t^2 - a^2 sigma_s^2; the
        # posterior of x_s given x_t and x_0 weighs the two by their variances.
        a = alpha_t / alpha_s
        b2 = max(sigma_t ** 2 - a ** 2 * sigma_s ** 2, 0.0)
        mean = (a * sigma_s ** 2 / sigma_t ** 2) * x + (alpha_s * b2 / sigma_t ** 2) * x0
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        x = mean + (math.sqrt(b2) * sigma_s / sigma_t) * noise
    return x0


# --- DPM-Solver (noise prediction, singlestep) -----------------------------------------------------


def _dpm_solver_step(eps_fn: EpsFn, coefs: _Coefs, x: Tensor, s: float, t: float, order: int) -> Tensor:
    """One singlestep DPM-Solver-{1,2,3} update from time s to time t < s (Lu et al. 2022, Alg. 1-2 / App. B).

    With h = lambda_t - lambda_s and eps_s = eps(x, s):
      order 1 (= DDIM): x_t = (a_t / a_s) x - sig_t (e^h - 1) eps_s
      order 2 (r1 = 1/2): adds - sig_t / (2 r1) (e^h - 1) (eps(u1, s1) - eps_s)
      order 3 (r1 = 1/3, r2 = 2/3): adds - sig_t / r2 ((e^h - 1) / h - 1) (eps(u2, s2) - eps_s)
    where s_i has lambda = lambda_s + r_i h and u_i are the intermediate states.
    """
    lam_s, lam_t = coefs.lam(s), coefs.lam(t)
    h = lam_t - lam_s
    alpha_s, alpha_t, sigma_t = coefs.alpha(s), coefs.alpha(t), coefs.sigma(t)
    eps_s = _eval(eps_fn, x, s)
    x_t = (alpha_t / alpha_s) * x - (sigma_t * math.expm1(h)) * eps_s
    if order == 1:
        return x_t
    if order == 2:
        r1 = 0.5
        s1 = coefs.t_of_lam(lam_s + r1 * h)
        u1 = (coefs.alpha(s1) / alpha_s) * x - (coefs.sigma(s1) * math.expm1(r1 * h)) * eps_s
        d1 = _eval(eps_fn, u1, s1) - eps_s
        return x_t - (sigma_t / (2.0 * r1) * math.expm1(h)) * d1
    if order == 3:
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1 = coefs.t_of_lam(lam_s + r1 * h)
        s2 = coefs.t_of_lam(lam_s + r2 * h)
        u1 = (coefs.alpha(s1) / alpha_s) * x - (coefs.sigma(s1) * math.expm1(r1 * h)) * eps_s
        d1 = _eval(eps_fn, u1, s1) - eps_s
        sigma_s2 = coefs.sigma(s2)
        u2 = (
            (coefs.alpha(s2) / alpha_s) * x
            - (sigma_s2 * math.expm1(r2 * h)) * eps_s
            - (sigma_s2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1.0)) * d1
        )
        d2 = _eval(eps_fn, u2, s2) - eps_s
        return x_t - (sigma_t / r2 * (math.expm1(h) / h - 1.0)) * d2
    raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")


@register_sampler("dpm_solver")
@torch.no_grad()
def dpm_solver(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int = 50,
    *,
    t_end: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> Tensor:
    """DPM-Solver-fast in noise-prediction mode (the sampler of the official U-ViT evaluation).

    Args:
        eps_fn: ``eps_fn(x (B, ...), t (B,)) -> eps`` with t continuous in [0, T].
        sde: the noise schedule.
        x_T: initial noise (B, ...), N(0, I), taken to sit at t = T.
        steps: NFE; split into steps // 3 + 1 logSNR-uniform intervals by ``dpm_solver_fast_orders``.
        t_end: final time; None gives 1e-4 for steps > 15 and 1e-3 otherwise. The result is x at
            t_end (no extra denoising step), as in DPM-Solver and U-ViT.
        generator: unused (deterministic); accepted for a uniform sampler signature.
        progress: True for a tqdm bar (one tick per interval), or a callback(done, total).

    Returns:
        x_0 (strictly x_{t_end}), shaped like x_T.
    """
    t_end = _dpm_default_t_end(steps) if t_end is None else t_end
    _check(sde, steps, t_end)
    coefs = _Coefs(sde)
    orders = dpm_solver_fast_orders(steps)
    grid = logsnr_time_grid(sde, len(orders), sde.T, t_end)
    x = x_T
    for i in _Steps(len(orders), progress, "dpm_solver"):
        x = _dpm_solver_step(eps_fn, coefs, x, grid[i], grid[i + 1], orders[i])
    return x


@register_sampler("dpm_solver_pp")
@torch.no_grad()
def dpm_solver_pp(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int = 50,
    *,
    t_end: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> Tensor:
    """Multistep DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) with the data prediction
    x0_hat = (x - sigma_t eps) / alpha_t; ``steps`` NFE over ``steps`` logSNR-uniform intervals.

    With h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i:
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
        D_1 = x0_hat_0,  D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2}.
    Arguments as for ``dpm_solver``; returns x at t_end.
    """
    t_end = _dpm_default_t_end(steps) if t_end is None else t_end
    _check(sde, steps, t_end)
    coefs = _Coefs(sde)
    grid = logsnr_time_grid(sde, steps, sde.T, t_end)
    lams = [coefs.lam(t) for t in grid]
    x = x_T
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for i in _Steps(steps, progress, "dpm_solver_pp"):
        s, t = grid[i], grid[i + 1]
        alpha_s, sigma_s = coefs.alpha(s), coefs.sigma(s)
        alpha_t, sigma_t = coefs.alpha(t), coefs.sigma(t)
        h = lams[i + 1] - lams[i]
        x0_hat = (x - sigma_s * _eval(eps_fn, x, s)) / alpha_s
        if x0_prev is None:
            d = x0_hat
        else:
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
        x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d
        x0_prev, h_prev = x0_hat, h
    return x


def _dpm_solver_pp_step(eps_fn: EpsFn, coefs: _Coefs, x: Tensor, s: float, t: float, order: int,
                       r1: float | None, r2: float | None) -> Tensor:
    """One singlestep DPM-Solver++ update (data prediction) from s to t < s, order 1, 2 or 3.

    With D(x, u) = (x - sigma_u eps(x, u)) / alpha_u, h = lambda_t - lambda_s, D_s = D(x, s):
      order 1: x_t = (sig_t / sig_s) x - a_t expm1(-h) D_s
      order 2: u1 = (sig_s1 / sig_s) x - a_s1 expm1(-r1 h) D_s at lambda_s + r1 h, then
               x_t = order 1 - (1 / (2 r1)) a_t expm1(-h) (D(u1, s1) - D_s)
      order 3: u1 as above, u2 = (sig_s2 / sig_s) x - a_s2 expm1(-r2 h) D_s
               + (r2 / r1) a_s2 (expm1(-r2 h) / (r2 h) + 1) (D(u1, s1) - D_s), then
               x_t = order 1 + (1 / r2) a_t (expm1(-h) / h + 1) (D(u2, s2) - D_s)
    """
    lam_s, lam_t = coefs.lam(s), coefs.lam(t)
    h = lam_t - lam_s
    sigma_s, sigma_t, alpha_t = coefs.sigma(s), coefs.sigma(t), coefs.alpha(t)

    def data(u: Tensor, time: float) -> Tensor:
        return (u - coefs.sigma(time) * _eval(eps_fn, u, time)) / coefs.alpha(time)

    d_s = data(x, s)
    x_t = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d_s
    if order == 1:
        return x_t
    s1 = coefs.t_of_lam(lam_s + r1 * h)
    u1 = (coefs.sigma(s1) / sigma_s) * x - (coefs.alpha(s1) * math.expm1(-r1 * h)) * d_s
    d_1 = data(u1, s1) - d_s
    if order == 2:
        return x_t - (0.5 / r1 * alpha_t * math.expm1(-h)) * d_1
    if order == 3:
        s2 = coefs.t_of_lam(lam_s + r2 * h)
        alpha_s2 = coefs.alpha(s2)
        u2 = ((coefs.sigma(s2) / sigma_s) * x - (alpha_s2 * math.expm1(-r2 * h)) * d_s
              + (r2 / r1 * alpha_s2 * (math.expm1(-r2 * h) / (r2 * h) + 1.0)) * d_1)
        d_2 = data(u2, s2) - d_s
        return x_t + (alpha_t / r2 * (math.expm1(-h) / h + 1.0)) * d_2
    raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")


@register_sampler("dpm_solver_pp_fast")
@torch.no_grad()
def dpm_solver_pp_fast(
    eps_fn: EpsFn,
    sde: VPSchedule,
    x_T: Tensor,
    steps: int = 50,
    *,
    t_end: float | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = False,
) -> Tensor:
    """U-ViT's text-to-image sampler: singlestep DPM-Solver++ (data prediction) with the orders of
    ``dpm_solver_fast_orders(steps)`` on ``steps + 1`` times uniform in t from T to t_end.

    The step of order k goes from grid time i to grid time i + k; its intermediate times are the
    grid times in between (r1, r2 are their fractions of the step in lambda). ``steps`` NFE.
    t_end defaults to ``sde.t_min`` when positive (1/N: U-ViT's end time on the discrete
    schedule), else to the DPM-Solver rule (1e-4 above 15 steps, 1e-3 below). Returns x at t_end.
    """
    t_min = float(getattr(sde, "t_min", 0.0))
    t_end = (t_min if t_min > 0 else _dpm_default_t_end(steps)) if t_end is None else t_end
    _check(sde, steps, t_end)
    coefs = _Coefs(sde)
    orders = dpm_solver_fast_orders(steps)
    grid = torch.linspace(sde.T, t_end, steps + 1, dtype=torch.float64).tolist()
    lams = [coefs.lam(t) for t in grid]
    x, i = x_T, 0
    for k in _Steps(len(orders), progress, "dpm_solver_pp_fast"):
        order = orders[k]
        h = lams[i + order] - lams[i]
        r1 = (lams[i + 1] - lams[i]) / h if order >= 2 else None
        r2 = (lams[i + 2] - lams[i]) / h if order >= 3 else None
        x = _dpm_solver_pp_step(eps_fn, coefs, x, grid[i], grid[i + order], order, r1, r2)
        i += order
    return x


# --- entry point --------------------------------------------------------------------------------


def sample(
    eps_fn: EpsFn,
    sde: VPSchedule,
    shape_or_x_T: Sequence[int] | torch.Size | Tensor,
    sampler: str = "dpm_solver",
    steps: int = 50,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress = False,
    **sampler_kwargs: Any,
) -> Tensor:
    """Draw samples: x_T ~ N(0, I) (or the given x_T) integrated from t = T to ~0 by ``sampler``.

    Args:
        eps_fn: ``eps_fn(x (B, ...), t (B,)) -> eps``, e.g. a ``NoisePredictor``.
        sde: the noise schedule the model was trained with.
        shape_or_x_T: a shape (B, ...) to draw x_T with ``generator``, or x_T itself.
        sampler: a name in ``SAMPLERS`` ("euler_maruyama", "euler_ode", "ancestral", "dpm_solver",
            "dpm_solver_pp", "dpm_solver_pp_fast").
        steps: number of network evaluations.
        generator: used for x_T (when a shape is given) and for the sampler's noise.
        device, dtype: where and how to draw x_T (device defaults to the generator's device).
        progress: True for a tqdm bar, or a callback(done, total).
        **sampler_kwargs: e.g. ``t_end``.

    Returns:
        Samples (B, ...) in data space (same device and dtype as x_T).
    """
    if sampler not in SAMPLERS:
        raise KeyError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
    if isinstance(shape_or_x_T, Tensor):
        x_T = shape_or_x_T
    else:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        x_T = torch.randn(tuple(shape_or_x_T), generator=generator, device=device, dtype=dtype)
    return SAMPLERS[sampler](eps_fn, sde, x_T, steps, generator=generator, progress=progress, **sampler_kwargs)
