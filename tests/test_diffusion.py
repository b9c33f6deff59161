"""Tests of the diffusion core: schedules, loss, guidance and samplers (on an analytic Gaussian case)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from scalelong.diffusion import (
    SAMPLERS,
    TIME_INPUT_SCALE,
    CosineVPSDE,
    LinearVPSDE,
    NoisePredictor,
    SNRShifted,
    VPSchedule,
    dpm_solver_fast_orders,
    get_sde,
    logsnr_time_grid,
    noise_prediction_loss,
    sample,
)

# "cosine_snr4": the cosine schedule at 4x the SNR (SNRShifted), the quickstart's for its 8x8 digits.
SCHEDULES = ["linear", "cosine", "cosine_snr4"]


def make_sde(name: str) -> VPSchedule:
    return get_sde("cosine", snr_shift=4) if name == "cosine_snr4" else get_sde(name)


def _times(sde: VPSchedule, n: int = 201) -> Tensor:
    return torch.linspace(1e-5, sde.T, n, dtype=torch.float64)


# --- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_variance_preserving(name: str) -> None:
    sde = make_sde(name)
    t = _times(sde)
    alpha, sigma = sde.mean_coef(t), sde.std(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    assert (alpha > 0).all() and (sigma > 0).all()
    assert (alpha[1:] < alpha[:-1]).all()  # signal decays monotonically
    torch.testing.assert_close(sde.log_std(t), sigma.log())


def test_linear_closed_form() -> None:
    sde = LinearVPSDE()
    assert (sde.beta_min, sde.beta_max, sde.T) == (0.1, 20.0, 1.0)
    t = _times(sde)
    b0, b1 = 0.1, 20.0
    expected = torch.exp(-(t**2 * (b1 - b0) / 4 + t * b0 / 2))
    torch.testing.assert_close(sde.mean_coef(t), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.beta(t), b0 + t * (b1 - b0))


def test_cosine_closed_form() -> None:
    sde = CosineVPSDE()
    t = _times(sde)
    s = 0.008
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(sde.mean_coef(t) ** 2, f(t) / f(torch.zeros_like(t)))
    assert float(sde.mean_coef(0.0)) == pytest.approx(1.0)
    assert 0 < float(sde.mean_coef(sde.T)) < 0.01  # well defined and almost pure noise at t_max
    # Beyond t_max the schedule is clamped, so alpha never reaches 0.
    assert float(sde.mean_coef(1.0)) == pytest.approx(float(sde.mean_coef(sde.T)))


@pytest.mark.parametrize("name", SCHEDULES)
def test_lambda_round_trip(name: str) -> None:
    sde = make_sde(name)
    t = _times(sde)
    lam = sde.lambda_(t)
    assert (lam[1:] < lam[:-1]).all()  # lambda strictly decreasing, so the inverse exists
    torch.testing.assert_close(lam, (sde.mean_coef(t) / sde.std(t)).log())
    torch.testing.assert_close(sde.inverse_lambda(lam), t, rtol=1e-9, atol=1e-12)
    lam_grid = torch.linspace(float(lam[-1]), float(lam[0]), 101, dtype=torch.float64)
    torch.testing.assert_close(sde.lambda_(sde.inverse_lambda(lam_grid)), lam_grid, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_beta_is_derivative_of_minus_two_log_alpha(name: str) -> None:
    sde = make_sde(name)
    t = torch.linspace(1e-3, sde.T - 1e-3, 101, dtype=torch.float64)
    h = 1e-6
    numeric = -2 * (sde.log_mean_coef(t + h) - sde.log_mean_coef(t - h)) / (2 * h)
    # Central differences in float64: truncation O(h^2) and rounding ~1e-16/h, both << 1e-6 relative.
    torch.testing.assert_close(sde.beta(t), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_sample_t_range(name: str) -> None:
    sde = make_sde(name)
    t = sde.sample_t(10_000, eps=1e-5, generator=torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and t.dtype == torch.float32
    assert float(t.min()) >= 1e-5 and float(t.max()) <= sde.T
    assert float(t.mean()) == pytest.approx((1e-5 + sde.T) / 2, abs=0.02)


def test_get_sde_unknown() -> None:
    with pytest.raises(KeyError):
        get_sde("quadratic")


@pytest.mark.parametrize("name", ["linear", "cosine", "sd_discrete"])
def test_snr_shift_multiplies_the_snr_and_keeps_the_time_axis(name: str) -> None:
    """snr_shift=k: alpha^2 / sigma^2 is k times the base schedule's at every t, on the same time
    range and time input; the steps a discrete schedule trains on stay its own; 1 is the base."""
    base, shifted = get_sde(name), get_sde(name, snr_shift=4)
    assert isinstance(shifted, SNRShifted) and type(get_sde(name, snr_shift=1)) is type(base)
    assert (shifted.T, shifted.t_min, shifted.time_input_scale) == (base.T, base.t_min, base.time_input_scale)
    t = torch.linspace(max(base.t_min, 1e-3), base.T, 101, dtype=torch.float64)
    snr = lambda sde: sde.mean_coef(t) ** 2 / sde.std(t) ** 2  # noqa: E731
    torch.testing.assert_close(snr(shifted), 4 * snr(base), rtol=1e-9, atol=0)
    # 4x the SNR is half the noise-to-signal ratio: lambda (half the log SNR) moves by log 2.
    torch.testing.assert_close(shifted.lambda_(t), base.lambda_(t) + math.log(2), rtol=0, atol=1e-9)
    draw = lambda sde: sde.sample_t(1000, generator=torch.Generator().manual_seed(0))  # noqa: E731
    torch.testing.assert_close(draw(shifted), draw(base), rtol=0, atol=0)
    # beta at t = 0, where the base's sigma is 0: the limit, beta_base / shift
    assert float(shifted.beta(0.0)) == pytest.approx(float(base.beta(0.0)) / 4)


@pytest.mark.parametrize("shift", [0, -1, float("inf"), True, "4"])
def test_a_bad_snr_shift_is_a_config_error_that_names_it(shift) -> None:
    from scalelong.build import build_schedule
    from scalelong.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"diffusion.schedule=cosine: snr_shift must be a positive number"):
        build_schedule({"schedule": "cosine", "snr_shift": shift})


# --- the analytic Gaussian case -------------------------------------------------------------------

# Data x0 ~ N(MU, S^2) independently in each of DIM dimensions.
MU, S, DIM, BATCH = 0.5, 0.3, 64, 4000


def exact_eps_fn(sde: VPSchedule):
    """The Bayes-optimal noise predictor E[eps | x_t] = sigma_t (x - alpha_t MU) / (alpha_t^2 S^2 + sigma_t^2)."""

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        alpha = sde.mean_coef(t).to(x.dtype)[:, None]
        sigma = sde.std(t).to(x.dtype)[:, None]
        return sigma * (x - alpha * MU) / (alpha**2 * S**2 + sigma**2)

    return eps_fn


def exact_ode_map(sde: VPSchedule, x_T: Tensor, t_end: float) -> Tensor:
    """Where the exact probability-flow ODE carries x_T (at t = T) by time t_end.

    For Gaussian data the flow is affine: it keeps the standardised value z = (x - mean_t) / std_t
    fixed, with mean_t = alpha_t MU and std_t^2 = alpha_t^2 S^2 + sigma_t^2.
    """

    def mean_std(t: float) -> tuple[float, float]:
        if t == 0.0:
            return MU, S
        alpha, sigma = float(sde.mean_coef(t)), float(sde.std(t))
        return alpha * MU, math.sqrt(alpha**2 * S**2 + sigma**2)

    mean_T, std_T = mean_std(sde.T)
    mean_e, std_e = mean_std(t_end)
    return mean_e + std_e * (x_T - mean_T) / std_T


# Tolerances on |sample mean - MU| and |sample std - S| over BATCH * DIM = 256,000 values:
# * statistics: standard errors S / sqrt(256000) = 5.9e-4 (mean) and S / sqrt(2 * 256000) = 4.2e-4
#   (std); we allow 5 of them (fixed seeds, so the test is deterministic anyway);
# * prior mismatch: x_T ~ N(0, 1) while the true marginal at T has mean alpha_T MU (alpha_T = 8.5e-3
#   for the cosine schedule, 1.7e-2 at 4x its SNR), which shifts the mean by up to S * alpha_T * MU
#   = 1.3e-3 (2.5e-3 shifted);
# * discretisation: the per-sampler budget below, about 2x the std error we measured with these
#   settings (linear / cosine): euler_maruyama 500: 4e-4 / 2e-4 (within noise over 3 seeds);
#   euler_ode 100: 4.5e-3 / 2.6e-3; dpm_solver 20: 2.6e-3 / 3.6e-3; dpm_solver 50: 2.4e-4 / 2.5e-4;
#   dpm_solver_pp 20: 4.9e-3 / 5.1e-3; dpm_solver_pp 50: 9.6e-4 / 9.9e-4.
MEAN_STAT_TOL = 5 * S / math.sqrt(BATCH * DIM)  # ~3e-3, plus the prior mismatch of the schedule
STD_STAT_TOL = 5 * S / math.sqrt(2 * BATCH * DIM)  # ~2.1e-3
SAMPLER_CASES = [  # (sampler, steps, discretisation budget on the std)
    ("euler_maruyama", 500, 1e-3),
    ("euler_ode", 100, 1e-2),
    ("dpm_solver", 20, 7e-3),
    ("dpm_solver", 50, 1e-3),
    ("dpm_solver_pp", 20, 1e-2),
    ("dpm_solver_pp", 50, 2e-3),
    # Ancestral steps put the estimate E[x0 | x_t] in place of x0, which drops that estimate's
    # spread: the std comes out low, by 2.8e-2 / 1.6e-2 at 100 steps (4.8e-2 / 2.8e-2 at 50).
    ("ancestral", 100, 4e-2),
]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("sampler", "steps", "disc_tol"), SAMPLER_CASES)
def test_samplers_reproduce_gaussian_data(name: str, sampler: str, steps: int, disc_tol: float) -> None:
    sde = make_sde(name)
    generator = torch.Generator().manual_seed(0)
    x0 = sample(exact_eps_fn(sde), sde, (BATCH, DIM), sampler=sampler, steps=steps, generator=generator)
    assert x0.shape == (BATCH, DIM) and torch.isfinite(x0).all()
    mean_err = abs(float(x0.mean()) - MU)
    std_err = abs(float(x0.std()) - S)
    # The mean's discretisation error is far below its statistical error, so the same small
    # budget (1e-3) serves all samplers; the std carries the per-sampler budget.
    prior_mismatch = S * float(sde.mean_coef(sde.T)) * MU
    assert mean_err < MEAN_STAT_TOL + prior_mismatch + 1e-3, f"{sampler}/{steps}: mean error {mean_err:.2e}"
    assert std_err < STD_STAT_TOL + disc_tol, f"{sampler}/{steps}: std error {std_err:.2e}"


# Pathwise RMS distance from the exact ODE map (no sampling noise at all: a pure discretisation
# measure). Measured (linear / cosine): euler_ode 100: 5.0e-3 / 3.5e-3; dpm_solver 20: 2.5e-3 /
# 3.5e-3; dpm_solver 50: 1.4e-4 / 1.5e-4; dpm_solver_pp 20: 4.8e-3 / 5.0e-3; dpm_solver_pp 50:
# 8.6e-4 / 8.9e-4. Tolerances are about 2x those.
ODE_CASES = [
    ("euler_ode", 100, 0.0, 1e-2),
    ("dpm_solver", 20, 1e-4, 7e-3),
    ("dpm_solver", 50, 1e-4, 4e-4),
    ("dpm_solver_pp", 20, 1e-4, 1e-2),
    ("dpm_solver_pp", 50, 1e-4, 2e-3),
]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("sampler", "steps", "t_end", "tol"), ODE_CASES)
def test_ode_samplers_follow_exact_flow(name: str, sampler: str, steps: int, t_end: float, tol: float) -> None:
    sde = make_sde(name)
    x_T = torch.randn(512, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = SAMPLERS[sampler](exact_eps_fn(sde), sde, x_T, steps)
    rms = float((x0 - exact_ode_map(sde, x_T, t_end)).pow(2).mean().sqrt())
    assert rms < tol, f"{sampler}/{steps}: pathwise rms {rms:.2e}"


@pytest.mark.parametrize(("sampler", "low", "high", "min_ratio"), [
    # Error ~ NFE^-order: DPM-Solver-fast is third order (2.5^3 = 15.6; measured 17), DPM-Solver++(2M)
    # second order (2.5^2 = 6.25; measured 5.6), Euler first (2^1; measured 2.0).
    ("dpm_solver", 20, 50, 10.0),
    ("dpm_solver_pp", 20, 50, 4.0),
    ("euler_ode", 50, 100, 1.7),
])
def test_convergence_order(sampler: str, low: int, high: int, min_ratio: float) -> None:
    sde = get_sde("linear")
    x_T = torch.randn(256, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_end = 0.0 if sampler.startswith("euler") else 1e-4
    exact = exact_ode_map(sde, x_T, t_end)
    err = {}
    for steps in (low, high):
        x0 = SAMPLERS[sampler](exact_eps_fn(sde), sde, x_T, steps)
        err[steps] = float((x0 - exact).pow(2).mean().sqrt())
    assert err[low] / err[high] > min_ratio, err


@pytest.mark.parametrize("name", SCHEDULES)
def test_ancestral_steps_follow_the_exact_marginals_of_a_single_point(name: str) -> None:
    """Data that is one point: x0 is known from x_t exactly, so each ancestral step draws from
    the true reverse transition and x_t ~ N(alpha_t MU, sigma_t^2) at every grid time, however
    coarse the grid (10 steps): this pins both the posterior's mean and its variance."""
    sde = make_sde(name)
    seen: list[tuple[float, Tensor]] = []

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        seen.append((float(t[0]), x.clone()))
        return (x - sde.mean_coef(t)[:, None] * MU) / sde.std(t)[:, None]

    x0 = sample(eps_fn, sde, (BATCH, DIM), sampler="ancestral", steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x0, torch.full_like(x0, MU), atol=1e-5)  # the last step returns the estimate
    assert len(seen) == 10
    for t, x in seen[1:]:  # the first is x_T ~ N(0, 1), not drawn by a step
        alpha, sigma = float(sde.mean_coef(torch.tensor(t))), float(sde.std(torch.tensor(t)))
        assert abs(float(x.mean()) - alpha * MU) < 5 * sigma / math.sqrt(x.numel()) + 1e-3, t
        assert abs(float(x.std()) / sigma - 1) < 5 / math.sqrt(2 * x.numel()) + 1e-3, t


def test_ancestral_error_falls_with_the_step_count() -> None:
    sde = get_sde("linear")
    err = {}
    for steps in (50, 100):
        x0 = sample(exact_eps_fn(sde), sde, (BATCH, DIM), sampler="ancestral", steps=steps,
                    generator=torch.Generator().manual_seed(0))
        err[steps] = abs(float(x0.std()) - S)
    assert err[50] / err[100] > 1.5, err  # first order: measured 1.7


# --- sampler mechanics ----------------------------------------------------------------------------


class CountingEps:
    """An eps_fn that records the times it is asked about and returns zeros."""

    def __init__(self) -> None:
        self.times: list[Tensor] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        self.times.append(t.clone())
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 20, 50])
def test_nfe_equals_steps(sampler: str, steps: int) -> None:
    sde = get_sde("linear")
    counter = CountingEps()
    SAMPLERS[sampler](counter, sde, torch.randn(2, 3), steps)
    assert len(counter.times) == steps
    all_t = torch.cat(counter.times)
    assert float(all_t.max()) == pytest.approx(sde.T) and float(all_t.min()) > 0


def test_dpm_solver_fast_orders() -> None:
    assert dpm_solver_fast_orders(50) == [3] * 16 + [2]
    assert dpm_solver_fast_orders(20) == [3] * 6 + [2]
    assert dpm_solver_fast_orders(12) == [3] * 3 + [2, 1]
    assert dpm_solver_fast_orders(10) == [3] * 3 + [1]
    for steps in range(1, 100):
        assert sum(dpm_solver_fast_orders(steps)) == steps


@pytest.mark.parametrize("name", SCHEDULES)
def test_logsnr_grid(name: str) -> None:
    sde = make_sde(name)
    grid = torch.tensor(logsnr_time_grid(sde, 17, sde.T, 1e-4), dtype=torch.float64)
    assert grid[0] == sde.T and grid[-1] == 1e-4 and (grid[1:] < grid[:-1]).all()
    steps = sde.lambda_(grid).diff()
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps.mean())), rtol=1e-8, atol=0)


def test_euler_grid_matches_official() -> None:
    # U-ViT: times linspace(1e-3, 1, N) visited from 1 down, then a last step to t = 0.
    counter = CountingEps()
    SAMPLERS["euler_ode"](counter, get_sde("linear"), torch.randn(2, 3), 10)
    visited = torch.stack([t[0] for t in counter.times]).double()
    torch.testing.assert_close(visited, torch.linspace(1.0, 1e-3, 10, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_euler_maruyama_noise_and_last_step() -> None:
    sde = get_sde("linear")
    eps_fn = exact_eps_fn(sde)
    x_T = torch.randn(8, DIM, generator=torch.Generator().manual_seed(3))
    run = lambda steps, seed: SAMPLERS["euler_maruyama"](  # noqa: E731
        eps_fn, sde, x_T, steps, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(run(20, 0), run(20, 0))  # the generator makes it reproducible
    assert not torch.allclose(run(20, 0), run(20, 1))  # and the noise matters
    # One step goes straight from T to 0 and returns the mean: no noise is added at the last step.
    torch.testing.assert_close(run(1, 0), run(1, 1))


def test_sample_entry_point_and_progress() -> None:
    sde = get_sde("cosine")
    ticks: list[tuple[int, int]] = []
    a = sample(exact_eps_fn(sde), sde, (4, DIM), steps=10, generator=torch.Generator().manual_seed(5),
               progress=lambda done, total: ticks.append((done, total)))
    b = sample(exact_eps_fn(sde), sde, torch.randn(4, DIM, generator=torch.Generator().manual_seed(5)), steps=10)
    torch.testing.assert_close(a, b)
    assert ticks == [(i, 4) for i in range(1, 5)]  # 10 NFE of DPM-Solver-fast = 4 intervals
    sample(exact_eps_fn(sde), sde, (4, DIM), sampler="euler_ode", steps=3, progress=True)  # tqdm path
    with pytest.raises(KeyError):
        sample(exact_eps_fn(sde), sde, (4, DIM), sampler="heun")


# --- guidance -------------------------------------------------------------------------------------


class ToyCondNet(nn.Module):
    """eps = x * (1 + y) + timesteps / 999, with a call log; y (B,) labels, timesteps (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []
        self.timesteps: list[Tensor] = []

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        self.batch_sizes.append(x.shape[0])
        self.timesteps.append(timesteps)
        scale = 1.0 if y is None else 1.0 + y.to(x.dtype)[:, None]
        return x * scale + timesteps[:, None] / TIME_INPUT_SCALE


def test_guidance_scale_zero_is_unguided() -> None:
    net = ToyCondNet()
    x, t, y = torch.randn(5, 7), torch.rand(5), torch.arange(5)
    null_y = torch.full((5,), 10)
    guided = NoisePredictor(net, {"y": y}, {"y": null_y}, guidance_scale=0.0)
    torch.testing.assert_close(guided(x, t), net(x, t * 999, y=y))
    torch.testing.assert_close(NoisePredictor(net, {"y": y})(x, t), net(x, t * 999, y=y))
    torch.testing.assert_close(net.timesteps[0], t * 999)


def test_guidance_combines_branches_in_one_call() -> None:
    net = ToyCondNet()
    x, t, y = torch.randn(5, 7), torch.rand(5), torch.arange(5)
    null_y = torch.full((5,), 10)
    w = 3.0
    out = NoisePredictor(net, {"y": y}, {"y": null_y}, guidance_scale=w)(x, t)
    assert net.batch_sizes == [10]  # both branches in a single batch of 2B
    expected = (1 + w) * net(x, t * 999, y=y) - w * net(x, t * 999, y=null_y)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError):
        NoisePredictor(net, {"y": y}, guidance_scale=1.0)


def test_guided_predictor_drives_samplers() -> None:
    net = ToyCondNet()
    y = torch.tensor([0, 1, 0, 1])
    eps_fn = NoisePredictor(net, {"y": y}, {"y": torch.full((4,), 2)}, guidance_scale=1.5)
    for sampler in sorted(SAMPLERS):
        net.batch_sizes.clear()
        x0 = sample(eps_fn, get_sde("linear"), (4, 3), sampler=sampler, steps=6)
        assert x0.shape == (4, 3) and torch.isfinite(x0).all()
        assert net.batch_sizes == [8] * 6  # one 2B forward per network evaluation


# --- the loss -------------------------------------------------------------------------------------


class ExactNet(nn.Module):
    """The Bayes-optimal noise predictor as a network taking timesteps = 999 t; optional bias."""

    def __init__(self, sde: VPSchedule, bias: float = 0.0) -> None:
        super().__init__()
        self.eps_fn = exact_eps_fn(sde)
        self.bias = bias

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        return self.eps_fn(x, timesteps / TIME_INPUT_SCALE) + self.bias


@pytest.mark.parametrize("name", SCHEDULES)
def test_exact_predictor_reaches_irreducible_loss(name: str) -> None:
    sde = make_sde(name)
    batch = 8192
    x0 = MU + S * torch.randn(batch, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, per_sample, t = noise_prediction_loss(
        ExactNet(sde), x0, sde, generator=torch.Generator().manual_seed(1), return_per_sample=True
    )
    assert per_sample.shape == (batch,) and t.shape == (batch,)
    torch.testing.assert_close(loss, per_sample.mean())
    # Irreducible loss: Var[eps | x_t] = alpha^2 S^2 / (alpha^2 S^2 + sigma^2) per element, averaged
    # over t ~ U(1e-5, T) (trapezoid rule on a fine grid, error << the Monte Carlo error).
    grid = torch.linspace(1e-5, sde.T, 200_001, dtype=torch.float64)
    a2 = sde.mean_coef(grid) ** 2
    residual = a2 * S**2 / (a2 * S**2 + 1 - a2)
    irreducible = float(torch.trapezoid(residual, grid) / (sde.T - 1e-5))
    # Tolerance: 4 Monte Carlo standard errors of the batch mean (per-sample losses are i.i.d.).
    standard_error = float(per_sample.std()) / math.sqrt(batch)
    assert abs(float(loss) - irreducible) < 4 * standard_error, (float(loss), irreducible, standard_error)
    # The same draws (same seed) give a perturbed predictor a strictly higher loss.
    worse = noise_prediction_loss(ExactNet(sde, bias=0.05), x0, sde, generator=torch.Generator().manual_seed(1))
    assert float(worse) > float(loss) + 0.5 * 0.05**2  # a constant bias b adds b^2 in expectation


@pytest.mark.parametrize("name", SCHEDULES)
def test_min_snr_weighting_is_min_snr_gamma_over_snr(name: str) -> None:
    """train.min_snr_gamma: each sample's squared error times min(SNR, gamma) / SNR, SNR = alpha^2 /
    sigma^2; the per-sample losses returned stay the unweighted ones."""
    sde, gamma = make_sde(name), 5.0
    x0 = torch.randn(512, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = ExactNet(sde, bias=0.1)
    plain, per_sample, t = noise_prediction_loss(net, x0, sde, generator=torch.Generator().manual_seed(1),
                                                 return_per_sample=True)
    weighted, same, t_again = noise_prediction_loss(net, x0, sde, generator=torch.Generator().manual_seed(1),
                                                    return_per_sample=True, min_snr_gamma=gamma)
    torch.testing.assert_close(same, per_sample)
    torch.testing.assert_close(t_again, t)
    snr = sde.mean_coef(t) ** 2 / sde.std(t) ** 2
    weight = torch.clamp(snr, max=gamma) / snr
    torch.testing.assert_close(weighted, (per_sample * weight).mean())
    # Both regimes are drawn: noisy times keep weight 1, almost clean ones lose most of theirs.
    assert (weight == 1).float().mean() > 0.5 and float(weight.min()) < 0.05
    assert float(weighted) < float(plain)


def test_loss_passes_condition_and_scaled_time() -> None:
    net = ToyCondNet()
    x0, y = torch.randn(64, 3), torch.zeros(64, dtype=torch.long)
    loss = noise_prediction_loss(net, x0, get_sde("linear"), {"y": y})
    assert loss.dim() == 0 and net.batch_sizes == [64]
    timesteps = net.timesteps[0]
    assert float(timesteps.min()) >= 999 * 1e-5 and float(timesteps.max()) <= 999.0


class TinyLinearNet(nn.Module):
    """eps = W [x, timesteps / 999] + b: about the smallest net that can learn anything here."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim + 1, dim)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        return self.linear(torch.cat([x, timesteps[:, None] / TIME_INPUT_SCALE], dim=1))


def test_tiny_linear_net_learns() -> None:
    torch.manual_seed(0)
    sde, dim = get_sde("linear"), 16
    net = TinyLinearNet(dim)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        x0 = MU + S * torch.randn(512, dim, generator=generator)
        loss = noise_prediction_loss(net, x0, sde, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
