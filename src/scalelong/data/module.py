"""The Lightning data module: one step-keyed batch per optimizer step, sharded across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from scalelong.data import build_dataset
from scalelong.data.images import InMemoryImages, keep_batch
from scalelong.data.sampler import StepBatchSampler


class DiffusionDataModule(pl.LightningDataModule):
    """Loads the configured data set once and serves ``StepBatchSampler`` batches.

    ``global_batch`` is the batch over all devices and nodes, as the paper states it; the
    per-device batch is derived from the world size (an error when it does not divide).
    """

    def __init__(self, dataset: Mapping[str, Any], global_batch: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.dataset_cfg = dict(dataset)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.data: InMemoryImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = build_dataset(self.dataset_cfg)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        sampler = StepBatchSampler(
            len(self.data), self.global_batch, self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            # Checkpoint state is restored before the loader is built, so a resumed run
            # continues with the batches it would have seen.
            start_step=trainer.global_step if trainer else 0,
        )
        return DataLoader(self.data, batch_sampler=sampler, collate_fn=keep_batch, num_workers=self.num_workers,
                          pin_memory=False, persistent_workers=self.num_workers > 0)
