"""``python scripts/claim5_study.py``: claim 5 of the paper (scaling the long skips speeds up
training) on the CPU, in one command: the sweep of ``experiment=claim5_cpu`` (every strategy x
seed x backbone, one training process per run, resumable), then its report
(``scalelong.analysis.claim5``; usage: ``--help``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scalelong.cli import one_thread_env

ROOT = Path(__file__).resolve().parents[3]

USAGE = """Claim 5 of the paper on the CPU: do scaled long skips reach a legibility (and an FD) in fewer steps?

    python scripts/claim5_study.py                    # the 70 runs (3.1 CPU-hours: UNet 2.1, U-ViT 1.0), then the report
    python scripts/claim5_study.py --report-only      # the report of the runs finished so far
    python scripts/claim5_study.py --seeds 1,2 --cells uvit13 train.max_steps=500   # a smaller sweep

Trains every run of the plan that is not finished, seeds outermost (a stopped sweep leaves every
strategy with about as many seeds), ``--jobs`` processes side by side with one thread each:
``python train.py experiment=claim5_cpu claim5_cell=C study_arm=A seed=S`` into
``--out/C/A/seed_S`` (the folders ``python train.py -m experiment=claim5_cpu`` makes, so either
can continue the other's runs). Ctrl-C stops it (the runs under way save a checkpoint); running it
again skips finished runs and resumes the others from their last checkpoint. Then writes claim5.md,
claim5.json and claim5_legibility.png into ``--docs``.
Arguments with ``=`` go to every training run (Hydra overrides)."""


def parse_args(argv=None) -> argparse.Namespace:
    from scalelong.analysis import claim5

    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every training run")
    p.add_argument("--out", type=Path, default=Path("outputs/claim5_cpu"), help="the sweep's run folders")
    p.add_argument("--docs", type=Path, default=Path("docs/study_cpu"), help="where the report goes")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"legibility (mean confidence) to reach (default: per backbone, {claim5.LEGIBILITY_THRESHOLD:g} "
                        "or the median final legibility of its none runs where that is lower)")
    p.add_argument("--fd-threshold", type=float, default=None,
                   help="FD to reach (default: per backbone, the median final FD of its none runs)")
    p.add_argument("--cells", default=",".join(claim5.CELLS), help="backbones (conf/claim5_cell)")
    p.add_argument("--arms", default=",".join(claim5.ARMS), help="strategies (conf/study_arm); none first")
    p.add_argument("--seeds", default=",".join(map(str, claim5.SEEDS)))
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    p.add_argument("--report-only", action="store_true", help="only the report, from the runs finished so far")
    return p.parse_args(argv)


def _names(text: str, what: str) -> list[str]:
    from scalelong.cli import fail

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        fail(f"--{what} is empty; give a comma-separated list")
    return names


def main(argv=None) -> int:
    from scalelong.analysis import claim5
    from scalelong.cli import fail, skip_the_last_collection
    from scalelong.utils.errors import ConfigError

    skip_the_last_collection()
    args = parse_args(argv)
    cells, arms = _names(args.cells, "cells"), _names(args.arms, "arms")
    try:
        seeds = [int(s) for s in _names(args.seeds, "seeds")]
    except ValueError:
        fail(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. --seeds 1,2,3")
    if claim5.BASELINE not in arms:
        fail(f"--arms must include {claim5.BASELINE} (every comparison is against it), got {args.arms}")
    for name, known, folder in (("cells", cells, "claim5_cell"), ("arms", arms, "study_arm")):
        unknown = [n for n in known if not (ROOT / "conf" / folder / f"{n}.yaml").is_file()]
        if unknown:
            valid = sorted(p.stem for p in (ROOT / "conf" / folder).glob("*.yaml"))
            fail(f"--{name}: {', '.join(unknown)} not in conf/{folder}; valid: {', '.join(valid)}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        fail(f"--threshold {args.threshold:g}: a legibility is a mean confidence, between 0 and 1")
    if not args.report_only:
        train_all(args.out, plan(cells, arms, seeds), args.overrides, args.jobs)
    command = " ".join(["python scripts/claim5_study.py", *_shown_options(args), *args.overrides])
    try:
        results = claim5.write_report(args.out, args.docs, command, cells, arms, seeds, args.threshold,
                                      args.fd_threshold)
    except ConfigError as err:
        fail(str(err))
    missing = list(results["missing"])
    named = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    print(f"runs finished: {results['finished']} of {results['planned']}" + (f" (missing: {named})" if missing else ""),
          flush=True)
    print(f"-> {args.docs}/claim5.md, claim5.json, claim5_legibility.png", flush=True)
    return 0


def _shown_options(args: argparse.Namespace) -> list[str]:
    """The options that differ from the defaults, as the report's command shows them."""
    defaults = parse_args([])
    shown = []
    for key in ("out", "docs", "threshold", "fd_threshold", "cells", "arms", "seeds"):
        value = getattr(args, key)
        if value != getattr(defaults, key):
            shown.append(f"--{key.replace('_', '-')} {value}")
    return shown


def plan(cells: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str, str]]:
    """(seed, cell, arm) of every run, seeds outermost: a partial sweep stays balanced over arms."""
    return [(seed, cell, arm) for seed in seeds for cell in cells for arm in arms]


def train_command(out: Path, seed: int, cell: str, arm: str, overrides: Sequence[str]) -> list[str]:
    """One run of the sweep, in the folder ``python train.py -m experiment=claim5_cpu`` gives it."""
    return [sys.executable, str(ROOT / "train.py"), "experiment=claim5_cpu", f"claim5_cell={cell}",
            f"study_arm={arm}", f"seed={seed}", *overrides, "hydra.mode=RUN",
            f"hydra.run.dir={Path(out).absolute() / cell / arm / f'seed_{seed}'}"]


def train_all(out: Path, runs: Sequence[tuple[int, str, str]], overrides: Sequence[str], jobs: int) -> None:
    """Every run of ``runs`` that is not finished, ``jobs`` at a time; each one's CPU time (user +
    sys, summed over its attempts, not counting those that found it finished) goes into the ledger
    beside the runs. Ctrl-C (or SIGTERM) stops the sweep: no other run starts, and the runs under way
    get SIGTERM, on which train.py saves a checkpoint; exit status 130."""
    from scalelong.analysis.claim5 import CPU_LEDGER, read_ledger, run_key
    from scalelong.utils.io import write_text

    out = Path(out)
    lock = threading.Lock()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()  # set when the sweep is stopped: the runs not started yet are not started
    live: set[int] = set()  # the process ids of the runs under way

    def stop_the_sweep(signum, frame) -> None:
        # The runs are in sessions of their own, so that Ctrl-C reaches only this process: they get
        # SIGTERM from here, on which train.py saves a checkpoint at the end of its step and stops.
        with lock:
            stop.set()
            for pid in live:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def train(k: int, seed: int, cell: str, arm: str) -> int:
        key = run_key(cell, arm, seed)
        metrics = out / cell / arm / f"seed_{seed}" / "metrics.json"
        before = metrics.stat().st_mtime_ns if metrics.is_file() else None
        log = logs / f"{cell}_{arm}_seed_{seed}.log"
        t0 = time.perf_counter()
        with open(log, "a") as f, lock:
            if stop.is_set():
                return 0
            _say(f"[{k}/{len(runs)}] {key} (log: {log})")
            proc = subprocess.Popen(train_command(out, seed, cell, arm, overrides), stdout=f, stderr=subprocess.STDOUT,
                                    env=one_thread_env(), start_new_session=True)
            live.add(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, not the other job's
        with lock:
            live.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu, wall = usage.ru_utime + usage.ru_stime, time.perf_counter() - t0
        after = metrics.stat().st_mtime_ns if metrics.is_file() else None
        if not (before is not None and after == before and proc.returncode == 0):  # not a run finished before
            with lock:
                ledger = read_ledger(out)
                entry = ledger.setdefault(key, {"cpu_seconds": 0.0, "wall_seconds": 0.0, "attempts": 0})
                entry["cpu_seconds"] += cpu
                entry["wall_seconds"] += wall
                entry["attempts"] += 1
                write_text(out / CPU_LEDGER, json.dumps(ledger, indent=2, sort_keys=True) + "\n")
        if after is not None and proc.returncode == 0:
            state = "done"
        elif stop.is_set():
            state = "stopped (the same command resumes it from its last checkpoint)"
        else:
            state = f"FAILED (exit status {proc.returncode}, see {log})"
        _say(f"[{k}/{len(runs)}] {key}: {state}, {cpu:.0f} CPU-s, {wall:.0f} s")
        return proc.returncode

    handlers = {sig: signal.signal(sig, stop_the_sweep) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            codes = list(pool.map(lambda job: train(job[0] + 1, *job[1]), enumerate(runs)))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop.is_set():
        print("stopped; the same command resumes the sweep", file=sys.stderr, flush=True)
        raise SystemExit(130)
    failed = sum(1 for c in codes if c)
    if failed:
        print(f"{failed} of {len(runs)} runs failed; the report uses the runs that finished", flush=True)


def _say(line: str) -> None:
    """One line in one write: the two training threads' lines do not run into each other."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
