"""The command-line entry points (``scalelong-train``, ``scalelong-sample``, ... and the
``train.py`` / ``scripts/*.py`` shims). What they share: one-line errors instead of tracebacks,
and no half-written run folders."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from scalelong.utils.errors import ConfigError


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
