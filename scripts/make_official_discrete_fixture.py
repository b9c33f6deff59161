"""Record U-ViT's discrete (Stable Diffusion) schedule, its training draw and its DPM-Solver++
sampler on a fixed tiny network, for ``tests/test_discrete_schedule.py``.

The official code is not part of this project. Point this script at a checkout of
github.com/baofff/U-ViT: it imports ``dpm_solver_pp.py`` as it is, and runs the schedule and loss
functions of ``train_t2i_discrete.py`` (read from the file and executed on their own, since the
module imports accelerate, wandb and more at the top). Nothing of theirs is saved but numbers.

    python scripts/make_official_discrete_fixture.py --uvit PATH/U-ViT

The fixed network (the test computes the same):
    eps(x, n, context) = tanh(conv3x3(x; weight, bias)) * (0.5 + n / 1000) + 0.1 * mean(context)
with ``weight`` (4, 4, 3, 3) and ``bias`` (4,) drawn from seed 0 and stored in the fixture.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official_discrete.pt"
FUNCTIONS = ("stable_diffusion_beta_schedule", "get_skip", "stp", "mos", "Schedule", "LSimple")


def load_dpm_solver_pp(repo: Path):
    spec = importlib.util.spec_from_file_location("uvit_dpm_solver_pp", repo / "dpm_solver_pp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_training_functions(repo: Path) -> dict:
    """The schedule and loss definitions of train_t2i_discrete.py, without its imports."""
    tree = ast.parse((repo / "train_t2i_discrete.py").read_text())
    wanted = [node for node in tree.body if getattr(node, "name", None) in FUNCTIONS]
    namespace = {"np": np, "torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "train_t2i_discrete.py", "exec"), namespace)
    return namespace


def tiny_eps(weight, bias, x, timesteps, context):
    t = timesteps.float().reshape(-1, 1, 1, 1)
    return torch.tanh(F.conv2d(x, weight, bias, padding=1)) * (0.5 + t / 1000.0) \
        + 0.1 * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uvit", type=Path, required=True, help="checkout of baofff/U-ViT")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    dpm = load_dpm_solver_pp(args.uvit)
    fns = load_training_functions(args.uvit)

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, 3, 3, generator=g) * 0.3
    bias = torch.randn(4, generator=g) * 0.1

    def nnet(x, timesteps, context):
        return tiny_eps(weight, bias, x, timesteps, context)

    betas = fns["stable_diffusion_beta_schedule"]()
    schedule = fns["Schedule"](betas)

    # The training draw: n uniform in 1..N, x_n, and the loss per sample.
    np.random.seed(0)
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    context = torch.randn(3, 5, 6, generator=g)
    n, eps, xn = schedule.sample(x0)
    np.random.seed(0)
    torch.manual_seed(0)
    per_sample_loss = fns["LSimple"](x0, nnet, schedule, context=context)

    # Sampling as train_t2i_discrete.py's dpm_solver_sample, with classifier-free guidance scale 1.
    empty = torch.randn(5, 6, generator=g)
    scale = 1.0
    cases = {}
    for steps in (10, 12, 50):
        z = torch.randn(2, 4, 8, 8, generator=g)
        ctx = torch.randn(2, 5, 6, generator=g)

        def cfg_nnet(x, timesteps):
            cond = nnet(x, timesteps, ctx)
            uncond = nnet(x, timesteps, empty.expand(x.shape[0], -1, -1))
            return cond + scale * (cond - uncond)

        noise_schedule = dpm.NoiseScheduleVP(schedule="discrete", betas=torch.tensor(betas).float())

        def model_fn(x, t_continuous):
            return cfg_nnet(x, t_continuous * schedule.N)

        solver = dpm.DPM_Solver(model_fn, noise_schedule, predict_x0=True, thresholding=False)
        out = solver.sample(z.clone(), steps=steps, eps=1.0 / schedule.N, T=1.0)
        cases[steps] = {"z": z, "context": ctx, "out": out}

    fixture = {
        "weight": weight, "bias": bias, "betas": torch.from_numpy(betas),
        "cum_alphas": torch.from_numpy(schedule.cum_alphas), "cum_betas": torch.from_numpy(schedule.cum_betas),
        "train": {"x0": x0, "context": context, "n": n, "eps": eps, "xn": xn, "loss": per_sample_loss},
        "empty_context": empty, "guidance_scale": scale, "sampling": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save(fixture, tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(cases)} sampling cases; N = {schedule.N}, "
          f"alpha_bar_N = {schedule.cum_alphas[-1]:.6g}, sqrt = {math.sqrt(schedule.cum_alphas[-1]):.4g})")


if __name__ == "__main__":
    main()
