"""``scalelong-evaluate`` / ``python scripts/evaluate.py``: FID and KID of a checkpoint by its data set's
protocol, on every available device (usage: ``--help``)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path


USAGE = """FID and KID of a checkpoint's EMA model against reference statistics, on every available device.

    scalelong-evaluate outputs/runs/<run>/checkpoints/last.ckpt --num 50000 \\
        --sampler euler_maruyama --steps 1000 [--mode clean] [--ref PATH]
    torchrun --nproc_per_node 8 scripts/evaluate.py CKPT --num-samples 50000 ...   # or just several GPUs

Under torchrun each rank draws a disjoint share of the samples; without it, a machine with several
GPUs starts one process per GPU itself (``--devices`` limits that). The total is exactly
``--num`` and sample i is the same for any number of processes (fixed-size chunks, one seed per
chunk). Features are reduced as float64 sums; images never leave their process.

Output folder (``--out``, default ``<run>/eval/<checkpoint>_<sampler>_<steps>steps_<num>``):
``samples_rank000.npz`` ... (keys ``indices`` and ``samples``: N x H x W x C uint8), ``grid.png``
(up to 100 of rank 0's samples, shown as the run's final.png showed them: at its
``quick_eval.size`` where it set one) and ``fid.json``: the value (``fid``, also as ``value``), kid,
sample count, sampler and steps, guidance scale, mode, the reference statistics file and its
sha1, the Inception weights' sha1, the checkpoint and its step.

Defaults come from the checkpoint's data set config (``dataset.fid``: final_samples, final_sampler,
final_steps, guidance_scale, reference_split), else 50000 samples, euler_maruyama, 1000 steps.
Reference statistics default to ``<cache>/fid_stats/{dataset}_{mode}_{split}_{res}.npz`` for the
checkpoint's data set and reference split (see ``scripts/make_fid_stats.py``).

``--precision bf16`` runs the network under bf16 autocast, ``fp32`` in float32; the default is bf16
on CUDA and fp32 on the CPU (``fid.json`` records it). The sampler's arithmetic is float32 either
way; on CUDA the float32 parts (Inception too) use TF32.

MS-COCO text-to-image (U-ViT's protocol: 30k samples, DPM-Solver 50 steps, guidance 1, against
val2014 at 256 px): sample i is conditioned on a random caption of a random val2014 image, read
from the val split of the caption features (``--contexts``, default the checkpoint's
``dataset.data_dir``), and its latents are decoded by the autoencoder (``--decoder``, default
the checkpoint's ``dataset.decoder``)::

    python scripts/make_fid_stats.py dataset=mscoco dataset.coco_dir=/data/coco     # once
    python scripts/evaluate.py CKPT --contexts /data/coco256_features         --decoder CompVis/stable-diffusion-v1-4 --decoder-subfolder vae

Sampling-time skip scaling (training-free, as Skip-Tuning; on top of the trained strategy):
``--skip-scale`` takes one factor (``0.9``), a schedule linear from the outermost to the innermost
long skip (``1.0:0.8``) or one factor per skip, outermost first (``1,0.95,0.9,...``). One value
evaluates with it (default folder ``..._skip<scale>``, ``fid.json`` records it). Several values
(``--skip-scale 1 0.9 0.8``, or the option repeated) sweep them with one Inception network and one
reference: each value's files go to ``skip_<scale>/`` of the output folder (default
``..._skipsweep``), and ``skip_scale.md``, ``skip_scale.json`` and ``skip_scale.png`` tabulate and
plot FID and KID against the scale::

    python scripts/evaluate.py CKPT --num 10000 --sampler dpm_solver --steps 10 --skip-scale 1 0.95 0.9 0.85 1.0:0.8
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--num", "--num-samples", "-n", dest="num", type=int, default=None,
                   help="number of samples, exact over all processes (default: the data set's "
                        "fid.final_samples, else 50000); under torchrun write --num-samples, as torchrun "
                        "takes --num for its own --numa-binding")
    p.add_argument("--sampler", default=None, help="default: the data set's fid.final_sampler, else euler_maruyama")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per sample (default: the data set's fid.final_steps, else 1000)")
    p.add_argument("--mode", default="clean", help="clean or legacy_pytorch")
    p.add_argument("--ref", type=Path, default=None, help="reference statistics (.npz)")
    p.add_argument("--inception", type=Path, default=None, help="Inception weights file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=250, help="samples per generate call and seed")
    p.add_argument("--feature-batch", type=int, default=50)
    p.add_argument("--kid-max", type=int, default=5000, help="samples kept for KID (0: no KID)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the data set's fid.guidance_scale)")
    p.add_argument("--workers", type=int, default=4, help="threads resizing images for Inception")
    p.add_argument("--devices", type=int, default=None, help="GPUs to use without torchrun (default: all)")
    p.add_argument("--device", default=None, help="force one device (cpu, cuda:1); one process")
    p.add_argument("--contexts", type=Path, default=None,
                   help="text-to-image: the caption features folder (default: the checkpoint's dataset.data_dir)")
    p.add_argument("--context-split", default=None, help="its split (default: dataset.fid.context_split, else val)")
    p.add_argument("--decoder", default=None,
                   help="latent models: the autoencoder, a diffusers folder or hub id (default: dataset.decoder)")
    p.add_argument("--decoder-subfolder", default=None, help="e.g. vae for a whole Stable Diffusion repository")
    p.add_argument("--skip-scale", nargs="+", action="extend", default=None, metavar="SCALE",
                   help="sampling-time factor(s) of the long skips: 0.9, outer:inner (1.0:0.8) or one per skip "
                        "outermost first (1,0.95,0.9); several values sweep them")
    p.add_argument("--precision", default=None, metavar="fp32|bf16",
                   help="the network's precision while sampling (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-save-samples", action="store_true")
    return p.parse_args(argv)


def out_dir(args: argparse.Namespace, scales: list | None = None) -> Path:
    if args.out is not None:
        return args.out
    run = args.checkpoint.resolve().parent.parent
    suffix = "" if not scales else f"_skip{scales[0].label}" if len(scales) == 1 else "_skipsweep"
    return run / "eval" / f"{args.checkpoint.stem}_{args.sampler}_{args.steps}steps_{args.num}{suffix}"


def run(args: argparse.Namespace, device: str) -> int:
    from scalelong.diffusion import SAMPLERS
    from scalelong.metrics.evaluation import FIDEvaluator
    from scalelong.model import DiffusionModel
    from scalelong.models.compile import compile_for_sampling
    from scalelong.precision import sampling_precision
    from scalelong.scaling.sampling_time import parse_skip_scale
    from scalelong.utils.distributed import rank_and_world
    from scalelong.utils.errors import ConfigError

    rank, world = rank_and_world()
    args.precision = sampling_precision(device, args.precision)  # a bad value stops before the checkpoint loads
    scales = [parse_skip_scale(v) for v in args.skip_scale or []]
    if len({s.text for s in scales}) != len(scales):
        raise ConfigError(f"--skip-scale lists a value twice ({' '.join(s.text for s in scales)}); give each once")
    model = DiffusionModel.from_checkpoint(args.checkpoint, device)
    num_skips = getattr(getattr(model.ema_net, "skip_scaling", None), "num_skips", 0) or 0
    if scales and not num_skips:
        raise ConfigError(f"--skip-scale needs a network with long skips merged through `skip_scaling`; this "
                          f"checkpoint's {type(model.ema_net).__name__} has none")
    for scale in scales:  # a list of the wrong length fails now, not after the first evaluations
        scale.factors(num_skips)
    protocol = model.config["dataset"].get("fid") or {}  # the data set's evaluation protocol, where it has one
    args.num = args.num if args.num is not None else int(protocol.get("final_samples", 50000))
    args.sampler = args.sampler or protocol.get("final_sampler", "euler_maruyama")
    args.steps = args.steps if args.steps is not None else int(protocol.get("final_steps", 1000))
    if args.num < 2 or args.steps < 1 or args.chunk_size < 1:
        raise ConfigError("--num must be at least 2, --steps and --chunk-size at least 1")
    if args.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {args.sampler!r} is not a sampler; valid: {', '.join(sorted(SAMPLERS))}")
    guidance = args.guidance if args.guidance is not None else protocol.get("guidance_scale")
    compile_for_sampling(model, args.num, args.steps)  # model.compile of the run (auto: long CUDA evaluations)
    evaluate = FIDEvaluator(model, mode=args.mode, ref=args.ref, inception_weights=args.inception, device=device,
                            kid_max=args.kid_max, feature_batch=args.feature_batch, contexts_dir=args.contexts,
                            context_split=args.context_split, decoder=args.decoder,
                            decoder_subfolder=args.decoder_subfolder, seed=args.seed)
    folder = out_dir(args, scales)
    if rank == 0:
        print(f"{args.num} samples ({args.sampler}, {args.steps} steps, network in {args.precision}) on {world} "
              f"process(es); "
              f"{evaluate.extractor.weights.describe()}; reference {evaluate.ref_path}", flush=True)
    if len(scales) <= 1:
        evaluate_once(args, model, evaluate, guidance, folder, scales[0] if scales else None)
        return 0
    reports = []
    for scale in scales:
        if rank == 0:
            print(f"skip scale {scale.text}:", flush=True)
        reports.append(evaluate_once(args, model, evaluate, guidance, folder / f"skip_{scale.label}", scale))
    if rank == 0:
        write_sweep(folder, reports)
    return 0


def evaluate_once(args: argparse.Namespace, model, evaluate, guidance, folder: Path, skip_scale) -> dict | None:
    """One evaluation into ``folder`` (samples, grid, fid.json); rank 0 returns the fid.json record."""
    import numpy as np
    import torch

    from scalelong.training.end_of_run import as_shown_at_end
    from scalelong.utils.distributed import barrier, rank_and_world
    from scalelong.utils.io import save_image_grid, save_npz, write_text

    rank, world = rank_and_world()
    extractor, ref, ref_path = evaluate.extractor, evaluate.ref, evaluate.ref_path
    kept: list = []

    def on_chunk(indices, images):
        if not args.no_save_samples or (rank == 0 and not kept):
            kept.append((indices, images))

    result = evaluate(args.num, args.sampler, args.steps, args.seed, args.chunk_size, float(guidance or 0.0),
                      args.workers, on_chunk, skip_scale=skip_scale, precision=args.precision)
    files = []
    if not args.no_save_samples and kept:
        indices = torch.cat([i for i, _ in kept]).numpy()
        images = torch.cat([x for _, x in kept])
        npz = save_npz(folder / f"samples_rank{rank:03d}.npz", indices=indices,
                       samples=images.permute(0, 2, 3, 1).numpy())
        files.append(npz.name)
    files = [f for part in _gather_names(files) for f in part]
    barrier()
    if rank != 0:
        return None
    first = torch.cat([x for _, x in kept])[:100] if kept else None
    if first is not None:
        save_image_grid(as_shown_at_end(first, model.config), folder / "grid.png")
    num_skips = getattr(getattr(model.ema_net, "skip_scaling", None), "num_skips", 0) or 0
    report = {
        "metric": "FID", "value": result["fid"], "fid": result["fid"],
        "kid": result["kid"], "kid_std": result["kid_std"],
        "kid_subset_size": result["kid_subset_size"], "num": result["num"],
        "sampler": args.sampler, "steps": args.steps, "precision": result["precision"],
        "guidance_scale": None if guidance is None else float(guidance),
        "skip_scale": None if skip_scale is None else skip_scale.text,
        "skip_factors": None if skip_scale is None else skip_scale.factors(num_skips),
        "seed": args.seed, "chunk_size": args.chunk_size, "world_size": world,
        "mode": result["mode"], "ref": str(Path(ref_path).resolve()), "ref_sha1": result["ref_sha1"],
        "ref_num": ref.num, "inception_sha1": result["inception_sha1"],
        "inception_weights": str(extractor.weights.path), "inception_source": extractor.weights.source,
        "checkpoint": str(args.checkpoint.resolve()), "checkpoint_step": model.step,
        "use_ema": True, "conditions": result["conditions"],
        "decoder": model.decoder_name if model.latent_scale else None,
        "decoder_subfolder": model.decoder_subfolder if model.latent_scale else None,
        "samples": sorted(files), "seconds": result["seconds"], "warnings": result["warnings"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in report.items()}
    write_text(folder / "fid.json", json.dumps(report, indent=2) + "\n")
    kid = "" if result["kid"] is None else f", KID {result['kid']:.5f}"
    print(f"FID {result['fid']:.3f}{kid} on {result['num']} samples -> {folder / 'fid.json'}", flush=True)
    return report


def write_sweep(folder: Path, reports: list[dict]) -> None:
    """``skip_scale.md`` (a table), ``skip_scale.json`` (the rows) and ``skip_scale.png`` (FID and
    KID against the scale) of a sweep over sampling-time skip scales."""
    from scalelong.utils.io import write_bytes, write_text

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    first = reports[0]
    lines = ["# FID and KID against the sampling-time skip scale\n",
             f"{first['checkpoint']} (step {first['checkpoint_step']}), {first['num']} samples, {first['sampler']} "
             f"{first['steps']} steps, {first['mode']} Inception, reference {first['ref']}.\n",
             "| skip scale | factors (outermost first) | FID | KID | KID std |", "|---|---|---|---|---|"]
    rows = []
    for r in reports:
        factors = ", ".join(f"{f:.4g}" for f in r["skip_factors"])
        lines.append(f"| {r['skip_scale']} | {factors} | {number(r['fid'], 3)} | {number(r['kid'], 5)} | "
                     f"{number(r['kid_std'], 5)} |")
        rows.append({k: r[k] for k in ("skip_scale", "skip_factors", "fid", "kid", "kid_std", "num")})
    write_text(folder / "skip_scale.md", "\n".join(lines) + "\n")
    write_text(folder / "skip_scale.json", json.dumps(rows, indent=2) + "\n")
    write_bytes(folder / "skip_scale.png", sweep_plot(reports))
    print(f"skip scale sweep: {len(reports)} values -> {folder / 'skip_scale.md'}", flush=True)


def sweep_plot(reports: list[dict]) -> bytes:
    """PNG bytes: FID (left axis) and KID (right axis) per skip scale; a numeric axis when every
    scale is one factor, else the scales as labels in the order given."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelong.scaling.sampling_time import parse_skip_scale

    numbers = [parse_skip_scale(r["skip_scale"]).number for r in reports]
    numeric = all(n is not None for n in numbers)
    x = numbers if numeric else list(range(len(reports)))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(x, [r["fid"] for r in reports], "o-", color="tab:blue", label="FID")
    ax.set_ylabel("FID", color="tab:blue")
    ax.set_xlabel("sampling-time skip factor" if numeric else "sampling-time skip scale (outer:inner or per skip)")
    if not numeric:
        ax.set_xticks(x, [r["skip_scale"] for r in reports], rotation=30, ha="right")
    kids = [r["kid"] for r in reports]
    if all(k is not None for k in kids):
        right = ax.twinx()
        right.plot(x, kids, "s--", color="tab:orange", label="KID")
        right.set_ylabel("KID", color="tab:orange")
    ax.set_title(f"{reports[0]['num']} samples, {reports[0]['sampler']} {reports[0]['steps']} steps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _gather_names(names: list[str]) -> list[list[str]]:
    import torch.distributed as dist

    from scalelong.utils.distributed import is_distributed

    if not is_distributed():
        return [names]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, names)
    return out


def _main_guarded(args: argparse.Namespace, device: str) -> int:
    from scalelong.cli import fail
    from scalelong.utils.errors import ConfigError

    try:
        return run(args, device)
    except ConfigError as err:
        fail(str(err))
    return 1


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=local_rank, world_size=world, device_id=torch.device("cuda", local_rank))
    try:
        code = _main_guarded(args, f"cuda:{local_rank}")
    finally:
        dist.destroy_process_group()
    if code:
        raise SystemExit(code)


def main(argv=None) -> int:
    args = parse_args(argv)
    from scalelong.cli import skip_the_last_collection

    skip_the_last_collection()
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
            device = f"cuda:{local}"
        else:
            dist.init_process_group("gloo")
            device = "cpu"
        try:
            return _main_guarded(args, device)
        finally:
            dist.destroy_process_group()
    if args.device is None and torch.cuda.device_count() > 1 and (args.devices or 2) > 1:
        world = min(args.devices or torch.cuda.device_count(), torch.cuda.device_count())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(world, port, args), nprocs=world, join=True)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return _main_guarded(args, device)


if __name__ == "__main__":
    sys.exit(main())
