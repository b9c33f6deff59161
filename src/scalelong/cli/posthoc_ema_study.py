"""``python scripts/posthoc_ema_study.py``: does long-skip scaling move the best EMA length? The
five strategies x seeds, one training run each with post-hoc EMA snapshots; each run's quality
against sigma_rel (``scalelong-posthoc-ema --evaluate``); per strategy the best length and the
quality there, with 95% intervals over seeds and paired differences against ``none`` (usage: ``--help``)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from scalelong.cli import one_thread_env

ROOT = Path(__file__).resolve().parents[3]
STRATEGIES = ("none", "sqrt2", "constant", "learnable", "learnable_nonshared")
# The CPU study's training runs: the quickstart recipe as the study ran it (python train.py of commit
# e411408: 300 steps, 16x16 digits, the linear VP-SDE, a constant rate, no clipping; the quickstart
# has changed since), without what the study does not read (W&B, the stability callback, the KID/FID
# and the grid at the end), snapshots every 10 steps.
AS_RUN = ("train.max_steps=300", "diffusion.schedule=linear", "train.lr_decay=null", "train.grad_clip=null",
          "dataset.image_size=16", "diffusion.snr_shift=1")
CPU_OVERRIDES = (*AS_RUN, "logger=csv", "callbacks=none", "quick_eval=null", "sample.at_end=false")

USAGE = """Does long-skip scaling change the best EMA length, or the quality at the best length?

    python scripts/posthoc_ema_study.py                     # the digits on the CPU (docs/posthoc_ema)
    python scripts/posthoc_ema_study.py --out outputs/posthoc_ema_paper --every 10000 --num 10000 \\
        --sampler dpm_solver --steps 50 --docs outputs/posthoc_ema_paper/report experiment=paper dataset=cifar10

Trains every strategy x seed once (``python train.py -m``, quickstart recipe unless overrides say
otherwise; ``--jobs`` seeds side by side) with snapshots every ``--every`` steps into
``--out/<strategy>/seed_<s>``, reconstructs each run's EMA at every ``--sigma-rel`` and scores it
and the run's own EMA (``scalelong-posthoc-ema --evaluate``, the same sample noise for all), then
writes ``README.md``, ``results.json`` and ``quality_vs_sigma_rel.png`` into ``--docs``. Running
it again skips finished runs and evaluations and resumes interrupted runs. Arguments with ``=``
go to every training run (Hydra overrides).
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the training runs (default: the CPU ones)")
    p.add_argument("--out", type=Path, default=Path("outputs/posthoc_ema_study"))
    p.add_argument("--docs", type=Path, default=Path("docs/posthoc_ema"))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--every", type=int, default=10, help="snapshot interval in steps (ema.posthoc.every_n_steps)")
    p.add_argument("--sigma-rel", default="0.03,0.05,0.08,0.12,0.2,0.25")
    p.add_argument("--num", type=int, default=128, help="samples per evaluation")
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="training sweeps (one per seed) and evaluations at once")
    p.add_argument("--no-train", action="store_true", help="evaluate and report the runs that exist")
    p.add_argument("--report-only", action="store_true", help="only the report, from the runs evaluated already")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from scalelong.cli import fail, skip_the_last_collection
    from scalelong.cli.posthoc_ema import parse_sigma_rels
    from scalelong.utils.errors import ConfigError

    skip_the_last_collection()
    args = parse_args(argv)
    try:
        targets = parse_sigma_rels(args.sigma_rel)
    except (ConfigError, ValueError) as err:
        fail(str(err))
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    overrides = list(args.overrides) or list(CPU_OVERRIDES)
    t0 = time.perf_counter()
    if not (args.no_train or args.report_only):
        train_all(args.out, strategies, seeds, args.every, overrides, args.jobs)
    runs = [(s, seed, args.out / s / f"seed_{seed}") for s in strategies for seed in seeds]
    finished = [r for r in runs if (r[2] / "metrics.json").is_file()]
    missing = [f"{s}/seed_{seed}" for s, seed, d in runs if (s, seed, d) not in finished]
    if missing:
        print(f"not finished (left out): {', '.join(missing)}", flush=True)
    if not args.report_only:
        evaluate_all(finished, targets, args.num, args.sampler, args.steps, args.jobs)
    results = collect(finished, targets)
    write_report(results, args, strategies, seeds, overrides, missing, time.perf_counter() - t0)
    print(f"-> {args.docs}/results.md, quality_vs_sigma_rel.png", flush=True)
    return 0


def train_all(out: Path, strategies: Sequence[str], seeds: Sequence[int], every: int, overrides: Sequence[str],
              jobs: int) -> None:
    """One ``train.py -m`` sweep over the strategies per seed, ``jobs`` of them at a time."""
    def sweep(seed: int) -> int:
        command = [sys.executable, str(ROOT / "train.py"), "-m", f"scaling={','.join(strategies)}", f"seed={seed}",
                   *overrides, f"ema.posthoc.every_n_steps={every}", f"hydra.sweep.dir={out}",
                   "hydra.sweep.subdir=${hydra:runtime.choices.scaling}/seed_${seed}"]
        log = out / f"train_seed_{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"training seed {seed}: {' '.join(command[2:])} (log: {log})", flush=True)
        with open(log, "a") as f:
            return subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=one_thread_env())

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        codes = list(pool.map(sweep, seeds))
    if any(codes):
        print(f"some training sweeps failed (exit status {codes}); the report uses the runs that finished",
              flush=True)


def _evaluated(run: Path, targets: Sequence[float], num: int, sampler: str, steps: int) -> bool:
    path = run / "posthoc_ema" / "quality.json"
    if not path.is_file():
        return False
    rows = json.loads(path.read_text())
    have = sorted(round(r["sigma_rel"], 6) for r in rows if not r["own_ema"])
    return (have == sorted(round(s, 6) for s in targets) and all(r["num"] == num and r["sampler"] == sampler
                                                                  and r["steps"] == steps for r in rows))


def evaluate_all(runs: Sequence[tuple[str, int, Path]], targets: Sequence[float], num: int, sampler: str, steps: int,
                 jobs: int) -> None:
    """``scalelong-posthoc-ema RUN --evaluate`` for each run not evaluated with these settings yet."""
    todo = [r for r in runs if not _evaluated(r[2], targets, num, sampler, steps)]

    def evaluate(run: tuple[str, int, Path]) -> int:
        command = [sys.executable, str(ROOT / "scripts" / "posthoc_ema.py"), str(run[2]), "--sigma-rel",
                   ",".join(f"{s:g}" for s in targets), "--evaluate", "--num", str(num), "--sampler", sampler,
                   "--steps", str(steps)]
        print(f"evaluating {run[0]}/seed_{run[1]}", flush=True)
        with open(run[2] / "posthoc_ema.log", "w") as f:
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=one_thread_env())
        if code:
            print(f"evaluation of {run[2]} failed (exit status {code}); see {run[2] / 'posthoc_ema.log'}", flush=True)
        return code

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(evaluate, todo))


def collect(runs: Sequence[tuple[str, int, Path]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Per run: quality per sigma_rel, the best sigma_rel of the grid and the quality there, the own EMA's."""
    results = []
    for strategy, seed, run in runs:
        path = run / "posthoc_ema" / "quality.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())
        curve = {round(r["sigma_rel"], 6): r["quality"] for r in rows if not r["own_ema"]}
        own = next((r["quality"] for r in rows if r["own_ema"]), math.nan)
        values = [curve.get(round(s, 6), math.nan) for s in targets]
        finite = [i for i, v in enumerate(values) if math.isfinite(v)]
        best = min(finite, key=lambda i: values[i]) if finite else None
        results.append({"strategy": strategy, "seed": seed, "run": str(run), "quality": values, "own_ema": own,
                        "best_sigma_rel": targets[best] if best is not None else math.nan,
                        "best_quality": values[best] if best is not None else math.nan,
                        "measure": rows[0]["measure"], "num": rows[0]["num"], "sampler": rows[0]["sampler"],
                        "steps": rows[0]["steps"], "step": rows[0]["step"],
                        "fit_error": [next((r["fit_error"] for r in rows if not r["own_ema"]
                                            and round(r["sigma_rel"], 6) == round(s, 6)), math.nan) for s in targets]})
    return results


def _ci(mean: float, half: float, fmt: str = ".3f") -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:{fmt}} ± {half:{fmt}}" if math.isfinite(half) else f"{mean:{fmt}} (one seed)"


def _verdict(mean: float, half: float, lower: str, higher: str) -> str:
    if not (math.isfinite(mean) and math.isfinite(half)):
        return "too few seeds"
    if mean + half < 0:
        return lower
    if mean - half > 0:
        return higher
    return "no resolved difference"


def summarize(results: Sequence[dict[str, Any]], strategies: Sequence[str], targets: Sequence[float]) -> list[dict]:
    from scalelong.analysis.study import interval

    base = {r["seed"]: r for r in results if r["strategy"] == "none"}
    rows = []
    for strategy in strategies:
        got = [r for r in results if r["strategy"] == strategy]
        if not got:
            continue
        curve = [interval([r["quality"][i] for r in got]) for i in range(len(targets))]
        pairs = [(r, base[r["seed"]]) for r in got if r["seed"] in base]
        d_log_best = interval([math.log(r["best_sigma_rel"] / b["best_sigma_rel"]) for r, b in pairs])
        d_best = interval([r["best_quality"] - b["best_quality"] for r, b in pairs])
        rows.append({
            "strategy": strategy, "n": len(got), "curve": curve,
            "best_sigma_rel": interval([r["best_sigma_rel"] for r in got]),
            "log_best_sigma_rel": interval([math.log(r["best_sigma_rel"]) for r in got]),
            "best_quality": interval([r["best_quality"] for r in got]),
            "own_ema": interval([r["own_ema"] for r in got]),
            "gain_over_own": interval([r["own_ema"] - r["best_quality"] for r in got]),
            "vs_none_log_best_sigma_rel": d_log_best, "vs_none_best_quality": d_best,
            "length_verdict": "(baseline)" if strategy == "none" else _verdict(d_log_best[0], d_log_best[1],
                                                                                 "shorter than none's", "longer than none's"),
            "quality_verdict": "(baseline)" if strategy == "none" else _verdict(d_best[0], d_best[1],
                                                                                 "better than none", "worse than none"),
        })
    return rows


def write_report(results: Sequence[dict[str, Any]], args: argparse.Namespace, strategies: Sequence[str],
                 seeds: Sequence[int], overrides: Sequence[str], missing: Sequence[str], seconds: float) -> None:
    from scalelong.cli.posthoc_ema import parse_sigma_rels
    from scalelong.utils.io import write_text

    targets = parse_sigma_rels(args.sigma_rel)
    docs = Path(args.docs)
    rows = summarize(results, strategies, targets)
    write_text(docs / "results.json", json.dumps({"runs": results, "summary": rows}, indent=2, default=float) + "\n")
    plot(rows, targets, docs / "quality_vs_sigma_rel.png", results[0]["measure"] if results else "quality")
    measure = results[0]["measure"] if results else "quality"
    how = (f"{measure} of {results[0]['num']} samples per checkpoint ({results[0]['sampler']}, {results[0]['steps']} "
           f"steps, the same noise for every checkpoint), at step {results[0]['step']}") if results else "no results"
    cmd = "python scripts/posthoc_ema_study.py " + " ".join(
        [*(f"--{k.replace('_', '-')} {v}" for k, v in (("every", args.every), ("num", args.num),
                                                           ("sampler", args.sampler), ("steps", args.steps))),
         *overrides])
    lines = ["# Post-hoc EMA study: does long-skip scaling move the best EMA length?", "",
             f"Command: `{cmd}`. Runs: {len(results)} of {len(strategies) * len(seeds)} "
             f"({len(strategies)} strategies x seeds {', '.join(map(str, seeds))})"
             + (f"; not finished: {', '.join(missing)}" if missing else "") + ". "
             f"Training overrides: `{' '.join(overrides)}`, snapshots every {args.every} steps (sigma_rel 0.05 and "
             f"0.10 tracked). Quality: {how}; lower is better. Means over seeds ± the half-width of the 95% t "
             "interval; against `none` paired by seed.", "",
             "## Quality against sigma_rel", "",
             "| strategy | n | " + " | ".join(f"σ_rel {s:g}" for s in targets) + " | run's own EMA |",
             "|---|---|" + "---|" * (len(targets) + 1)]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['n']} | " + " | ".join(_ci(m, h) for m, h, _ in r["curve"])
                     + f" | {_ci(*r['own_ema'][:2])} |")
    lines += ["", "![quality against sigma_rel](quality_vs_sigma_rel.png)", "",
              "## The best length and the quality there", "",
              "Best sigma_rel: the grid point of lowest quality value per run (the grid limits its resolution). "
              "Against `none`: the ratio of best lengths (geometric mean over seeds, interval on the log) and the "
              "difference of the best quality.", "",
              "| strategy | best σ_rel (geo. mean) | best quality | gain over own EMA | best σ_rel / none's | "
              "best quality − none's | verdict: length | verdict: quality |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lm, lh, _ = r["log_best_sigma_rel"]
        geo = f"{math.exp(lm):.3f} (×/÷ {math.exp(lh):.2f})" if math.isfinite(lh) else (
            f"{math.exp(lm):.3f}" if math.isfinite(lm) else "-")
        dm, dh, _ = r["vs_none_log_best_sigma_rel"]
        ratio = "-" if r["strategy"] == "none" or not math.isfinite(dm) else (
            f"{math.exp(dm):.2f} (×/÷ {math.exp(dh):.2f})" if math.isfinite(dh) else f"{math.exp(dm):.2f}")
        diff = "-" if r["strategy"] == "none" else _ci(*r["vs_none_best_quality"][:2])
        lines.append(f"| {r['strategy']} | {geo} | {_ci(*r['best_quality'][:2])} | {_ci(*r['gain_over_own'][:2])} | "
                     f"{ratio} | {diff} | {r['length_verdict']} | {r['quality_verdict']} |")
    lines += ["", "Per run (best σ_rel, best quality, own EMA): " + "; ".join(
        f"{r['strategy']}/{r['seed']}: {r['best_sigma_rel']:g}, {r['best_quality']:.3f}, {r['own_ema']:.3f}"
        for r in results)]
    write_text(docs / "results.md", "\n".join(lines) + "\n")


def plot(rows: Sequence[dict[str, Any]], targets: Sequence[float], path: Path, measure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelong.utils.io import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, r in enumerate(rows):
        x = np.asarray(targets) * (1.0 + 0.012 * (k - 2))  # a little apart, so the bars do not overlap
        mean = np.array([m for m, _, _ in r["curve"]])
        half = np.array([h if math.isfinite(h) else 0.0 for _, h, _ in r["curve"]])
        ax.errorbar(x, mean, yerr=half, marker="o", ms=4, capsize=3, label=f"{r['strategy']} (n={r['n']})",
                    color=f"C{k}")
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (EMA length / training steps)")
    ax.set_ylabel(f"{measure}, lower is better")
    ax.set_title("post-hoc EMA: mean ± 95% interval over seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
