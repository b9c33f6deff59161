"""``python scripts/collapse_study.py``: the CPU study's collapse finding repeated on new seeds (issue
28). Runs the sweep of ``experiment=collapse_cpu`` (resumable, seeds outermost, the cells side by
side), then writes the report: collapse counts per cell and arm with exact intervals, exact tests
against ``none`` and a verdict per arm (usage: ``--help``)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scalelong.cli import one_thread_env

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENT = "collapse_cpu"

USAGE = """The CPU study's collapse finding repeated on new seeds (docs/study_cpu/collapse.md).

    python scripts/collapse_study.py                  # the sweep (resumable), then the report
    python scripts/collapse_study.py --report-only    # the report from the runs that exist

Trains conf/experiment/collapse_cpu.yaml (its cells x arms x seeds; --seeds to change the seeds):
one `train.py -m experiment=collapse_cpu study_cell=C seed=S` per cell and seed, seeds outermost so
that a stopped sweep stays balanced, --jobs of them side by side at one thread each, into
--out/<cell>/<arm>/seed_<s>. Running it again skips finished runs and resumes the others from
their last checkpoint. Then writes collapse.md, collapse.json and two PNGs into --docs; a partial
sweep is reported as partial, naming the runs that are missing. Do not start the sweep while
another one writes into the same --out (both would train the same run folders); --report-only
reads what is there and is safe at any time.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/collapse_cpu"), help="the sweep's folder")
    p.add_argument("--docs", type=Path, default=Path("docs/study_cpu"), help="where the report goes")
    p.add_argument("--seeds", default=None, help="seeds, e.g. 4-13 or 4,5,6 (default: the experiment's)")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    p.add_argument("--original", type=Path, default=ROOT / "docs" / "study_cpu" / "results.json",
                   help="the CPU study's results.json, whose collapse counts are shown beside the new ones")
    p.add_argument("--report-only", action="store_true", help="only the report, from the runs that exist")
    return p.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    from scalelong.utils.errors import ConfigError

    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                first, last = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds += range(int(first), int(last) + 1)
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a list of seeds; write e.g. 4-13 or 4,5,6") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} names no seed; write e.g. 4-13 or 4,5,6")
    return list(dict.fromkeys(seeds))


def sweep_commands(out: Path, cells: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int, list[str]]]:
    """(cell, seed, command) per training process, seeds outermost: each sweeps the arms of one cell
    at one seed into ``out`` (Hydra's sweeper sets ``<cell>/<arm>/seed_<s>``)."""
    return [(cell, seed, [sys.executable, str(ROOT / "train.py"), "-m", f"experiment={EXPERIMENT}",
                          f"study_cell={cell}", f"seed={seed}", f"hydra.sweep.dir={out.resolve()}"])
            for seed in seeds for cell in cells]


def _count_finished(out: Path, cells: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> int:
    return sum((out / c / a / f"seed_{s}" / "metrics.json").is_file() for c in cells for a in arms for s in seeds)


def train_all(out: Path, cells: Sequence[str], arms: Sequence[str], seeds: Sequence[int], jobs: int) -> None:
    """The sweep, ``jobs`` processes at a time, with a progress line whenever a run finishes."""
    planned = len(cells) * len(arms) * len(seeds)
    start_count, t0 = _count_finished(out, cells, arms, seeds), time.perf_counter()
    print(f"{start_count} of {planned} runs finished already; training the rest, {jobs} processes at a time "
          f"(logs: {out}/logs)", flush=True)
    done = threading.Event()

    def progress() -> None:
        last = start_count
        while not done.wait(20):
            now = _count_finished(out, cells, arms, seeds)
            if now != last:
                last = now
                minutes = (time.perf_counter() - t0) / 60
                pace = (now - start_count) / minutes if minutes > 0 else 0
                left = f"; about {(planned - now) / pace:.0f} min left at this pace" if pace > 0 else ""
                print(f"{now} of {planned} runs finished ({minutes:.0f} min{left})", flush=True)

    def sweep(job: tuple[str, int, list[str]]) -> int:
        cell, seed, command = job
        log = out / "logs" / f"{cell}_seed_{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"start: {cell}, seed {seed} ({' '.join(command[2:-1])}; log {log})", flush=True)
        with open(log, "a") as f:
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=one_thread_env(), cwd=ROOT)
        if code:
            print(f"{cell}, seed {seed}: the sweep stopped with exit status {code} (see {log}); its later arms "
                  "did not run. Run the command again to resume, or read the report for what is missing", flush=True)
        return code

    watcher = threading.Thread(target=progress, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(sweep, sweep_commands(out, cells, seeds)))
    finally:
        done.set()
    print(f"{_count_finished(out, cells, arms, seeds)} of {planned} runs finished "
          f"({(time.perf_counter() - t0) / 60:.0f} min)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from scalelong.cli import guarded, skip_the_last_collection

    skip_the_last_collection()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def run() -> int:
        from scalelong.analysis.collapse import sweep_plan, write_collapse_report

        cells, arms, seeds = sweep_plan(ROOT / "conf" / "experiment" / f"{EXPERIMENT}.yaml")
        if args.seeds:
            seeds = parse_seeds(args.seeds)
        if not args.report_only:
            train_all(args.out, cells, arms, seeds, args.jobs)
        command = " ".join(["python scripts/collapse_study.py", *argv])
        path = write_collapse_report(args.out, args.docs, cells, arms, seeds, command, args.original)
        print(f"collapse report: {path} (and collapse.json, collapse_rates.png, collapse_losses.png)", flush=True)
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
