"""The mathematics of power-function EMAs and their post-hoc reconstruction (Karras et al., EDM2,
"Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024, Sec. 3 and App. C).

A power-function EMA with exponent ``gamma`` averages the weights of steps 1..t with the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 <= tau <= t: its decay at update t is
beta_t = (1 - 1/t)^(gamma + 1). That discrete update is this profile exactly, applied to the weights
held piecewise constant (step s owns tau in (s - 1, s]): the weight of step s in the average at t is
(s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1). So every snapshot and every target is a linear
functional of the same trajectory, and a target whose profile is a combination of the snapshots'
profiles is that combination of the snapshots.

Its length is ``sigma_rel``, the profile's standard deviation relative to t:
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

Reconstruction: the profiles' L2 inner products have a closed form, so the coefficients x of the
snapshots that best match a target profile solve the least-squares system A x = b, A the snapshots'
Gram matrix and b their inner products with the target. The fit's relative L2 error says how well
the target is represented; it bounds the error of the reconstructed weights for any trajectory
(``|sum x_i ema_i - ema_target| <= error * |p_target| * |w|``, Cauchy-Schwarz).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma^2 + 3 gamma + 1 = 0 and falls
# towards 0 as gamma grows; the branch gamma >= GAMMA_AT_MAX is the one used (EDM2's).
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0


def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative standard deviation of the power profile with exponent ``gamma`` (> -1)."""
    gamma = float(gamma)
    if not gamma > -1.0:
        raise ValueError(f"a power-function EMA needs gamma > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_AT_MAX)  # 0.3003: no power profile is longer


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative length ``sigma_rel`` in (0, SIGMA_REL_MAX]: the
    largest root of the cubic (gamma + 2)^2 (gamma + 3) = (gamma + 1) / sigma_rel^2."""
    s = float(sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}] (longer profiles do not exist), got {s}")
    k = 1.0 / (s * s)
    # gamma^3 + 7 gamma^2 + (16 - k) gamma + (12 - k) = 0; take the real root on our branch and
    # polish it with Newton steps (np.roots is accurate to ~1e-12 relative, Newton to rounding).
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-6 * max(1.0, abs(r))))
    for _ in range(3):
        f = ((gamma + 7.0) * gamma + 16.0 - k) * gamma + 12.0 - k
        df = (3.0 * gamma + 14.0) * gamma + 16.0 - k
        if df == 0.0:
            break
        gamma -= f / df
    return max(gamma, GAMMA_AT_MAX)


def power_decay(update: int, gamma: float) -> float:
    """The decay of the ``update``-th update (1 for the first, which copies the weights)."""
    return (1.0 - 1.0 / update) ** (gamma + 1.0)


def profile_inner(t1: np.ndarray, g1: np.ndarray, t2: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """<p_(t1,g1), p_(t2,g2)> = (g1+1)(g2+1) min(t1,t2)^(g1+g2+1) / ((g1+g2+1) t1^(g1+1) t2^(g2+1)),
    elementwise with broadcasting, computed in logs (t^gamma overflows for long runs)."""
    t1, g1, t2, g2 = (np.asarray(a, dtype=np.float64) for a in (t1, g1, t2, g2))
    m = np.minimum(t1, t2)
    log = ((g1 + g2 + 1.0) * np.log(m) - (g1 + 1.0) * np.log(t1) - (g2 + 1.0) * np.log(t2)
           + np.log(g1 + 1.0) + np.log(g2 + 1.0) - np.log(g1 + g2 + 1.0))
    return np.exp(log)


def solve_coefficients(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], target_step: float,
                       target_gamma: float) -> tuple[np.ndarray, float]:
    """The coefficients of the snapshots (taken after update ``snapshot_steps[i]`` of an EMA with
    exponent ``snapshot_gammas[i]``) whose combination best matches the power EMA of exponent
    ``target_gamma`` at update ``target_step``, and the fit's relative L2 error
    |sum x_i p_i - p_target| / |p_target|. Steps are rescaled by ``target_step`` (the inner products
    scale with 1 / time, the coefficients not at all)."""
    t = np.asarray(snapshot_steps, dtype=np.float64) / float(target_step)
    g = np.asarray(snapshot_gammas, dtype=np.float64)
    if t.ndim != 1 or len(t) != len(g) or not len(t):
        raise ValueError("need one exponent per snapshot, and at least one snapshot")
    if (g <= -0.5).any() or target_gamma <= -0.5:
        raise ValueError("profiles with gamma <= -0.5 are not square-integrable; reconstruction needs gamma > -0.5")
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, 1.0, target_gamma)
    target_norm2 = float(profile_inner(1.0, target_gamma, 1.0, target_gamma))
    # Rescale to a unit diagonal before solving: the Gram matrix of many nearby profiles is badly
    # conditioned, and lstsq's cut-off then drops the directions the data cannot tell apart.
    d = 1.0 / np.sqrt(np.diag(gram))
    y, *_ = np.linalg.lstsq(gram * d[:, None] * d[None, :], b * d, rcond=None)
    x = y * d
    residual2 = float(x @ gram @ x - 2.0 * x @ b + target_norm2)
    return x, math.sqrt(max(residual2, 0.0) / target_norm2)


def representable_range(snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], target_step: float,
                        max_error: float, grid: np.ndarray | None = None) -> tuple[float, float] | None:
    """The range of sigma_rel whose fit error at ``target_step`` stays within ``max_error`` (the
    contiguous stretch around the best-fitting value, on a log grid of sigma_rel), None if none."""
    grid = np.geomspace(0.005, 0.29, 300) if grid is None else np.asarray(grid)
    errors = np.array([solve_coefficients(snapshot_steps, snapshot_gammas, target_step, gamma_of_sigma_rel(s))[1]
                       for s in grid])
    ok = errors <= max_error
    if not ok.any():
        return None
    best = int(np.argmin(errors))
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(grid) - 1 and ok[hi + 1]:
        hi += 1
    return float(grid[lo]), float(grid[hi])
