"""What a rank of a multi-process run says when another rank stops: which one, the last
checkpoint's step, and how the run goes on (README "When a process dies"). The watching itself
is ``RankWatch`` in ``scalelong.utils.distributed``; this module words the way on."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalelong.config import world_size
from scalelong.utils.errors import EXIT_RANK_LOST


def watch_the_other_ranks(config: Mapping[str, Any], run_dir: Path | None):
    """For a run of several processes: NCCL's error handling on, and a ``RankWatch`` that ends this
    one with a short report when another stops (README "When a process dies")."""
    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    if run_dir is None or (world_size(config["trainer"]) <= 1 and not elastic):
        return None
    from scalelong.utils.distributed import RankWatch, isolate_elastic_attempts, set_nccl_error_handling

    set_nccl_error_handling()
    isolate_elastic_attempts()
    run_dir = Path(config.get("resume") or run_dir)
    every = config["checkpoint"]["every_n_steps"]
    return RankWatch(lambda: _how_to_go_on(run_dir, every), EXIT_RANK_LOST)


def _how_to_go_on(run_dir: Path, every_n_steps: int) -> str:
    """The last checkpoint's step and how the run continues from it: by itself (torchrun with
    restarts left), by a resubmission (SLURM) or by the command printed."""
    path = run_dir / "checkpoints" / "last.ckpt"
    step = _checkpoint_step(path)
    if step is None:
        saved = (f"No checkpoint was saved yet (one every {every_n_steps} steps: checkpoint.every_n_steps), so the "
                 "run starts again from step 0.")
    else:
        saved = f"The last checkpoint is at step {step}: {path}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        done = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        from scalelong.utils.distributed import elastic_restarts_allowed

        most = elastic_restarts_allowed()
        if done < most:
            return f"{saved}\ntorchrun restarts every rank (restart {done + 1} of {most}); they resume from it."
        return f"{saved}\nResume: run the same torchrun command again (same hydra.run.dir); it continues there."
    if "SLURM_JOB_ID" in os.environ:
        return (f"{saved}\nA requeued job (submitit requeues on a time limit or pre-emption) continues there by "
                "itself; else submit it again with the same hydra.run.dir or "
                f"`scontrol requeue {os.environ['SLURM_JOB_ID']}`.")
    return f"{saved}\nResume: {_resume_command(run_dir if step is not None else None)}"


def _checkpoint_step(path: Path) -> int | None:
    """The step of a training checkpoint, read without loading its tensors (mmap), or None."""
    from scalelong.checkpoints import read_checkpoint

    try:
        return int(read_checkpoint(path, mmap=True)["global_step"])
    except Exception:  # missing or unreadable: the report says there is none rather than fail itself
        return None


def _resume_command(run_dir: Path | None) -> str:
    """The command that continues the run in ``run_dir`` (the user's overrides and ``resume=``), or,
    without a checkpoint (``None``), the command that starts it again."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    if run_dir is not None:  # resume= replaces where the run started from
        overrides = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "ckpt_path="))]
        overrides.append(f"resume={run_dir}")
    program = ["python", sys.argv[0]] if sys.argv[0].endswith(".py") else [os.path.basename(sys.argv[0])]
    return shlex.join([*program, *overrides])
