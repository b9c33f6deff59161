"""Loggers of a run: W&B offline by default, into the run folder, never stopping training."""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from scalelong.utils.io import write_text


def wandb_logger(project: str = "scalelong", entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, offline: bool = True, *, save_dir: str | Path,
                 name: str | None = None, run_config: dict[str, Any] | None = None):
    """A ``WandbLogger`` for the run folder ``save_dir``, or None (with a warning) when W&B fails.

    One W&B run per run folder (its id kept in ``wandb_id.txt``), so a resumed run continues the
    same W&B run. Offline unless ``offline`` is false; ``WANDB_MODE`` wins over both.
    """
    from pytorch_lightning.loggers import WandbLogger

    run_dir = Path(save_dir)
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    if not id_file.is_file() and pl.utilities.rank_zero_only.rank == 0:
        write_text(id_file, run_id + "\n")
    mode = os.environ.get("WANDB_MODE") or ("offline" if offline else "online")
    try:
        import wandb

        logger = WandbLogger(
            project=project, entity=entity, group=group, tags=list(tags or []), name=name or run_dir.name,
            id=run_id, resume="allow", save_dir=str(run_dir), mode=mode, config=run_config,
            # Online runs give up on an unreachable server after 30 s instead of the default 90 s.
            settings=wandb.Settings(init_timeout=30),
        )
        if pl.utilities.rank_zero_only.rank == 0:
            logger.experiment  # start the W&B run now, where a failure can still be caught
        return logger
    except Exception as err:  # a logging problem must never stop training
        warnings.warn(f"W&B logger disabled ({type(err).__name__}: {err}); metrics still go to the CSV logger")
        return None
