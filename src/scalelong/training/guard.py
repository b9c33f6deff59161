"""The divergence guard, decided on the device: a step with a non-finite loss or gradient is
skipped without the host waiting for the GPU, and its counters come to the host only every
``trainer.log_every_n_steps``. Details: ``docs/design.md``, "The training step"."""

from __future__ import annotations

import torch
from torch import Tensor

from scalelong.utils.errors import TrainingDiverged

# The counters, in this order, in one int64 tensor on the training device.
IN_ROW, TOTAL, OVERFLOW, TRIPPED_AT = range(4)


def host_values(t: Tensor) -> list:
    """The one way the guard reads the device: a host list (a device sync on a GPU)."""
    return t.tolist()


class DivergenceGuard:
    """Counts skipped steps on the device and tells the optimizer to skip them.

    ``decide`` takes this step's gradient norm and loss finiteness (0-dim device tensors) and
    returns ``skip`` (0-dim float32, 1 for a step to skip), updating on the device:

    - ``in_row``: non-finite steps in a row (an fp16 overflow leaves it as it is);
    - ``total``: non-finite steps in all (``train/nonfinite_skipped``);
    - ``overflow``: fp16 overflows of a finite loss, the loss scaler's skips (``train/overflow_skipped``);
    - ``tripped_at``: the step at which ``in_row`` reached ``limit`` (-1 before). From then on
      every step is skipped, so the weights and optimizer state when the run stops (``check``,
      up to ``log_every_n_steps`` later) are those of the step it tripped at.
    """

    def __init__(self, limit: int):
        self.limit = int(limit or 0)
        self.counts: Tensor | None = None
        self._loaded = [0, 0, 0, -1]

    def _counts_on(self, device: torch.device) -> Tensor:
        if self.counts is None or self.counts.device != device:
            start = self._loaded if self.counts is None else host_values(self.counts)
            self.counts = torch.tensor(start, dtype=torch.int64, device=device)
        return self.counts

    def decide(self, norm: Tensor, loss_finite: Tensor, step: int, loss_scaler: bool) -> Tensor:
        c = self._counts_on(norm.device)
        grads_finite = torch.isfinite(norm)
        # Under a loss scaler, non-finite gradients of a finite loss are an fp16 overflow while the
        # scale calibrates: the scaler skips the step and lowers its scale. Not divergence.
        overflow = loss_finite & ~grads_finite if loss_scaler else torch.zeros_like(grads_finite)
        diverged = ~(loss_finite & grads_finite) & ~overflow
        in_row = torch.where(diverged, c[IN_ROW] + 1, torch.where(overflow, c[IN_ROW], 0))
        tripped_at = c[TRIPPED_AT]
        if self.limit:
            newly = (in_row >= self.limit) & (tripped_at < 0)
            tripped_at = torch.where(newly, step, tripped_at)
        self.counts = torch.stack([in_row, c[TOTAL] + diverged, c[OVERFLOW] + overflow, tripped_at])
        return (diverged | overflow | (tripped_at >= 0)).float()

    def read(self) -> dict[str, int]:
        """The counters on the host (one device sync)."""
        if self.counts is None:
            in_row, total, overflow, tripped_at = self._loaded
        else:
            in_row, total, overflow, tripped_at = host_values(self.counts)
        return {"in_row": in_row, "total": total, "overflow": overflow, "tripped_at": tripped_at}

    def check(self, counts: dict[str, int], step: int, every: int) -> None:
        """Stop the run (``TrainingDiverged``) once ``limit`` non-finite steps came in a row."""
        if counts["tripped_at"] < 0:
            return
        late = (f"; noticed at step {step}, the counters being read every {every} steps, and the steps "
                "between skipped") if step > counts["tripped_at"] else ""
        raise TrainingDiverged(
            f"{self.limit} steps in a row had a non-finite loss or gradient (step {counts['tripped_at']}, "
            f"{counts['total']} in all{late}); the last checkpoint holds the last good weights. Lower optim.lr, "
            "set train.grad_clip, or try a smaller scaling.kappa")

    def state_dict(self) -> dict[str, int]:
        return self.read()  # tripped_at too: a checkpoint saved between a trip and its check resumes into the stop

    def load_state_dict(self, state: dict) -> None:
        self._loaded = [int(state.get("in_row", 0)), int(state.get("total", 0)), int(state.get("overflow", 0)),
                        int(state.get("tripped_at", -1))]
        self.counts = None
