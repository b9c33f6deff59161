"""Batches keyed by the global optimizer step: batch s is a fixed function of (seed, s), each rank
taking its part, so resumed and multi-process runs see the batches one uninterrupted process
would (``docs/design.md``, "Step-keyed batches")."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scalelong.utils.errors import ConfigError
from scalelong.utils.seeding import STREAM_EPOCH, step_seed


@dataclass(frozen=True)
class BatchRequest:
    """What the sampler hands the data set: the global step and this rank's item indices."""

    step: int
    indices: list[int]


# The key that holds a batch's items: pixel images, or autoencoder moments for latent data.
ITEM_KEYS = ("images", "moments")


def batch_len(batch: dict) -> int:
    """Number of items in a loaded batch (this rank's part of the global batch)."""
    return len(next(v for k, v in batch.items() if k in ITEM_KEYS))


def check_global_batch(global_batch: int, world_size: int) -> int:
    """The per-device batch; a clear error when the global batch does not divide."""
    if global_batch < 1:
        raise ConfigError(f"the batch size must be positive, got {global_batch}")
    if global_batch % world_size:
        raise ConfigError(
            f"global batch {global_batch} is not divisible by the world size {world_size} "
            f"(devices x nodes); choose a multiple of {world_size}, for example "
            f"train.batch_size={max(world_size, global_batch // world_size * world_size)}"
        )
    return global_batch // world_size


class StepBatchSampler:
    """Yields one ``BatchRequest`` per optimizer step, from ``start_step`` on, without end.

    The training length is set by the trainer's ``max_steps``; epochs exist only to choose
    permutations. The last ``num_items % global_batch`` items of each permutation are left out,
    so every step sees a full batch.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        self.local_batch = check_global_batch(global_batch, world_size)
        if num_items < global_batch:
            raise ConfigError(f"the data set has {num_items} items, fewer than one global batch of {global_batch}")
        self.num_items, self.global_batch = num_items, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step = start_step
        self.steps_per_epoch = num_items // global_batch
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, STREAM_EPOCH))
            self._cached_perm, self._cached_epoch = torch.randperm(self.num_items, generator=g), epoch
        return self._cached_perm

    def global_indices(self, step: int) -> torch.Tensor:
        """The item indices of the whole global batch at ``step`` (all ranks together)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[within * self.global_batch:(within + 1) * self.global_batch]

    def __iter__(self) -> Iterator[BatchRequest]:
        lo = self.rank * self.local_batch
        step = self.start_step
        while True:
            yield BatchRequest(step, self.global_indices(step)[lo:lo + self.local_batch].tolist())
            step += 1
