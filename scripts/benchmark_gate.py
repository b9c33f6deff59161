"""What the learnable skip gates cost in a training step, measured interleaved in one process.

    python scripts/benchmark_gate.py                               # UNet ddpm_cifar10, batch 8
    python scripts/benchmark_gate.py --models unet:ddpm_cifar10,uvit:uvit_s2_32 --rounds 20 --profile

``scripts/benchmark.py`` times each strategy in its own block, so a busy or shared machine can
move one strategy's time by more than the few percent the gate costs. Here every round times one
training step (the same ``PlainStep`` as benchmark.py: forward, loss, backward, AdamW, EMA) of
each strategy back to back, in an order that rotates from round to round; the ratio to ``none``
is taken within each round and the median over rounds is reported (with the ratio of the
medians and the quartiles of the per-round ratios). ``--profile`` adds torch.profiler's self-CPU
time per op for one step of each strategy, as the difference to ``none`` (CPU only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import PlainStep, _sync, build, default_shape  # noqa: E402


def interleaved(steps: dict, rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``rounds`` times, the order rotating every round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_summary(times: dict[str, list[float]], base: str = "none") -> dict[str, dict[str, float]]:
    base = base if base in times else next(iter(times))
    out = {}
    for name, ts in times.items():
        per_round = [t / b for t, b in zip(ts, times[base])]
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        out[name] = {"ms_median": 1000 * statistics.median(ts),
                     "ratio_median_of_rounds": statistics.median(per_round),
                     "ratio_of_medians": statistics.median(ts) / statistics.median(times[base]),
                     "ratio_q1": q[0], "ratio_q3": q[2]}
    return out


def profile_diff(steps: dict, base: str = "none", n: int = 3, rows: int = 15) -> None:
    """Self-CPU ms per op and step (mean of ``n`` steps) of each strategy, minus that of ``base``."""
    from torch.profiler import ProfilerActivity, profile

    base = base if base in steps else next(iter(steps))
    self_ms = {name: {} for name in steps}
    for _ in range(n):  # interleaved, like the timings
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for e in prof.key_averages():
                ms, calls = self_ms[name].get(e.key, (0.0, 0))
                self_ms[name][e.key] = (ms + e.self_cpu_time_total / 1000 / n, calls + e.count // n)
    for name, ops in self_ms.items():
        if name == base:
            continue
        total, total_base = sum(v[0] for v in ops.values()), sum(v[0] for v in self_ms[base].values())
        print(f"\n## {name} vs {base}: self CPU {total:.1f} ms vs {total_base:.1f} ms per step (mean of {n})")
        diff = {k: (v[0] - self_ms[base].get(k, (0, 0))[0], v[1] - self_ms[base].get(k, (0, 0))[1])
                for k, v in ops.items()}
        print(f"{'op':45s} {'+ms':>8s} {'+calls':>7s}")
        for k, (ms, calls) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[:rows]:
            print(f"{k[:45]:45s} {ms:8.2f} {calls:7d}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--models", default="unet:ddpm_cifar10", help="backbone:preset,...")
    p.add_argument("--strategies", default="none,learnable,learnable_nonshared")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"batch {args.batch}, {args.rounds} interleaved rounds", flush=True)
    for spec in args.models.split(","):
        backbone, preset = spec.split(":")
        shape = default_shape(backbone, preset)
        steps = {}
        for strategy in args.strategies.split(","):
            torch.manual_seed(0)
            steps[strategy] = PlainStep(build(backbone, preset, strategy, shape), shape, args.batch, device,
                                        args.precision)
        times = interleaved(steps, args.rounds, args.warmup, device)
        for name, row in ratio_summary(times).items():
            print(f"{spec}  {name:20s} " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        if args.profile and device.type == "cpu":
            profile_diff(steps)
        del steps
    return 0


if __name__ == "__main__":
    sys.exit(main())
