"""Callbacks of a training run: progress lines, sample grids, periodic checkpoints, and the run's
configuration written into every checkpoint."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from scalelong.data.sampler import BatchRequest, batch_len
from scalelong.utils.io import save_image_grid, write_bytes


class ProgressPrinter(pl.Callback):
    """One line every ``every_n_steps``: step, loss, images per second, time left.

    Plain lines instead of a progress bar read well in log files and SLURM output; each line
    after the first also logs ``time/seconds_per_step`` over the steps since the last one. At step
    ``estimate_at`` one more line says how long the whole run will take: the training left, and
    ``after_training(seconds per step)``, an estimate of the sampling and evaluation at the end.
    """

    def __init__(self, every_n_steps: int = 50, estimate_at: int = 50,
                 after_training: Callable[[float], tuple[float, str]] | None = None):
        self.every = max(1, int(every_n_steps))
        self.estimate_at = int(estimate_at)
        self.after_training = after_training
        self._t0 = self._s0 = None
        self._last_print: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._s0 = time.perf_counter(), trainer.global_step
        self._last_print = None

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._s0 + 1:
            self._t1, self._s1 = time.perf_counter(), step
        if step == self._s0 + self.estimate_at and step < trainer.max_steps:
            self._estimate(trainer, step)
        if step % self.every and step != trainer.max_steps:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self._s0
        rate = done / elapsed if elapsed > 0 else 0.0
        local = batch_len(batch)
        images = rate * local * trainer.world_size
        left = (trainer.max_steps - step) / rate if rate > 0 else float("nan")
        loss = trainer.callback_metrics.get("train/loss")
        loss_s = f"{float(loss):.4f}" if loss is not None else "-"
        print(f"step {step}/{trainer.max_steps}  loss {loss_s}  {images:.1f} img/s  "
              f"elapsed {elapsed:.0f}s  left {left:.0f}s", flush=True)
        # The measured pace, for the report's projection of a full run (GPU-hours per job).
        now, since = time.perf_counter(), self._last_print
        if since is not None and step > since[1]:
            for logger in trainer.loggers:
                logger.log_metrics({"time/seconds_per_step": (now - since[0]) / (step - since[1])}, step=step)
        self._last_print = (now, step)

    def _estimate(self, trainer, step: int) -> None:
        # Steps after the first (which pays for warm-up) give the rate.
        seconds_per_step = (time.perf_counter() - self._t1) / max(1, step - self._s1)
        train_left = (trainer.max_steps - step) * seconds_per_step
        extra, what = self.after_training(seconds_per_step) if self.after_training else (0.0, "")
        then = f", then about {extra:.0f} s for {what}" if extra > 0 else ""
        print(f"expected: about {(train_left + extra) / 60:.1f} min from now ({train_left:.0f} s of training{then}); "
              "machines of this kind differ 2-4x in speed from day to day", flush=True)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` (and at the end), a grid of EMA samples saved as a PNG.

    The initial noise is the same every time (``seed``), so successive grids show how the same
    samples evolve during training. Files: ``<dirpath>/step_0001000.png``; the last one is also
    copied to ``<dirpath>/final.png`` at the end of training.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, num: int = 100, sampler: str = "euler_ode",
                 steps: int = 50, seed: int = 0, guidance_scale: float = 0.0, at_end: bool = True):
        self.dirpath = Path(dirpath)
        self.at_end = bool(at_end)  # false: the run's end writes final.png otherwise (the quick evaluation)
        self.every = int(every_n_steps)
        self.num, self.sampler, self.steps, self.seed = int(num), sampler, int(steps), int(seed)
        self.guidance_scale = float(guidance_scale)
        self.last_path: Path | None = None
        self._last_step = -1
        self._contexts = None

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.space.text_conditional:
            # The same captions for every grid: the first items of the training data (caption
            # chosen as at step 0).
            data = trainer.datamodule.data
            indices = [i % len(data) for i in range(self.num)]
            self._contexts = data.__getitems__(BatchRequest(0, indices))["context"]

    def _save(self, trainer, pl_module, name: str) -> Path:
        images = pl_module.model.generate(self.num, self.sampler, self.steps, seed=self.seed, contexts=self._contexts,
                                    guidance_scale=self.guidance_scale)
        path = save_image_grid(images, self.dirpath / name)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [str(path)], step=trainer.global_step)
        return path

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0:
            self.last_path = self._save(trainer, pl_module, f"step_{step:07d}.png")
            self._last_step = step

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if not self.at_end:
            return
        final = self.dirpath / "final.png"
        if self._last_step == trainer.global_step and self.last_path is not None:
            write_bytes(final, self.last_path.read_bytes())  # the same weights: no need to sample again
        else:
            self._save(trainer, pl_module, final.name)
        self.last_path = final


class PeriodicCheckpoint(pl.Callback):
    """Saves ``last.ckpt`` every ``every_n_steps`` and at the end of training; with
    ``keep_every_n_steps``, also a numbered ``step_0050000.ckpt`` that is never overwritten.

    Pre-emption: on SIGTERM or SIGUSR1 (unless a cluster handler such as Lightning's SLURM
    requeue owns SIGUSR1), ``last.ckpt`` is saved after the current step and the run stops with
    ``SIGTERMException``, ready to be resumed. A cluster's requeue signal is taken the same way
    and, once ``last.ckpt`` is saved, handed to the cluster's handler, which requeues the job:
    submitit's (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise; it requeues from rank 0
    and exits there) and Lightning's SLURM auto-requeue under plain ``srun`` (SIGUSR1; it saves its
    own ``hpc_ckpt_N.ckpt`` and calls ``scontrol requeue``). Without this, either handler would act
    at once, in the middle of a step, and the requeued job, which continues from ``last.ckpt``,
    would lose the steps since the last periodic save.

    The periodic saves depend on the step alone, the same on every rank. A signal does not: it
    may reach one rank only, or the ranks at different steps, so the processes of a multi-process
    run agree on the stop through a small all-reduce (its result read on the host, a wait for the
    GPU), not at every step but about every ``stop_check_seconds`` of training: the first step
    after the start, then at intervals in steps that all ranks derive from the same reduced step
    time. Under DDP the stop (and its save) thus comes up to that long after the signal; one
    process checks its own flag every step, with no collective. 0: agree at every step.

    Writes are atomic (see ``AtomicCheckpointIO``): a kill during a save keeps the previous file.
    """

    MAX_STEPS_BETWEEN_AGREEMENTS = 10_000
    # Set by the signal handlers and the agreement (on_train_start resets them).
    _stop_requested = _requeue_requested = _hand_over = False
    _requeue = None  # (signal, the cluster's requeue handler), handed over after the stop's save

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_every_n_steps: int | None = None,
                 stop_check_seconds: float = 1.0):
        self.dirpath = Path(dirpath)
        self.every = int(every_n_steps)
        self.keep_every = int(keep_every_n_steps) if keep_every_n_steps else 0
        self.stop_check_seconds = float(stop_check_seconds)
        self._saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _save_last(self, trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)  # the full state, to resume
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        # Replace Lightning's SIGTERM handler (it would stop the loop at a point of its own,
        # possibly before this callback has saved) with a flag read once per step, here.
        self._stop_requested = self._requeue_requested = self._hand_over = False
        self._requeue = None
        self._previous_handlers = {}
        self._next_agreement = trainer.global_step + 1
        self._last_agreement = (time.perf_counter(), trainer.global_step)
        if trainer.world_size > 1:
            _skip_lightnings_sigterm_broadcast(trainer)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            current = signal.getsignal(sig)
            if _is_cluster_requeue(current):
                self._requeue = (sig, current)
                self._previous_handlers[sig] = signal.signal(sig, self._request_requeue)
            elif sig == signal.SIGTERM or (sig == signal.SIGUSR1 and current in (signal.SIG_DFL, None)):
                self._previous_handlers[sig] = signal.signal(sig, self._request_stop)
            # else: a handler of SIGUSR1 or SIGUSR2 that is not a cluster's requeue stays as it is

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _request_requeue(self, signum, frame) -> None:
        self._stop_requested = self._requeue_requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.keep_every and step % self.keep_every == 0:
            trainer.save_checkpoint(self.dirpath / f"step_{step:07d}.ckpt", weights_only=False)
        if self.every > 0 and step % self.every == 0:
            self._save_last(trainer)
        if self._stop_agreed(trainer, step):
            if self._saved_step != step:
                self._save_last(trainer)
            if self._hand_over and self._requeue is not None:
                sig, handler = self._requeue
                self._restore_handlers(trainer)
                handler(sig, None)  # submitit: requeues and exits on rank 0; Lightning: saves, requeues
            raise SIGTERMException()

    def _stop_agreed(self, trainer, step: int) -> bool:
        """Whether the run stops after this step: this process's flag alone, or, with several
        processes, any rank's flag at the steps where they agree (False in between). With it,
        ``_hand_over``: whether the stop came from a cluster's requeue signal on any rank."""
        requested = self._stop_requested
        if trainer.world_size == 1:
            self._hand_over = self._requeue_requested
            return requested
        if step < getattr(self, "_next_agreement", step):
            return False
        now = time.perf_counter()
        since, since_step = self._last_agreement
        # Whole microseconds: every rank computes the next interval from the same integers.
        votes = torch.tensor([int(requested), round((now - since) * 1e6), int(self._requeue_requested)],
                             dtype=torch.int64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(votes)
        stops, total_us, requeues = votes.tolist()
        self._hand_over = requeues > 0
        us_per_step = total_us / trainer.world_size / max(1, step - since_step)
        interval = int(self.stop_check_seconds * 1e6 / max(us_per_step, 1.0))
        self._next_agreement = step + min(max(1, interval), self.MAX_STEPS_BETWEEN_AGREEMENTS)
        self._last_agreement = (now, step)
        return stops > 0

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved_step != trainer.global_step:
            self._save_last(trainer)
        self._restore_handlers(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers(trainer)

    def _restore_handlers(self, trainer) -> None:
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)


def _is_cluster_requeue(handler) -> bool:
    """Whether ``handler`` requeues the job: submitit's handler of its requeue signal (it
    checkpoints the job's callable, requeues the job and exits; submitit's SIGTERM handler only
    logs), or Lightning's SLURM auto-requeue (a ``_HandlersCompose`` of ``_slurm_sigusr_handler_fn``)."""
    if str(getattr(handler, "__module__", "")).startswith("submitit"):
        return getattr(handler, "__name__", "") in ("checkpoint_and_try_requeue", "checkpoint_and_exit")
    parts = getattr(handler, "signal_handlers", None)
    return isinstance(parts, list) and any(getattr(h, "__name__", "") == "_slurm_sigusr_handler_fn" for h in parts)


def _skip_lightnings_sigterm_broadcast(trainer) -> None:
    """Lightning (2.6) broadcasts its own SIGTERM flag from rank 0 and reads it before every
    training step under DDP. With PeriodicCheckpoint's handler in place of Lightning's, that flag
    never rises: the broadcast would cost a collective and a wait for the GPU per step for
    nothing. (A Lightning without the method keeps whatever it does instead.)"""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None


class ConfigInCheckpoints(pl.Callback):
    """Stores the run's resolved configuration in every checkpoint (``checkpoint["scalelong"]``), so
    ``DiffusionModel.from_checkpoint`` rebuilds the model from its parts' configs alone."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from scalelong.checkpoints import CONFIG_KEY, FORMAT

        checkpoint[CONFIG_KEY] = {"config": self.config, "format": FORMAT}
