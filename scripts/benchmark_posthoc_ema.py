"""What post-hoc EMA costs per training step and on disk, in one process, interleaved.

    python scripts/benchmark_posthoc_ema.py [--rounds 30] [hydra overrides ...]

With no overrides the network is the quickstart's (digits, small UNet, batch 64). Each round times
one training step (forward, backward, AdamW) of the network, the update of the tracked averages
(two power-function EMAs, EDM2's default) and the run's own EMA update, back to back, so the
ratios share the machine's load. It also times writing one snapshot (fp16, atomically) and
prints its size: the storage of a run is that times max_steps / ema.posthoc.every_n_steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch

    from scalelong.cli.train import build_module
    from scalelong.config import compose, to_plain
    from scalelong.diffusion import noise_prediction_loss
    from scalelong.training.posthoc_ema import PostHocEMA, PowerAverages

    config = to_plain(compose(list(args.overrides), "."))
    module = build_module(config)
    net, sde = module.net, module.sde
    optimizer = module.optimizer_factory(net.parameters())
    batch = int(config["train"]["batch_size"])
    shape = (batch, *module.space.image_shape)
    x0 = torch.randn(shape)
    averages = PowerAverages(net, [PostHocEMA(".", (s,)).gammas[0] for s in (0.05, 0.10)])
    times = {"training step": [], "two tracked power EMAs": [], "the run's own EMA": []}
    for step in range(1, args.rounds + 2):
        t0 = time.perf_counter()
        loss = noise_prediction_loss(net, x0, sde)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter()
        averages.update(net, step)
        t2 = time.perf_counter()
        module.ema.update(net, step)
        t3 = time.perf_counter()
        if step > 1:  # the first round warms up
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(seconds)
    callback = PostHocEMA(Path(tempfile.mkdtemp()) / "ema_snapshots", (0.05, 0.10), every_n_steps=1)
    callback.averages = averages
    saves = []
    for step in range(5):
        t0 = time.perf_counter()
        path = callback.save_snapshot(net, step + 1)
        saves.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in net.parameters())
    step_s = statistics.median(times["training step"])
    print(f"{params / 1e6:.2f}M parameters, batch {batch}, {args.rounds} rounds (medians, interleaved):")
    for key, values in times.items():
        m = statistics.median(values)
        print(f"  {key}: {m * 1e3:.2f} ms" + ("" if key == "training step" else f" = {m / step_s:.2%} of a step"))
    size = path.stat().st_size
    print(f"  one snapshot (two EMAs, fp16): {size / 1e6:.2f} MB, written in {statistics.median(saves) * 1e3:.1f} ms "
          f"= {statistics.median(saves) / step_s:.2f} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
