"""``scalelong-posthoc-ema`` / ``python scripts/posthoc_ema.py``: the EMA of any length, after
training, from a run's post-hoc EMA snapshots (usage: ``--help``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USAGE = """The EMA of any length after training (EDM2's post-hoc EMA), from the snapshots a run saved with
``ema.posthoc.every_n_steps=N``:

    scalelong-posthoc-ema outputs/runs/<run> --sigma-rel 0.03,0.05,0.08,0.12 [--step S] [--evaluate]

For each target length sigma_rel (the EMA profile's standard deviation relative to the training
steps so far) it solves by least squares for the combination of the stored snapshots (up to step
S, default the last) whose profile best matches the target's, prints the profile's relative fit
error, and writes ``<run>/checkpoints/posthoc_sigma<sigma_rel>_step<S>.ckpt``: the run's last
checkpoint with the reconstructed weights as its EMA, which ``scalelong-sample``,
``scalelong-evaluate`` and ``--skip-scale`` use like any checkpoint. A target whose fit error
exceeds ``--max-fit-error`` (default 5%) is refused before anything is written, with the range
of sigma_rel the snapshots can represent.

``--evaluate`` scores each reconstruction and the run's own EMA (last.ckpt) with ``--num``
samples (the run's sampler and steps unless ``--sampler``/``--steps``): on the digits the Frechet
distance in a digit classifier's features (and KID), elsewhere FID and KID with Inception by the
data set's protocol. It writes ``<run>/posthoc_ema/quality.md``, ``quality.json`` and
``quality.png`` (quality against sigma_rel).
"""

DEFAULT_MAX_FIT_ERROR = 0.05


def parse_sigma_rels(text: str) -> list[float]:
    from scalelong.training.posthoc_ema import check_sigma_rel

    values = [v.strip() for v in str(text).replace(" ", ",").split(",") if v.strip()]
    if not values:
        raise ValueError("--sigma-rel needs at least one value, e.g. 0.05,0.1")
    return [check_sigma_rel(v, "--sigma-rel") for v in values]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the run folder (with ema_snapshots/ and checkpoints/last.ckpt)")
    p.add_argument("--sigma-rel", required=True, help="target lengths, comma-separated: 0.03,0.05,0.08,0.12")
    p.add_argument("--step", type=int, default=None, help="reconstruct the EMA at this step (default: the last snapshot)")
    p.add_argument("--max-fit-error", type=float, default=DEFAULT_MAX_FIT_ERROR,
                   help="refuse targets whose profile fit error exceeds this (relative L2; default 0.05)")
    p.add_argument("--evaluate", action="store_true", help="score each checkpoint and write quality.md/.png")
    p.add_argument("--num", type=int, default=1000, help="samples per evaluation (default 1000)")
    p.add_argument("--sampler", default=None, help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    p.add_argument("--seed", type=int, default=0, help="the samples' seed (the same noise for every target)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from scalelong.cli import fail, skip_the_last_collection
    from scalelong.utils.errors import ConfigError

    skip_the_last_collection()
    args = parse_args(argv)
    try:
        targets = parse_sigma_rels(args.sigma_rel)
        written = reconstruct_run(args.run, targets, args.step, args.max_fit_error)
        if args.evaluate:
            evaluate_run(args.run, written, args.num, args.sampler, args.steps, args.seed, args.device)
    except (ConfigError, ValueError) as err:
        fail(str(err))
    return 0


def checkpoint_name(sigma_rel: float, step: int) -> str:
    return f"posthoc_sigma{sigma_rel:.3f}_step{step:07d}.ckpt"


def reconstruct_run(run: Path, targets: Sequence[float], step: int | None = None,
                    max_fit_error: float = DEFAULT_MAX_FIT_ERROR, verbose: bool = True) -> list[dict[str, Any]]:
    """Writes one checkpoint per target; returns, per target, its sigma_rel, path and fit."""
    import torch

    from scalelong.checkpoints import read_checkpoint
    from scalelong.training.posthoc_ema import (check_representable, describe, read_snapshots, reconstruct, solve)
    from scalelong.utils.errors import DataError
    from scalelong.utils.io import atomic_write

    run = Path(run)
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise DataError(f"{last} does not exist; pass a run folder of scalelong-train (with ema.posthoc on)")
    snapshots = read_snapshots(run, step)
    at = int(step if step is not None else snapshots[-1].step)
    if step is not None and not any(s.step == at for s in snapshots) and verbose:
        print(f"note: no snapshot of step {at}; the last one before it is of step {snapshots[-1].step}", flush=True)
    solutions = [solve(snapshots, s, at) for s in targets]
    check_representable(snapshots, solutions, max_fit_error)  # all or nothing: one line, nothing written

    base = read_checkpoint(last, mmap=True)
    kept = {k: v for k, v in base["state_dict"].items() if not k.startswith("ema.module.")}
    written = []
    for solution in solutions:
        t0 = time.perf_counter()
        weights = reconstruct(snapshots, solution)
        state = dict(kept)
        state.update({f"ema.module.{k}": v for k, v in weights.items()})
        ckpt = {"state_dict": state, "global_step": at, "scalelong": base["scalelong"],
                "posthoc_ema": {"sigma_rel": solution.sigma_rel, "gamma": solution.gamma, "step": at,
                                "fit_error": solution.fit_error, "raw_weights_step": int(base.get("global_step", -1)),
                                "snapshots": [snapshots[i].path.name for i, _, _ in solution.coefficients],
                                "average": [j for _, j, _ in solution.coefficients],
                                "coefficients": [c for *_, c in solution.coefficients]}}
        path = run / "checkpoints" / checkpoint_name(solution.sigma_rel, at)
        with atomic_write(path) as f:
            torch.save(ckpt, f)
        if verbose:
            print(f"{describe(solution)} -> {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
        written.append({"sigma_rel": solution.sigma_rel, "gamma": solution.gamma, "step": at,
                        "fit_error": solution.fit_error, "path": path})
    return written


def evaluate_run(run: Path, written: Sequence[dict[str, Any]], num: int, sampler: str | None = None,
                 steps: int | None = None, seed: int = 0, device: str | None = None,
                 out_dir: Path | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    """Scores each reconstructed checkpoint and the run's own EMA; writes quality.md/.json/.png."""
    import torch

    from scalelong.model import DiffusionModel
    from scalelong.utils.io import write_text

    run = Path(run)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    last = run / "checkpoints" / "last.ckpt"
    own = DiffusionModel.from_checkpoint(last, device)
    sample = own.config.get("sample") or {}
    sampler = sampler or sample.get("sampler", "euler_ode")
    steps = int(steps or sample.get("steps", 50))
    evaluator = quality_evaluator(own, device)
    rows = []
    entries = [*written, {"sigma_rel": math.nan, "gamma": math.nan, "step": own.step, "fit_error": math.nan,
                          "path": last, "own": True}]
    for entry in entries:
        model = own if entry.get("own") else DiffusionModel.from_checkpoint(entry["path"], device)
        evaluator.model = model
        result = evaluator(num, sampler, steps, seed)
        row = {"sigma_rel": entry["sigma_rel"], "gamma": entry["gamma"], "step": entry["step"],
               "fit_error": entry["fit_error"], "checkpoint": str(entry["path"]), "own_ema": bool(entry.get("own")),
               "quality": float(result["fid"]), "kid": result["kid"], "num": num, "sampler": sampler,
               "steps": steps, "seed": seed, "measure": evaluator.measure}
        rows.append(row)
        if verbose:
            what = "the run's own EMA" if row["own_ema"] else f"sigma_rel {row['sigma_rel']:g}"
            print(f"{what}: {evaluator.measure} {row['quality']:.4f} on {num} samples ({sampler}, {steps} steps)",
                  flush=True)
    folder = Path(out_dir or run / "posthoc_ema")
    write_text(folder / "quality.json", json.dumps(rows, indent=2, default=str) + "\n")
    write_text(folder / "quality.md", quality_table(rows, own.config))
    plot_quality(rows, folder / "quality.png", evaluator.measure, run.name)
    if verbose:
        print(f"-> {folder}/quality.md, quality.png", flush=True)
    return rows


def quality_evaluator(model, device):
    """The data set's quality measure: on the digits the digit classifier's Frechet distance
    (seconds, not Inception's minutes, on a CPU), elsewhere FID with Inception."""
    from scalelong.metrics.evaluation import FIDEvaluator

    dataset = model.config["dataset"]
    if dataset.get("name") == "digits":
        from scalelong.metrics.digits import DigitFeatures

        evaluator = FIDEvaluator(model, dataset, extractor=DigitFeatures(), device=device, build_reference=True,
                                 kid_max=1000, feature_batch=256, verbose=False)
        evaluator.measure = "FD(digit classifier)"
    else:
        evaluator = FIDEvaluator(model, dataset, mode="clean", device=device, verbose=False)
        evaluator.measure = "FID"
    return evaluator


def quality_table(rows: Sequence[dict[str, Any]], config: dict) -> str:
    first = rows[0]
    ema = config.get("ema") or {}
    lines = ["# Post-hoc EMA: quality against sigma_rel", "",
             f"{first['measure']} of {first['num']} samples ({first['sampler']}, {first['steps']} steps, seed "
             f"{first['seed']}; the same noise for every row), lower is better. Step {first['step']}.", "",
             "| sigma_rel | gamma | profile fit error | " + first["measure"] + " | KID |", "|---|---|---|---|---|"]
    for r in rows:
        kid = "" if r["kid"] is None else f"{r['kid']:.5f}"
        if r["own_ema"]:
            name = f"run's EMA (decay {ema.get('decay')}{', warm-up' if ema.get('warmup') else ''})"
            lines.append(f"| {name} | | | {r['quality']:.4f} | {kid} |")
        else:
            lines.append(f"| {r['sigma_rel']:g} | {r['gamma']:.3f} | {r['fit_error']:.2%} | {r['quality']:.4f} | {kid} |")
    return "\n".join(lines) + "\n"


def plot_quality(rows: Sequence[dict[str, Any]], path: Path, measure: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelong.utils.io import atomic_write

    posthoc = sorted((r for r in rows if not r["own_ema"]), key=lambda r: r["sigma_rel"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["sigma_rel"] for r in posthoc], [r["quality"] for r in posthoc], "o-", label="post-hoc EMA")
    for r in rows:
        if r["own_ema"]:
            ax.axhline(r["quality"], color="grey", ls="--", label="the run's own EMA")
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (EMA length / training steps)")
    ax.set_ylabel(f"{measure} (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
