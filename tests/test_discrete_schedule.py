"""The MS-COCO protocol of U-ViT: Stable Diffusion's discrete schedule, its integer training draw
and DPM-Solver++ on it, checked against numbers recorded from U-ViT's own code
(``scripts/make_official_discrete_fixture.py``; the tiny network is written out in both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from scalelong.diffusion import DiscreteVPSchedule, NoisePredictor, get_sde, noise_prediction_loss, sample

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "official_discrete.pt", weights_only=True)


def tiny_eps(x, timesteps, context):
    t = timesteps.float().reshape(-1, 1, 1, 1)
    return torch.tanh(F.conv2d(x, FIXTURE["weight"], FIXTURE["bias"], padding=1)) * (0.5 + t / 1000.0) \
        + 0.1 * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_alpha_bar_at_every_step_is_stable_diffusions():
    sde = get_sde("sd_discrete")
    n = torch.arange(1, 1001, dtype=torch.float64)
    alpha2 = sde.mean_coef(n / 1000) ** 2
    torch.testing.assert_close(alpha2, FIXTURE["cum_alphas"][1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.std(n / 1000) ** 2, FIXTURE["cum_betas"][1:], rtol=1e-9, atol=0)
    assert sde.t_min == 1e-3 and sde.time_input_scale == 1000.0


def test_the_lambda_inverse_round_trips_and_beta_is_the_slope():
    sde = DiscreteVPSchedule()
    t = torch.linspace(1e-3, 1.0, 997, dtype=torch.float64)
    torch.testing.assert_close(sde.inverse_lambda(sde.lambda_(t)), t, rtol=0, atol=1e-10)
    mid = torch.tensor([0.3005], dtype=torch.float64)  # inside the segment [0.300, 0.301]
    slope = (sde.log_mean_coef(torch.tensor([0.301], dtype=torch.float64))
             - sde.log_mean_coef(torch.tensor([0.300], dtype=torch.float64))) / 1e-3
    torch.testing.assert_close(sde.beta(mid), -2 * slope)


def test_training_draws_integer_steps_and_the_loss_matches_uvit():
    sde = get_sde("sd_discrete")
    t = sde.sample_t(20_000, generator=torch.Generator().manual_seed(0))
    n = t * 1000
    assert (n - n.round()).abs().max() < 1e-4 and int(n.round().min()) == 1 and int(n.round().max()) == 1000
    assert abs(float(n.mean()) - 500.5) < 5  # uniform over 1..N
    train = FIXTURE["train"]
    t = train["n"].double() / 1000
    seen = {}

    def net(x, timesteps, context):
        seen["timesteps"] = timesteps
        return tiny_eps(x, timesteps, context)

    x_t = sde.marginal(train["x0"], t.float(), train["eps"])
    torch.testing.assert_close(x_t, train["xn"], rtol=1e-5, atol=1e-6)
    _, per_sample, _ = noise_prediction_loss(net, train["x0"], sde, {"context": train["context"]}, t=t.float(),
                                             noise=train["eps"], return_per_sample=True)
    # the network sees n (to float32 rounding of n / N * N)
    torch.testing.assert_close(seen["timesteps"], train["n"].float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_sample, train["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [10, 12, 50])
def test_dpm_solver_pp_with_guidance_matches_uvit(steps):
    case = FIXTURE["sampling"][steps]
    sde = get_sde("sd_discrete")
    empty = FIXTURE["empty_context"].expand(len(case["z"]), -1, -1)
    eps_fn = NoisePredictor(tiny_eps, {"context": case["context"]}, {"context": empty},
                            guidance_scale=FIXTURE["guidance_scale"], time_input_scale=sde.time_input_scale)
    out = sample(eps_fn, sde, case["z"].clone(), sampler="dpm_solver_pp_fast", steps=steps)
    # U-ViT computes its schedule in float32, we in float64: agreement to float32 rounding.
    scale = float(case["out"].abs().max())
    torch.testing.assert_close(out, case["out"], rtol=1e-4, atol=1e-4 * scale)


def test_the_mscoco_preset_follows_uvit():
    cfg = compose(["dataset=mscoco"])
    assert cfg["diffusion"]["schedule"] == "sd_discrete"
    assert (cfg["sample"]["sampler"], cfg["sample"]["steps"]) == ("dpm_solver_pp_fast", 50)
    fid = cfg["dataset"]["fid"]
    assert (fid["final_sampler"], fid["final_steps"], fid["guidance_scale"]) == ("dpm_solver_pp_fast", 50, 1.0)
    assert fid["train_sampler"] == "dpm_solver_pp_fast"
    # The pixel data sets keep the continuous VP-SDE.
    assert compose(["dataset=cifar10"])["diffusion"]["schedule"] == "linear"


def test_euler_samplers_stay_inside_a_discrete_schedule():
    sde = get_sde("sd_discrete")
    for sampler in ("euler_ode", "euler_maruyama", "ancestral", "dpm_solver", "dpm_solver_pp"):
        out = sample(lambda x, t: 0.1 * x, sde, (2, 3), sampler=sampler, steps=8,
                     generator=torch.Generator().manual_seed(0), t_end=2e-3)
        assert torch.isfinite(out).all(), sampler
