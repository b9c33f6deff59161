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

``--one-by-one`` adds an arm ``<strategy>/one_by_one`` for each learnable strategy, whose gates
are computed skip by skip (the UNet's batched ``prepare`` switched off), to compare in one run.
``--gates-alone N`` times the gates alone (forward and backward over every skip), batched
against one by one, N interleaved rounds. ``--count-ops`` counts the aten ops of the gates alone (forward and backward over every skip of
the preset, batched and one by one): on a GPU each op is at least one kernel launch, which is
what the gate costs there. On CUDA (``--precision bf16`` or ``fp16``) the networks run in
channels_last as training does (``model.channels_last``); ``--no-channels-last`` turns it off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from scalelong.precision import tf32_on_cuda

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


# Ops that only make a new view or read metadata: no kernel on a GPU.
VIEW_OPS = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "squeeze", "unsqueeze", "select", "slice", "expand",
    "detach", "t", "transpose", "permute", "as_strided", "alias", "flatten", "split", "split_with_sizes",
    "unbind", "narrow", "view_as", "empty", "empty_like", "empty_strided", "result_type", "promote_types",
    "lift_fresh", "contiguous")}


def gate_step(strategy: str, skip_shapes, batch: int, device: torch.device, precision: str, batched: bool):
    """One forward and backward of ``strategy``'s gates alone over skips of ``skip_shapes``,
    called as the UNet calls them (``prepare`` first when ``batched``)."""
    from benchmark import autocast
    from scalelong.scaling import build_skip_scaling

    s = build_skip_scaling(strategy)
    s.setup(skip_shapes, "channels")
    s.to(device)
    dtype = {"fp32": torch.float32}.get(precision, torch.bfloat16 if precision == "bf16" else torch.float16)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    skips = [torch.randn(batch, *shape, device=device).to(dtype).contiguous(memory_format=layout).requires_grad_(True)
             for shape in skip_shapes]
    upstream = [torch.randn_like(x) for x in skips]

    def step():
        s.zero_grad(set_to_none=True)
        for x in skips:
            x.grad = None
        with autocast(device, precision):
            if batched:
                s.prepare(skips)
            outs = [s(x, i) for i, x in enumerate(skips, start=1)]
        torch.autograd.backward(outs, upstream)
    return step


def count_gate_ops(strategy: str, skip_shapes, batch: int, device: torch.device, precision: str,
                   batched: bool) -> tuple[int, int]:
    """(aten ops, ops that are not views) of one forward and backward of ``strategy``'s gates
    (``gate_step``). Top-level ops only: those that one op calls inside itself are not
    dispatched again from Python."""
    from torch.profiler import ProfilerActivity, profile

    step = gate_step(strategy, skip_shapes, batch, device, precision, batched)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top), sum(name not in VIEW_OPS for name in top)


def time_gates_alone(preset: str, strategies, batch: int, device: torch.device, precision: str, rounds: int) -> None:
    """ms per forward + backward of the gates alone, batched and one by one, interleaved."""
    from scalelong.models import from_preset

    shapes = from_preset(preset).skip_shapes
    steps = {}
    for strategy in strategies:
        if strategy.startswith("learnable"):
            steps[strategy] = gate_step(strategy, shapes, batch, device, precision, batched=True)
            steps[f"{strategy}/one_by_one"] = gate_step(strategy, shapes, batch, device, precision, batched=False)
    times = interleaved(steps, rounds, 3, device)
    print(f"\n## the gates alone, forward + backward, {len(shapes)} skips of {preset}, batch {batch}, {precision}, "
          f"{rounds} interleaved rounds: ms median (quartiles)")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        print(f"{name:32s} {1000 * statistics.median(ts):8.2f} ({1000 * q[0]:.2f}-{1000 * q[2]:.2f})", flush=True)


def print_op_counts(preset: str, strategies, batch: int, device: torch.device, precision: str) -> None:
    from scalelong.models import from_preset

    shapes = from_preset(preset).skip_shapes
    print(f"\n## aten ops of the gates alone, forward + backward, {len(shapes)} skips of {preset}, batch {batch}, "
          f"{precision}")
    print(f"{'strategy':22s} {'batched':>16s} {'one by one':>16s}   (all ops / ops that launch work)")
    for strategy in strategies:
        if not strategy.startswith("learnable"):
            continue
        fused = count_gate_ops(strategy, shapes, batch, device, precision, batched=True)
        single = count_gate_ops(strategy, shapes, batch, device, precision, batched=False)
        print(f"{strategy:22s} {fused[0]:>7d} / {fused[1]:<6d} {single[0]:>7d} / {single[1]:<6d}", flush=True)


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
    p.add_argument("--one-by-one", action="store_true", help="add each learnable strategy with its gates unbatched")
    p.add_argument("--count-ops", action="store_true", help="count the gates' aten ops (UNet presets)")
    p.add_argument("--no-channels-last", action="store_true", help="on CUDA, keep the UNet in NCHW")
    p.add_argument("--gates-alone", type=int, default=0, metavar="ROUNDS",
                   help="also time the gates alone, batched against one by one (UNet presets)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"batch {args.batch}, {args.rounds} interleaved rounds", flush=True)
    with tf32_on_cuda(device):  # fp32 matmuls and convolutions in TF32 on CUDA, as benchmark.py
        measure(args, device)
    return 0


def measure(args, device: torch.device) -> None:
    """Each model's strategies interleaved, their ratios printed (and what the flags add)."""
    strategies = args.strategies.split(",")
    for spec in args.models.split(","):
        backbone, preset = spec.split(":")
        shape = default_shape(backbone, preset)
        channels_last = device.type == "cuda" and backbone == "unet" and not args.no_channels_last
        steps = {}
        arms = [(st, False) for st in strategies] if args.rounds > 0 else []  # --rounds 0: op counts only
        if args.one_by_one:
            arms += [(st, True) for st in strategies if st.startswith("learnable")]
        for strategy, one_by_one in arms:
            torch.manual_seed(0)
            net = build(backbone, preset, strategy, shape)
            if one_by_one:
                net.skip_scaling.prepare = None  # the UNet then gates each skip on its own
            name = f"{strategy}/one_by_one" if one_by_one else strategy
            steps[name] = PlainStep(net, shape, args.batch, device, args.precision, channels_last=channels_last)
        times = interleaved(steps, args.rounds, args.warmup, device) if steps else {}
        for name, row in (ratio_summary(times) if times else {}).items():
            print(f"{spec}  {name:20s} " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        if args.profile and device.type == "cpu":
            profile_diff(steps)
        del steps
        if args.count_ops and backbone == "unet":
            print_op_counts(preset, strategies, args.batch, device, args.precision)
        if args.gates_alone and backbone == "unet":
            time_gates_alone(preset, strategies, args.batch, device, args.precision, args.gates_alone)


if __name__ == "__main__":
    sys.exit(main())
