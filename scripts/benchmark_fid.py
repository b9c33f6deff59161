"""How fast FID evaluation runs here: Inception features/s and sampling network evaluations/s.

    python scripts/benchmark_fid.py [--device cuda] [--images 48] [--batch 16] [--checkpoint CKPT]
                                    [--model-overrides model=uvit dataset=digits ...]

Inception: ``--images`` digits upscaled by clean-fid's resize and fed to the network in batches of
``--batch`` (after one warm-up batch), timed apart: resize/s, network/s and both together.
Sampling: one batch of ``--sample-batch`` samples for ``--sample-steps`` network evaluations
(euler_ode) with the checkpoint's EMA model, or with a freshly initialised model composed from
``conf/`` (the quickstart's by default), reported as network evaluations (samples x steps) per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--mode", default="clean")
    p.add_argument("--inception", default=None, help="Inception weights file")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="resize threads")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--model-overrides", nargs="*", default=[])
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--skip-inception", action="store_true")
    p.add_argument("--skip-sampling", action="store_true")
    return p.parse_args(argv)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_inception(args, device) -> None:
    import torch

    from scalelong.data import load_digits_images
    from scalelong.metrics.features import throughput
    from scalelong.metrics.inception import load_inception

    extractor = load_inception(args.mode, args.inception, device)
    digits = load_digits_images(32).images
    images = digits[torch.arange(args.images) % len(digits)]
    throughput(images[:args.batch], extractor, args.batch, args.workers)  # warm-up (TorchScript profiling)
    r = throughput(images, extractor, args.batch, args.workers)
    print(f"inception ({args.mode}, {device}, batch {args.batch}, {args.images} images, sha1 {extractor.sha1[:12]}): "
          f"resize {r['resize_per_s']:.1f}/s, network {r['network_per_s']:.1f}/s, "
          f"together {r['total_per_s']:.1f} features/s", flush=True)


def bench_sampling(args, device) -> None:

    from scalelong.build import build_network, build_schedule, build_space
    from scalelong.config import compose, to_plain
    from scalelong.model import DiffusionModel

    if args.checkpoint is not None:
        module = DiffusionModel.from_checkpoint(args.checkpoint, device)
        what = str(args.checkpoint)
    else:
        cfg = to_plain(compose(args.model_overrides))
        net = build_network(cfg["model"], cfg["scaling"], cfg["dataset"]).to(device).eval()
        module = DiffusionModel(net, net, build_schedule(cfg["diffusion"]), build_space(cfg["dataset"]))
        what = f"{cfg['model']['_target_'].rsplit('.', 1)[-1]} for {cfg['dataset']['name']} (untrained)"
    params = sum(p.numel() for p in module.net.parameters())
    module.generate(args.sample_batch, "euler_ode", 1, seed=0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    module.generate(args.sample_batch, "euler_ode", args.sample_steps, seed=0)
    _sync(device)
    took = time.perf_counter() - t0
    nfe = args.sample_batch * args.sample_steps
    print(f"sampling ({what}, {params / 1e6:.2f}M parameters, {device}, batch {args.sample_batch}, "
          f"{args.sample_steps} steps): {nfe / took:.1f} network evaluations/s "
          f"({args.sample_batch / took:.2f} samples/s at this step count)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from scalelong.cli import fail
    from scalelong.utils.errors import ConfigError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if torch.device(device).type == "cuda" else ""), flush=True)
    try:
        if not args.skip_inception:
            bench_inception(args, device)
        if not args.skip_sampling:
            bench_sampling(args, device)
    except ConfigError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
