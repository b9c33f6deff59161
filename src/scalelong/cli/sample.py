"""``scalelong-sample`` / ``python scripts/sample.py``: samples of a checkpoint's EMA model, a grid
PNG and an ``.npz`` (usage: ``--help``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


USAGE = """``scalelong-sample`` / ``python scripts/sample.py``: samples of a checkpoint's EMA model, a grid
PNG and an ``.npz`` of uint8 images.

    scalelong-sample outputs/runs/<run>/checkpoints/last.ckpt --sampler dpm_solver --steps 50 --num 100

Writes ``<run>/samples/<sampler>_<steps>steps_<num>.png`` and ``.npz`` (key ``samples``:
N x H x W x C uint8), unless ``--out`` names another path (its suffix is replaced). The ``.npz``
holds the samples as the network drew them; the grid shows them as the run's end did, resized to
its ``quick_eval.size`` where it set one (the quickstart's 8x8 digits as 16x16 ones).

Text-to-image checkpoints (MS-COCO) condition sample i on a caption of a random image of the
features' val split, as evaluation does (``--contexts``, default the checkpoint's
``dataset.data_dir``), with guidance ``--guidance`` (default: the data set's). Latents are decoded
by ``--decoder`` (default ``dataset.decoder``); without one the grid previews three latent channels.

``--skip-scale`` multiplies the long skips while sampling, on top of the strategy the checkpoint
was trained with (training-free, as Skip-Tuning): one factor (``0.9``), a schedule linear from the
outermost to the innermost skip (``1.0:0.8``), or one factor per skip, outermost first
(``1,0.95,0.9,...``). The default file names then end in ``_skip<scale>``.

``--precision bf16`` runs the network under bf16 autocast, ``fp32`` in float32 (with TF32 on CUDA);
the default is bf16 on CUDA and fp32 on the CPU. The sampler's arithmetic is float32 either way.
"""


def parse_args(argv=None) -> argparse.Namespace:
    from scalelong.diffusion import SAMPLERS

    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--sampler", default="euler_ode", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50, help="network evaluations")
    p.add_argument("--num", type=int, default=100, help="number of samples")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of the EMA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the data set's sample.guidance_scale, else 0)")
    p.add_argument("--contexts", type=Path, default=None, help="text-to-image: the caption features folder")
    p.add_argument("--context-split", default=None, help="its split (default: val)")
    p.add_argument("--decoder", default=None, help="latent models: the autoencoder (diffusers folder or hub id)")
    p.add_argument("--decoder-subfolder", default=None)
    p.add_argument("--skip-scale", default=None, metavar="SCALE",
                   help="sampling-time factor of the long skips: 0.9, outer:inner (1.0:0.8) or one per skip "
                        "outermost first (1,0.95,0.9)")
    p.add_argument("--precision", default=None, metavar="fp32|bf16",
                   help="the network's precision (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from scalelong.cli import fail, skip_the_last_collection
    from scalelong.utils.errors import ConfigError
    from scalelong.utils.io import atomic_write, grid_image
    from scalelong.metrics.evaluation import caption_contexts
    from scalelong.model import DiffusionModel
    from scalelong.models.compile import compile_for_sampling
    from scalelong.precision import sampling_precision
    from scalelong.scaling.sampling_time import parse_skip_scale
    from scalelong.training.end_of_run import as_shown_at_end

    skip_the_last_collection()
    if args.num < 1 or args.steps < 1:
        fail("--num and --steps must be at least 1")
    try:
        skip_scale = None if args.skip_scale is None else parse_skip_scale(args.skip_scale)
    except ConfigError as err:
        fail(f"--skip-scale: {err}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        precision = sampling_precision(device, args.precision)
    except ConfigError as err:
        fail(str(err))
    try:
        model = DiffusionModel.from_checkpoint(args.checkpoint, device)
        compile_for_sampling(model, args.num, args.steps)  # model.compile of the run (auto: long CUDA sampling)
        if args.decoder:
            model.set_decoder(args.decoder, args.decoder_subfolder)
        contexts = caption_contexts(model.config["dataset"], args.contexts, args.context_split, args.seed) \
            if model.text_conditional else None
        guidance = args.guidance if args.guidance is not None else model.config.get("sample", {}).get(
            "guidance_scale", 0.0)
        start = time.perf_counter()
        images = model.generate(args.num, args.sampler, args.steps, seed=args.seed, use_ema=not args.no_ema,
                                 batch_size=args.batch_size, progress=True, guidance_scale=float(guidance or 0.0),
                                 contexts=None if contexts is None else contexts(torch.arange(args.num)),
                                 skip_scale=skip_scale, precision=precision)
    except ConfigError as err:
        fail(str(err))
    took = time.perf_counter() - start
    suffix = "" if skip_scale is None else f"_skip{skip_scale.label}"
    out = args.out or (args.checkpoint.resolve().parent.parent / "samples"
                       / f"{args.sampler}_{args.steps}steps_{args.num}{suffix}")
    png, npz = out.with_suffix(".png"), out.with_suffix(".npz")
    shown = as_shown_at_end(images[:min(args.num, 400)], model.config)
    try:  # a full disk or an unwritable folder: one line (OutputError), the previous files intact
        # The samples are written whole (flushed) before the grid, and the grid replaces its old
        # version before the samples do: a failed write leaves the previous pair, not a new grid
        # beside old samples. (Nested, each file's error names that file.)
        with atomic_write(npz) as npz_file:
            np.savez(npz_file, samples=images.permute(0, 2, 3, 1).numpy())
            npz_file.flush()
            with atomic_write(png) as png_file:
                grid_image(shown).save(png_file, format="PNG")
    except ConfigError as err:
        fail(str(err))
    print(f"{args.num} samples in {took:.1f}s ({args.num / took:.1f} img/s, network in {precision}) -> {png}, {npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
