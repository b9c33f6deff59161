"""The digits' sample quality along training, cheaply: the Frechet distance (and KID) of EMA
samples in the digit classifier's features (``FIDCallback`` with ``DigitFeatures``), and the same
samples' legibility (the classifier's confidence in each one's digit, ``scalelong.metrics.digits``)."""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch

from scalelong.training.fid_callback import FIDCallback
from scalelong.utils.distributed import all_gather_object


class DigitQuality(FIDCallback):
    """``FIDCallback``'s evaluation, plus the legibility of the samples it scores: logged as
    ``legibility_key`` (mean confidence) and ``<legibility_key>_fraction`` (share read with
    confidence above 0.9), and stored in each entry of the history file."""

    def __init__(self, *args: Any, legibility_key: str = "eval/legibility", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.legibility_key = legibility_key
        self.reader = None
        self._readings: list = []  # this evaluation's, for more_entry_fields
        self._summary: dict[str, Any] | None = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from scalelong.metrics.digits import DigitReader

        if self.reader is None:
            self.reader = DigitReader()
        self._readings = []  # (sample indices, confidences, classes) of this rank's share
        evaluator = self.evaluator
        self.evaluator = functools.partial(
            evaluator, on_chunk=lambda indices, images: self._readings.append((indices, *self.reader.read(images))))
        try:
            entry = super().evaluate(trainer, pl_module)  # with more_entry_fields' legibility
        finally:
            self.evaluator = evaluator
        summary = self._summary
        metrics = {self.legibility_key: summary["mean_confidence"],
                   f"{self.legibility_key}_fraction": summary["confident"] / summary["num"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=entry["step"])
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.verbose and trainer.is_global_zero:
            print(f"step {entry['step']}: legibility {summary['mean_confidence']:.3f}, {summary['confident']} of "
                  f"{summary['num']} samples read with confidence > {summary['threshold']:g}", flush=True)
        return entry

    def more_entry_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The legibility of the scored samples, from every rank's readings (on every rank)."""
        from scalelong.metrics.digits import legibility, readings_in_order

        self._summary = legibility(*readings_in_order(all_gather_object(self._readings), self.num))
        return {"legibility": self._summary["mean_confidence"], "confident": self._summary["confident"],
                "class_counts": self._summary["class_counts"]}
