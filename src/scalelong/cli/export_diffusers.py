"""``scalelong-export-diffusers`` / ``python scripts/export_diffusers.py``: the network of a
``model=diffusers_unet_*`` checkpoint as a diffusers ``UNet2DModel`` folder (usage: ``--help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """Export a checkpoint of a diffusers-UNet run to a folder that diffusers loads.

    scalelong-export-diffusers outputs/runs/<run>/checkpoints/last.ckpt [OUT] [--no-ema] [--drop-strategy]

Writes ``UNet2DModel.save_pretrained``'s files (``config.json``, ``diffusion_pytorch_model.safetensors``)
and ``scalelong_export.json`` (the checkpoint, its step, the weights exported, the strategy, the
run's noise schedule) into OUT (default ``<run>/diffusers/<checkpoint name>``), each file
atomically. Load it with ``diffusers.UNet2DModel.from_pretrained(OUT)``. The EMA weights are
exported unless ``--no-ema``.

The network takes ``timesteps = t * time_input_scale`` (continuous time t in [0, 1] of the run's
schedule; the scale is the schedule's own: 999 for ``linear`` and ``cosine``, N = 1000 for
``sd_discrete`` (its num_steps); both recorded in ``scalelong_export.json``) and predicts the noise.

Only a strategy that leaves the long skips as they are (``none``, or ``constant`` with kappa 1)
exports to exactly the trained network: a plain ``UNet2DModel`` has no place for a skip
coefficient. For any other strategy the export stops with an error, unless ``--drop-strategy``
asks for the trained weights without the strategy (a different network: its outputs differ).
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, nargs="?", default=None,
                   help="the diffusers folder to write (default: <run>/diffusers/<checkpoint name>)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--drop-strategy", action="store_true",
                   help="export the plain UNet2DModel even though the run's strategy changes its long skips")
    return p.parse_args(argv)


def export(checkpoint: Path, out: Path | None = None, use_ema: bool = True, drop_strategy: bool = False) -> Path:
    """Write the diffusers folder of ``checkpoint``; returns it. Bad input raises ``ConfigError``."""
    import json
    import tempfile

    from scalelong.model import DiffusionModel
    from scalelong.models.diffusers_unet import DiffusersUNet
    from scalelong.utils.errors import ConfigError
    from scalelong.utils.io import write_bytes, write_text

    model = DiffusionModel.from_checkpoint(checkpoint, "cpu")
    net = model.ema_net if use_ema else model.net
    if not isinstance(net, DiffusersUNet):
        raise ConfigError(f"{checkpoint} holds a {type(net).__name__}; only runs of a diffusers UNet "
                          "(model=diffusers_unet_tiny, diffusers_unet_cifar10 or any scalelong.models.DiffusersUNet) "
                          "export to diffusers")
    strategy = net.skip_scaling
    exact = net.merges_are_identity()
    if not exact and not drop_strategy:
        raise ConfigError(f"this run's strategy {strategy.name!r} changes the long skips, and a plain UNet2DModel "
                          "has no place for it; the export would compute another network. Export the weights "
                          "without it with --drop-strategy, or train with scaling=none")
    out = out or checkpoint.resolve().parent.parent / "diffusers" / checkpoint.stem
    scale = float(model.sde.time_input_scale)  # what the network saw in training and sees in sampling
    record = {
        "checkpoint": str(checkpoint.resolve()), "checkpoint_step": model.step,
        "weights": "ema" if use_ema else "raw", "strategy": strategy.name,
        "strategy_config": model.config.get("scaling"), "strategy_dropped": not exact,
        "exact": exact, "diffusion": model.config.get("diffusion"),
        "time_input_scale": scale,
        "timesteps": f"t * {scale:g}, t in [0, 1] continuous time of the schedule above; "
                     "the network predicts the noise",
    }
    with tempfile.TemporaryDirectory(prefix="scalelong-export-") as tmp:
        net.unet.save_pretrained(tmp)
        # The weights first and the config last: a folder with a new config.json is complete.
        files = sorted(Path(tmp).iterdir(), key=lambda p: p.name == "config.json")
        for file in files:
            write_bytes(out / file.name, file.read_bytes())
    write_text(out / "scalelong_export.json", json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from scalelong.cli import guarded

    def run() -> int:
        out = export(args.checkpoint, args.out, use_ema=not args.no_ema, drop_strategy=args.drop_strategy)
        weights = "raw" if args.no_ema else "EMA"
        note = " WITHOUT the run's strategy (its outputs differ)" if args.drop_strategy else ""
        print(f"{weights} weights of {args.checkpoint} exported{note} -> {out}; load with "
              f"diffusers.UNet2DModel.from_pretrained('{out}')")
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
