"""The quickstart's recipe against others, side by side: legibility, KID and CPU time.

    python scripts/compare_quickstart_recipes.py --seeds 1 2 3 --out outputs/quickstart_recipes

Each recipe is ``python train.py`` (the quickstart as ``make quickstart`` runs it) plus its
overrides; the runs are interleaved (seed 1 of every recipe, then seed 2, ...) so that a machine
whose load changes slows them alike. Per run it records the CPU time of the training process
(user + sys, which another job on a shared CPU inflates far less than wall time), the wall time,
and from quick_eval.json the samples' legibility and KID. ``results.json`` grows run by run (a
stopped comparison keeps what it measured and skips it when run again); ``recipes.md`` is the
table: legibility mean and spread over the seeds, KID, CPU time, and the quiet wall time expected
from the CPU ratio to the ``REFERENCE`` recipe and its measured quiet wall time (``--reference-wall``).

``--scale 0.02`` shortens every recipe's steps (a check that the comparison runs, not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scalelong.utils.io import write_text

ROOT = Path(__file__).resolve().parents[1]

def on(base: list[str], *more: str) -> list[str]:
    """``base`` with ``more`` on top: an override of a key already in ``base`` replaces it (Hydra
    refuses two values for one key)."""
    keys = {o.split("=", 1)[0] for o in more}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(more)


# The quickstart of 2026-12-04, before issue 28 (commit 25f6422), as overrides of today's: 300 steps
# on the linear VP-SDE at a constant rate, no clipping. The screens below that named no schedule
# ran on top of it.
# Every recipe before the 8x8 quickstart drew 16x16 digits on the schedule as it is, and scored them
# at that size (SIXTEEN).
SIXTEEN = ["dataset.image_size=16", "diffusion.snr_shift=1", "quick_eval.size=null"]
BEFORE = [*SIXTEEN, "train.batch_size=64", "train.max_steps=300", "diffusion.schedule=linear", "train.lr_decay=null",
          "train.grad_clip=null", "checkpoint.every_n_steps=150"]
# The recipe of commit dd37cb3 (the quickstart before the speed-up): the 1.1M-parameter UNet with
# attention and dropout, 1,500 steps at lr 1e-3, 100 warm-up steps and EMA without warm-up. Its
# sampler then (Euler-Maruyama, 200 steps) is not taken: legibility does not depend on the sampler
# (issue 28), and all recipes are scored on the same samples' recipe.
PREVIOUS = on(BEFORE, "model=unet_tiny", "train.max_steps=1500", "optim.lr=1e-3", "train.warmup_steps=100",
              "ema.warmup=false")
# The recipe of 2026-12-05 without the decay and the clipping (the screens' base).
COSINE_400 = on(BEFORE, "diffusion.schedule=cosine", "train.max_steps=400", "train.lr_decay=cosine")
# The quickstart of 2026-12-05 (commit 3265310) as overrides of today's: 400 steps at batch 64.
DEC05 = [*SIXTEEN, "train.batch_size=64", "train.max_steps=400", "checkpoint.every_n_steps=200"]
# The quickstart of 2026-12-06 (commit bca0db5): the same at 1,000 steps (now recipe=digits16).
DEC06 = on(DEC05, "train.max_steps=1000", "checkpoint.every_n_steps=500")
# The digits drawn at their native 8x8 with the 16x16 run's noise levels (4x the SNR), scored and
# shown as 16x16 digits: the quickstart since the evening of 2026-12-06, at 1,500 steps.
EIGHT = ["dataset.image_size=8", "diffusion.snr_shift=4", "quick_eval.size=16", "train.batch_size=64"]
# The recipe whose quiet wall time was measured (81-87 s on 2026-12-05): the others' are expected from
# their CPU time's ratio to its.
REFERENCE = "2026-12-05 (400 steps)"

RECIPES: dict[str, list[str]] = {
    "current": [],  # conf/recipe/digits.yaml as it is
    "before issue 28 (300 steps, linear)": BEFORE,
    "previous (dd37cb3)": PREVIOUS,
    # The screens of 2026-12-04 and 2026-12-05 (one seed each unless the note says otherwise).
    "600 steps": on(BEFORE, "train.max_steps=600"),
    "900 steps": on(BEFORE, "train.max_steps=900"),
    "600 steps, EMA 0.99": on(BEFORE, "train.max_steps=600", "ema.decay=0.99"),
    "600 steps, 32 channels": on(BEFORE, "train.max_steps=600", "model.base_channels=32"),
    "cosine": on(BEFORE, "train.lr_decay=cosine"),
    "450 steps, cosine": on(BEFORE, "train.max_steps=450", "train.lr_decay=cosine"),
    "600 steps, cosine": on(BEFORE, "train.max_steps=600", "train.lr_decay=cosine"),
    "450 steps, cosine, lr 6e-3": on(BEFORE, "train.max_steps=450", "train.lr_decay=cosine", "optim.lr=6e-3"),
    "450 steps, cosine, attention": on(BEFORE, "train.max_steps=450", "train.lr_decay=cosine",
                                       "model.attn_resolutions=[8]"),
    # Smaller batches, more steps: the same images seen, more updates.
    "batch 32, 600 steps, cosine": on(BEFORE, "train.batch_size=32", "train.max_steps=600", "train.lr_decay=cosine"),
    "batch 16, 1200 steps, cosine, lr 2e-3": on(BEFORE, "train.batch_size=16", "train.max_steps=1200",
                                                "train.lr_decay=cosine", "optim.lr=2e-3", "train.warmup_steps=100"),
    "batch 32, 600 steps": on(BEFORE, "train.batch_size=32", "train.max_steps=600"),
    "bf16": on(BEFORE, "trainer.precision=bf16-mixed"),
    # The cosine noise schedule (improved DDPM) keeps more of the time range at middling noise.
    "cosine schedule": on(BEFORE, "diffusion.schedule=cosine"),
    "cosine schedule, cosine lr": on(BEFORE, "diffusion.schedule=cosine", "train.lr_decay=cosine"),
    "cosine schedule, 400 steps, cosine lr": COSINE_400,
    "cosine schedule, 450 steps, cosine lr": on(COSINE_400, "train.max_steps=450"),
    "cosine schedule, 600 steps, cosine lr": on(COSINE_400, "train.max_steps=600"),
    "cosine schedule, 400 steps": on(BEFORE, "diffusion.schedule=cosine", "train.max_steps=400"),
    "cosine 400, lr 5e-3": on(COSINE_400, "optim.lr=5e-3"),
    "cosine 400, lr 2e-3": on(COSINE_400, "optim.lr=2e-3"),
    "cosine 400, EMA 0.98": on(COSINE_400, "ema.decay=0.98"),
    "cosine 400, 32 channels": on(COSINE_400, "model.base_channels=32"),
    "cosine 400, 32 channels, lr 2e-3": on(COSINE_400, "model.base_channels=32", "optim.lr=2e-3"),
    "cosine 400, attention": on(COSINE_400, "model.attn_resolutions=[8]"),
    "cosine 400, bf16": on(COSINE_400, "trainer.precision=bf16-mixed"),
    # = 2026-12-05 (400 steps), but for its checkpoint interval
    "cosine 400, clip 1": on(COSINE_400, "train.grad_clip=1.0"),
    "cosine 400, clip 0.5": on(COSINE_400, "train.grad_clip=0.5"),
    "cosine 400, clip 1, lr 4e-3": on(COSINE_400, "train.grad_clip=1.0", "optim.lr=4e-3"),
    "cosine 500, clip 1": on(COSINE_400, "train.max_steps=500", "train.grad_clip=1.0"),
    # The screens of 2026-12-05 and 2026-12-06 on the recipe of 2026-12-05 (400 steps).
    "2026-12-05 (400 steps)": DEC05,
    # More capacity.
    "2026-12-05, 32 channels": on(DEC05, "model.base_channels=32"),
    "2026-12-05, 32 channels, lr 2e-3": on(DEC05, "model.base_channels=32", "optim.lr=2e-3"),
    "2026-12-05, attention": on(DEC05, "model.attn_resolutions=[8]"),
    # 32 GroupNorm groups on 32 channels normalise each channel alone (2026-12-05: saturated samples).
    "2026-12-05, 32 channels, 8 groups": on(DEC05, "model.base_channels=32", "model.norm_groups=8"),
    "2026-12-05, 32 channels, 16 groups": on(DEC05, "model.base_channels=32", "model.norm_groups=16"),
    # With warm-up, a 400-step run never reaches ema.decay (the warm-up's (1 + n) / (10 + n) stays
    # below 0.978): the EMA's length is the warm-up's. These set it instead.
    "2026-12-05, EMA 0.99 without warm-up": on(DEC05, "ema.decay=0.99", "ema.warmup=false"),
    "2026-12-05, EMA 0.95 without warm-up": on(DEC05, "ema.decay=0.95", "ema.warmup=false"),
    # min-SNR-gamma loss weighting: the almost clean times count less (train.min_snr_gamma).
    "2026-12-05, min-SNR 5": on(DEC05, "train.min_snr_gamma=5"),
    # Capacity moved to the coarse levels, where a digit's shape is decided: 16 channels at 16x16
    # cost 0.78x of 24 channels x [1, 2, 2] per step (2026-12-06, CPU): 500 steps cost about 400.
    "16 channels x [1, 2, 4], 500 steps": on(DEC05, "model.base_channels=16", "model.channel_mult=[1,2,4]",
                                           "model.norm_groups=8", "train.max_steps=500"),
    "2026-12-05, channels x [1, 2, 4]": on(DEC05, "model.channel_mult=[1,2,4]"),
    # How far more steps go (the rate still decays to 0 at the last step).
    "2026-12-05, 700 steps": on(DEC05, "train.max_steps=700", "checkpoint.every_n_steps=350"),
    "2026-12-05, 1000 steps": on(DEC05, "train.max_steps=1000", "checkpoint.every_n_steps=500"),
    # More updates for the same images: half the batch, 2.5x the steps.
    "batch 32, 1000 steps": on(DEC05, "train.batch_size=32", "train.max_steps=1000", "checkpoint.every_n_steps=500"),
    # The screens of the 8x8 quickstart (2026-12-06): the digits at their native size, about 2.4x the images per second.
    "2026-12-06 (16x16, 1000 steps)": DEC06,
    "8x8, 1000 steps": on(EIGHT, "train.max_steps=1000", "checkpoint.every_n_steps=500"),
    "8x8, 1200 steps": on(EIGHT, "train.max_steps=1200", "checkpoint.every_n_steps=600"),
    "8x8, 1500 steps": on(EIGHT, "train.max_steps=1500", "checkpoint.every_n_steps=500"),
    "8x8 without the SNR shift, 1200 steps": on(EIGHT, "diffusion.snr_shift=1", "train.max_steps=1200",
                                                "checkpoint.every_n_steps=600"),
}


def steps_of(overrides: list[str]) -> int:
    for o in overrides:
        if o.startswith("train.max_steps="):
            return int(o.split("=", 1)[1])
    import yaml

    return int(yaml.safe_load((ROOT / "conf" / "recipe" / "digits.yaml").read_text())["train"]["max_steps"])


def scaled(overrides: list[str], scale: float) -> list[str]:
    if scale == 1:
        return overrides
    steps = max(2, round(steps_of(overrides) * scale))
    return on(overrides, f"train.max_steps={steps}", f"checkpoint.every_n_steps={steps}",
              f"train.warmup_steps={min(50, steps // 2)}")


def run_one(name: str, overrides: list[str], seed: int, folder: Path, extra: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"seed={seed}", f"hydra.run.dir={folder}", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"recipe": name, "seed": seed, "overrides": overrides, "code": code, "wall_s": round(wall, 1),
           "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1)}
    quick = folder / "quick_eval.json"
    if code == 0 and quick.is_file():
        q = json.loads(quick.read_text())
        leg = q.get("legibility") or {}
        row.update(kid=q.get("kid"), legibility=leg.get("mean_confidence"), confident=leg.get("confident"),
                   num=leg.get("num"), class_counts=leg.get("class_counts"),
                   real_legibility=(leg.get("real_digits") or {}).get("mean_confidence"))
    return row


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(rows: list[dict], reference_wall: tuple[float, float]) -> str:
    done = [r for r in rows if r["code"] == 0 and r.get("legibility") is not None]
    cpu_reference = [r["cpu_s"] for r in done if r["recipe"] == REFERENCE]
    lines = ["| recipe | overrides | seeds | legibility (mean conf.) | > 0.9 | KID | CPU s | wall s | "
             "quiet wall s (from CPU ratio) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in done if r["recipe"] == name]
        if not mine:
            continue
        cpu = statistics.mean(r["cpu_s"] for r in mine)
        quiet = "-"
        if cpu_reference:
            ratio = cpu / statistics.mean(cpu_reference)
            quiet = f"{ratio * reference_wall[0]:.0f}-{ratio * reference_wall[1]:.0f} (x{ratio:.2f})"
        kid = [r["kid"] for r in mine if r.get("kid") is not None]
        lines.append(f"| {name} | {' '.join(mine[0]['overrides']) or '(none)'} | {len(mine)} | "
                     f"{spread([r['legibility'] for r in mine])} | "
                     f"{statistics.mean(r['confident'] for r in mine):.0f} of {mine[0]['num']} | "
                     f"{spread(kid)} | {cpu:.0f} | {statistics.mean(r['wall_s'] for r in mine):.0f} | {quiet} |")
    real = [r["real_legibility"] for r in done if r.get("real_legibility") is not None]
    if real:
        lines.append(f"\nReal digits the classifier never saw, read the same way: mean confidence {real[0]:.3f}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="names of RECIPES to run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "quickstart_recipes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every recipe's steps (a smoke test)")
    parser.add_argument("--reference-wall", type=float, nargs=2, default=(81.0, 87.0),
                        help=f"{REFERENCE!r}'s measured quiet wall time range, seconds (2026-12-05)")
    parser.add_argument("extra", nargs="*", help="overrides for every run (e.g. quick_eval.num=20)")
    args = parser.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.is_file() else []
    os.environ.setdefault("WANDB_MODE", "disabled")
    for seed in args.seeds:
        for name in args.recipes:
            overrides = scaled(RECIPES[name], args.scale)
            if any(r["recipe"] == name and r["seed"] == seed and r["overrides"] == overrides and r["code"] == 0
                   for r in rows):  # measured already (a failed run is tried again)
                continue
            folder = args.out / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_seed{seed}"  # Hydra-safe
            row = run_one(name, overrides, seed, folder, args.extra)
            rows.append(row)
            write_text(results_file, json.dumps(rows, indent=1) + "\n")
            print(f"{name} seed {seed}: legibility {row.get('legibility')}, KID {row.get('kid')}, "
                  f"CPU {row['cpu_s']} s, wall {row['wall_s']} s, exit {row['code']}", flush=True)
            write_text(args.out / "recipes.md", table(rows, tuple(args.reference_wall)))
    print(table(rows, tuple(args.reference_wall)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
