"""What ``model.compile`` costs and gains: compile time, step time against eager, and the largest
output difference, for ``compile_scope`` whole and blocks, in one process.

    python scripts/benchmark_compile.py                                  # CPU: unet_tiny, uvit_tiny
    python scripts/benchmark_compile.py --presets ddpm_cifar10,uvit_s2_32 --batch 128 --precision bf16

Each scope compiles a fresh copy of the network with Inductor's caches off (a cold compile, as
on a new machine); the compile time is the first training step (forward + backward) minus an
eager step. Then eager and compiled steps alternate for ``--rounds`` rounds: the ratio is the
median of the per-round ratios (quartiles beside it). The difference is that of the outputs
and of the parameters' gradients of one step, against eager, largest absolute.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # cold compiles, before torch loads Inductor

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmark.py beside this file
from benchmark import _sync as sync  # noqa: E402
from benchmark import autocast  # noqa: E402
from scalelong.models import from_preset  # noqa: E402
from scalelong.models.compile import compile_network  # noqa: E402


def make_step(net, x, t, precision: str):
    def step():
        net.zero_grad(set_to_none=True)
        with autocast(x.device, precision):
            out = net(x, t)
        F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)).backward()
        return out.detach().float()
    return step


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (Inductor's C++ compiler runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="unet_tiny,uvit_tiny")
    p.add_argument("--scopes", default="blocks,whole")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":  # C++ builds in this process's children, so their CPU time is counted
        torch._inductor.config.compile_threads = 1
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.precision}, "
          f"batch {args.batch}, {args.rounds} interleaved rounds, Inductor caches off", flush=True)
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        # zero_init off: zero-initialised heads would make every output 0 and hide differences
        base = from_preset(preset, scaling="learnable", zero_init=False, dropout=0.0).to(device).train()
        shape = (base.in_chans, base.img_size, base.img_size)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, *shape, generator=g).to(device)
        t = (torch.rand(args.batch, generator=g) * 999).to(device)
        eager_step = make_step(base, x, t, args.precision)
        eager_step()
        eager_s = timed(eager_step, device)
        ref_out = eager_step()
        ref_grads = [q.grad.float().clone() for q in base.parameters()]
        for scope in args.scopes.split(","):
            torch._dynamo.reset()
            net = copy.deepcopy(base)
            compile_network(net, args.mode, scope)
            step = make_step(net, x, t, args.precision)
            cpu0 = cpu_seconds()
            first = timed(step, device)
            compile_cpu = cpu_seconds() - cpu0
            out = step()
            diff_out = (out - ref_out).abs().max().item()
            diff_grad = max((q.grad.float() - r).abs().max().item() for q, r in zip(net.parameters(), ref_grads))
            same_keys = list(net.state_dict()) == list(base.state_dict())
            ratios, times = [], []
            for r in range(args.rounds):
                pair = [("e", eager_step), ("c", step)][:: 1 if r % 2 == 0 else -1]
                got = {k: timed(fn, device) for k, fn in pair}
                ratios.append(got["c"] / got["e"])
                times.append(got)
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"{preset:12s} scope={scope:6s} compile_s={first - eager_s:7.1f} first_step_cpu_s={compile_cpu:7.1f} "
                  f"eager_ms={1000 * statistics.median(t_['e'] for t_ in times):8.1f} "
                  f"compiled_ms={1000 * statistics.median(t_['c'] for t_ in times):8.1f} "
                  f"ratio={statistics.median(ratios):.3f} (q {q[0]:.3f}-{q[2]:.3f}) "
                  f"max_abs_diff_out={diff_out:.2e} grads={diff_grad:.2e} same_state_dict_keys={same_keys}",
                  flush=True)
            del net, step
    return 0


if __name__ == "__main__":
    sys.exit(main())
