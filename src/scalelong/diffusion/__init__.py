"""Diffusion core: VP-SDE schedules, the epsilon-prediction loss, classifier-free guidance and samplers.

    sde = get_sde("linear")                          # or "cosine", "sd_discrete"
    loss = noise_prediction_loss(net, x0, sde, {"y": labels})
    eps_fn = NoisePredictor(net, {"y": y}, {"y": null_y}, guidance_scale=w)
    images = sample(eps_fn, sde, (B, C, H, W), sampler="dpm_solver", steps=50)
"""

from .samplers import (
    SAMPLERS,
    dpm_solver,
    dpm_solver_fast_orders,
    dpm_solver_pp,
    dpm_solver_pp_fast,
    euler_maruyama,
    euler_ode,
    logsnr_time_grid,
    register_sampler,
    sample,
)
from .guidance import NoisePredictor
from .loss import noise_prediction_loss
from .schedules import (
    SDES,
    TIME_INPUT_SCALE,
    TRAIN_T_EPS,
    CosineVPSDE,
    DiscreteVPSchedule,
    EpsFn,
    LinearVPSDE,
    SNRShifted,
    VPSchedule,
    get_sde,
    register_sde,
)

__all__ = [
    "SAMPLERS",
    "SDES",
    "TIME_INPUT_SCALE",
    "TRAIN_T_EPS",
    "CosineVPSDE",
    "DiscreteVPSchedule",
    "EpsFn",
    "LinearVPSDE",
    "NoisePredictor",
    "SNRShifted",
    "VPSchedule",
    "dpm_solver",
    "dpm_solver_fast_orders",
    "dpm_solver_pp",
    "dpm_solver_pp_fast",
    "euler_maruyama",
    "euler_ode",
    "get_sde",
    "logsnr_time_grid",
    "noise_prediction_loss",
    "register_sampler",
    "register_sde",
    "sample",
]
