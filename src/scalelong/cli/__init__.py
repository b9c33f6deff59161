"""The command-line entry points (``scalelong-train``, ``scalelong-sample``, ... and the
``train.py`` / ``scripts/*.py`` shims). What they share: one-line errors instead of tracebacks,
and no half-written run folders."""

from __future__ import annotations

import atexit
import functools
import gc
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from scalelong.utils.errors import ConfigError


@functools.cache  # registered once per process, however many commands run in it
def skip_the_last_collection() -> None:
    """At exit, skip the interpreter's last cyclic garbage collection over everything still alive.
    With torch and Lightning loaded it takes 1.3-1.5 s, after the run has printed its last line
    (measured on a 2-core CPU, 2026-12-01). ``gc.freeze`` makes that pass skip all objects. The
    memory goes back to the OS either way. Nothing here relies on that pass: files are written
    and closed explicitly, and logging and W&B flush in exit handlers of their own. Registered
    once, at the start of a command, so it runs after the handlers registered later (W&B's)."""
    atexit.register(gc.freeze)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_output_folder(argv: list[str]) -> None:
    """Before Hydra makes the run folder: one line, not Hydra's traceback, when it cannot be made.

    Looks at ``hydra.run.dir=`` / ``hydra.sweep.dir=`` on the command line, else ``outputs/``.
    """
    wanted = [a.split("=", 1)[1].strip('"\'') for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for folder in wanted or ["outputs"]:
        path = Path(folder).absolute()
        parent = path
        while not _exists(parent):
            parent = parent.parent
        if not parent.is_dir():
            fail(f"cannot create the run folder {path}: {parent} is a file, not a folder; "
                 "choose another place with hydra.run.dir=...")
        if not os.access(parent, os.W_OK | os.X_OK):
            fail(f"cannot create the run folder {path}: {parent} is not writable; "
                 "choose another place with hydra.run.dir=... or run from a writable folder")


def check_launcher(argv: list[str]) -> None:
    """Under torchrun, or srun with several tasks, every rank and every restart must write into one
    run folder; the default folder's name holds the time each process started. One line, before
    any rank makes a folder, when the command line does not fix it, or when torchrun's restarts
    could not be told apart (``scalelong.utils.distributed.isolate_elastic_attempts``)."""
    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    if (elastic and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1) > 1):
        # each node's torchrun counts its own restarts: no prefix all ranks agree on
        fail("torchrun restarts on several nodes need a store per restart: start torchrun with "
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment and --rdzv-backend=c10d "
             "(README \"When a process dies\")")
    if elastic:
        launcher = "torchrun"
    elif int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        launcher = "srun"
    else:
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    fixed = ("hydra.sweep.dir=",) if multirun else ("hydra.run.dir=", "resume=")
    if not any(a.startswith(fixed) for a in argv):
        example = "hydra.sweep.dir=outputs/multirun/<name>" if multirun else "hydra.run.dir=outputs/runs/<name>"
        fail(f"under {launcher} every rank and every restart must use the same run folder, and the default one is "
             f"named after the time each process starts: add {example}"
             f"{'' if multirun else ' (or resume=<run folder>)'}, so that a restarted run resumes there")


SWEEP_FUNCTIONS = ("glob(", "choice(", "range(", "interval(", "tag(", "sort(", "shuffle(", "extend_list(")


def check_group_choices(argv: list[str]) -> None:
    """One line, not Hydra's twelve, for an unknown option of a config group (``scaling=lernable``):
    the valid choices, and a close one. ``HYDRA_FULL_ERROR=1`` leaves the message to Hydra."""
    import difflib

    from scalelong.config import conf_dir

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    roots = [conf_dir()]
    for arg in argv:  # hydra.searchpath=[file:///a,file:///b]: more folders with groups
        if arg.startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]'\"").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    roots.append(Path(entry[len("file://"):]))
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or arg.startswith("-") or key.startswith("hydra") or "." in key or "@" in key:
            continue
        folders = [root / key for root in roots if (root / key).is_dir()]
        if not folders or value in ("null", "") or value.startswith(SWEEP_FUNCTIONS):
            continue
        options = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
        for choice in (v.strip() for v in value.split(",")):
            if choice not in options:
                guess = difflib.get_close_matches(choice, options, n=1)
                hint = f"; did you mean {key}={guess[0]}?" if guess else ""
                fail(f"unknown {key}={choice}; valid choices: {', '.join(options)}{hint}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a folder on the way that this user may not search: look further up
        return False


def _remove_if_untouched(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote before the run started."""
    hydra_only = {".hydra", "train.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_only:
        shutil.rmtree(run_dir, ignore_errors=True)


def one_thread_env() -> dict[str, str]:
    """The environment of a study's training processes, run side by side: one thread each
    (unless OMP_NUM_THREADS says otherwise), no W&B, and this checkout's sources first."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


class JobFailed(RuntimeError):
    """One job of a sweep failed; Hydra records it and goes on with the other jobs."""


def guarded(main: Callable[[], int]) -> int:
    """Run an entry point's body; a ``ConfigError`` (bad input, missing data, a failed write) is
    one ``error:`` line and exit status 2."""
    try:
        return main()
    except ConfigError as err:
        fail(str(err))
    return 2
