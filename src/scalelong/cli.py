"""What the command-line entry points share: one-line errors instead of tracebacks, and no
half-written run folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from scalelong.errors import ConfigError, TrainingDiverged


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


def _sweep_job_needs_own_processes(config: dict) -> bool:
    """True for a job of a local multirun sweep that trains on several processes.

    Lightning starts ranks 1..W-1 by re-running the command line; inside a sweep that command
    line is the whole sweep, so each extra rank would run every job. Such a job therefore runs
    as a fresh single-run process of its own (whose extra ranks re-run just that job), and the
    sweep only waits for it: a failing or crashing job ends its own processes, not the sweep.
    Jobs that a cluster launcher already started (SLURM, torchrun) are left alone.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from scalelong.config import world_size

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or world_size(config["trainer"]) <= 1:
        return False
    launched_externally = any(v in os.environ for v in ("SLURM_PROCID", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"))
    return not launched_externally and "BasicLauncher" in str(hc.launcher.get("_target_", ""))


def _run_job_in_own_process() -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = hc.runtime.output_dir
    # The job's own overrides (this point of the sweep), in single-run mode, in the job's folder.
    command = [sys.executable, os.path.abspath(sys.argv[0]), *hc.overrides.task,
               f'hydra.run.dir="{job_dir}"', "hydra.output_subdir=null"]
    code = subprocess.call(command, cwd=hc.runtime.cwd)
    if code != 0:
        raise JobFailed(f"job {hc.job.num} ({', '.join(hc.overrides.task)}) exited with status {code}; "
                        f"see {job_dir}")
    metrics_file = Path(job_dir) / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def _optimized_value(config: dict, metrics: dict) -> float | None:
    """The value a sweeper minimises, when ``optimized_metric`` is set."""
    name = config.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise JobFailed(f"optimized_metric {name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}")
    return float(metrics[name])


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def _config_error(err: ConfigError, run_dir: Path | None) -> None:
    if run_dir is not None:
        _remove_if_untouched(run_dir)
    if _in_multirun():  # let the sweep go on with its other jobs
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise JobFailed(str(err)) from None
    fail(str(err))


def run_training(cfg: DictConfig) -> Any:
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # called outside Hydra
        run_dir = None
    from scalelong.config import resolve_resume, to_plain, validate

    try:
        config = to_plain(cfg)
        validate(config)  # before the slow imports: bad input costs a second
        resolve_resume(config)
    except ConfigError as err:
        _config_error(err, run_dir)
    if _sweep_job_needs_own_processes(config):
        return _optimized_value(config, _run_job_in_own_process())

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from scalelong.run import train

    try:
        result = train(config)
    except SIGTERMException:
        print(f"stopped by a signal; checkpoint saved to {run_dir}/checkpoints/last.ckpt. Run the same "
              f"command again (it resumes in the same folder) or pass resume={run_dir}", file=sys.stderr, flush=True)
        raise SystemExit(0) from None
    except TrainingDiverged as err:
        fail(str(err), code=3)
    except ConfigError as err:
        _config_error(err, run_dir)
    if result["trainer"].is_global_zero:
        print(f"run folder: {result['run_dir']}")
    return _optimized_value(config, result["metrics"])
