"""What the command-line entry points share: one-line errors instead of tracebacks, and no
half-written run folders."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from scalelong.errors import ConfigError


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _remove_if_untouched(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote before the run started."""
    hydra_only = {".hydra", "train.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_only:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_training(cfg: DictConfig) -> Any:
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # called outside Hydra
        run_dir = None
    try:
        from scalelong.config import resolve_resume, to_plain, validate

        config = to_plain(cfg)
        validate(config)  # before the slow imports: bad input costs a second
        resolve_resume(config)
        from scalelong.run import train

        result = train(config)
    except ConfigError as err:
        if run_dir is not None:
            _remove_if_untouched(run_dir)
        fail(str(err))
    print(f"run folder: {result['run_dir']}")
    return None
