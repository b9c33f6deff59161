"""The digits' sample quality along training, cheaply: the Frechet distance (and KID) of EMA
samples in the digit classifier's features (``FIDCallback`` with ``DigitFeatures``), and the same
samples' legibility (the classifier's confidence in each one's digit, ``scalelong.metrics.digits``)."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytorch_lightning as pl
import torch

from scalelong.training.fid_callback import FIDCallback, read_history
from scalelong.utils.distributed import all_gather_object
from scalelong.utils.io import write_text


class DigitQuality(FIDCallback):
    """``FIDCallback``'s evaluation, plus the legibility of the samples it scores: logged as
    ``legibility_key`` (mean confidence) and ``<legibility_key>_fraction`` (share read with
    confidence above 0.9), and stored in each entry of the history file."""

    def __init__(self, *args: Any, legibility_key: str = "eval/legibility", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.legibility_key = legibility_key
        self.reader = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from scalelong.metrics.digits import DigitReader, legibility, readings_in_order

        if self.reader is None:
            self.reader = DigitReader()
        readings: list = []  # (sample indices, confidences, classes) of this rank's share
        evaluator = self.evaluator
        self.evaluator = functools.partial(
            evaluator, on_chunk=lambda indices, images: readings.append((indices, *self.reader.read(images))))
        try:
            entry = super().evaluate(trainer, pl_module)
        finally:
            self.evaluator = evaluator
        summary = legibility(*readings_in_order(all_gather_object(readings), self.num))  # on every rank
        entry.update(legibility=summary["mean_confidence"], confident=summary["confident"],
                     class_counts=summary["class_counts"])
        if trainer.is_global_zero:  # the entry FIDCallback wrote, with the legibility added
            path = self.history_path(trainer)
            history = [entry if e.get("step") == entry["step"] else e for e in read_history(path)]
            write_text(path, json.dumps(history, indent=2) + "\n")
        metrics = {self.legibility_key: summary["mean_confidence"],
                   f"{self.legibility_key}_fraction": summary["confident"] / summary["num"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=entry["step"])
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.verbose and trainer.is_global_zero:
            print(f"step {entry['step']}: legibility {summary['mean_confidence']:.3f}, {summary['confident']} of "
                  f"{summary['num']} samples read with confidence > {summary['threshold']:g}", flush=True)
        return entry
