"""A callback that ends its own process at a given step and rank, as a crash or a pre-emption
would, for the tests of tests/test_dead_process.py (on PYTHONPATH through the tests folder)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class StopAtStep(pl.Callback):
    """Sends ``signal`` to this process after step ``step`` on rank ``rank``, on launch ``attempt``
    only (torchrun counts its restarts in TORCHELASTIC_RESTART_COUNT): the restarted run goes on."""

    def __init__(self, step: int, rank: int, signal: str = "SIGKILL", attempt: int = 0):
        self.step, self.rank, self.signal, self.attempt = int(step), int(rank), signal, int(attempt)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if trainer.global_step == self.step and trainer.global_rank == self.rank and attempt == self.attempt:
            os.kill(os.getpid(), getattr(signal, self.signal))


class TimeoutProbe(pl.Callback):
    """At the start of training on rank 0: writes the collective timeout of the process group that
    Lightning started (seconds) to ``path``; with ``then_s``, sets it to that many seconds for the
    rest of the run (a test's short wait, after a start that a cold rank 1 may take long to join)."""

    def __init__(self, path: str, then_s: float | None = None):
        self.path, self.then_s = path, then_s

    def on_train_start(self, trainer, pl_module) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        if trainer.global_rank != 0:
            return
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        with open(self.path, "w") as f:
            f.write(str(backend.options._timeout.total_seconds()))
        if self.then_s is not None:
            backend.set_timeout(timedelta(seconds=self.then_s))
