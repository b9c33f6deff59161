"""FID and KID of EMA samples every ``every_n_steps`` during training (the official protocol: 10k
samples, DPM-Solver 50 steps, every 50k steps), through the same ``FIDEvaluator`` as
``scripts/evaluate.py``, the network in ``precision`` (None: bf16 on CUDA, fp32 elsewhere). Logs ``eval/fid`` and ``eval/kid``, lists every evaluation in
``fid_history.json`` and keeps ``checkpoints/best_fid.ckpt`` (decided from that file)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from scalelong.metrics.evaluation import FIDEvaluator
from scalelong.metrics.inception import check_mode
from scalelong.precision import sampling_precision
from scalelong.utils.errors import ConfigError, DataError
from scalelong.utils.io import write_text


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a ``fid_history.json`` (an empty list when there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); move it away to start a new FID history") from None
    if not isinstance(history, list):
        raise DataError(f"{path} should hold a JSON list of evaluations; move it away to start a new one")
    return history


def best_entry(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry with the lowest finite FID (the earliest step on ties)."""
    valid = [e for e in history if isinstance(e.get("fid"), (int, float)) and e["fid"] == e["fid"]]
    return min(valid, key=lambda e: (e["fid"], e["step"])) if valid else None


class FIDCallback(pl.Callback):
    """``dataset`` is the data set's config (``${dataset}``; default: the training data's): its name,
    images and FID protocol."""

    def __init__(self, dataset: Mapping[str, Any] | None = None, every_n_steps: int = 50000,
                 num_samples: int = 10000, sampler: str = "dpm_solver", steps: int = 50, seed: int = 0,
                 guidance_scale: float = 0.0, mode: str = "clean", ref: str | None = None, split: str = "train",
                 inception_weights: str | None = None, download: bool = True, build_reference: bool = False,
                 chunk_size: int = 250, feature_batch: int = 50, kid: bool = True, kid_max: int = 5000,
                 at_end: bool = False, history_file: str = "fid_history.json",
                 best_checkpoint: str | None = "checkpoints/best_fid.ckpt", dirpath: str | None = None,
                 feature_extractor: Any = None, verbose: bool = True, fid_key: str = "eval/fid",
                 kid_key: str = "eval/kid", label: str = "FID", precision: str | None = None):
        self.dataset = dict(dataset or {})
        self.every = int(every_n_steps)
        self.num, self.sampler, self.steps, self.seed = int(num_samples), sampler, int(steps), int(seed)
        self.guidance_scale = float(guidance_scale or 0.0)
        # a given feature extractor says what it is (the digit classifier), else an Inception mode
        self.mode = getattr(feature_extractor, "mode", None) or check_mode(mode)
        self.ref_path, self.split = ref, split
        self.weights_path, self.download = inception_weights, bool(download)
        self.build_reference = bool(build_reference)
        self.chunk_size, self.feature_batch = int(chunk_size), int(feature_batch)
        self.kid_max = int(kid_max) if kid else 0
        self.at_end = bool(at_end)
        self.history_name, self.best_name, self.dirpath = history_file, best_checkpoint, dirpath
        self.extractor = feature_extractor
        self.verbose = bool(verbose)
        # Named for what is measured: another feature extractor is not FID (the digits study
        # logs eval/fd_digits, the Frechet distance in a digit classifier's features).
        self.fid_key, self.kid_key, self.label = fid_key, kid_key, label
        self.evaluator: FIDEvaluator | None = None
        # checked now (one line before training); the device default is decided at each evaluation
        self.precision = None if precision is None else sampling_precision("cpu", precision, "callbacks.fid.precision")
        self._last_step = -1
        if self.num < 2:
            raise ConfigError(f"callbacks.fid.num_samples must be at least 2, got {num_samples}")
        from scalelong.diffusion import SAMPLERS

        if sampler not in SAMPLERS:
            raise ConfigError(f"callbacks.fid.sampler={sampler!r} is not a sampler; "
                              f"valid: {', '.join(sorted(SAMPLERS))}")

    # --- paths ------------------------------------------------------------------------------------

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    def history_path(self, trainer: pl.Trainer) -> Path:
        return self.run_dir(trainer) / self.history_name

    def best_path(self, trainer: pl.Trainer) -> Path | None:
        return None if not self.best_name else self.run_dir(trainer) / self.best_name

    # --- set-up: weights and reference statistics, before the first step ---------------------------

    def prepare(self, model: Any, dataset: Mapping[str, Any] | None = None) -> None:
        """Before the run writes anything: Inception weights, reference statistics, captions and
        decoder, so that what is missing stops it at once with one line. Statistics to be built
        (``build_reference``) are built in ``setup``, when all ranks can share the work."""
        self.dataset = self.dataset or dict(dataset or {})
        if self.build_reference and self.extractor is None:
            from scalelong.metrics.inception import resolve_inception_weights

            resolve_inception_weights(self.mode, self.weights_path, download=self.download, verbose=self.verbose)
            return
        self.evaluator = self._evaluator(model, "cpu")

    def _evaluator(self, model: Any, device: Any) -> FIDEvaluator:
        return FIDEvaluator(model, self.dataset, mode=self.mode, ref=self.ref_path, split=self.split,
                            inception_weights=self.weights_path, download=self.download, extractor=self.extractor,
                            device=device, build_reference=self.build_reference, kid_max=self.kid_max,
                            feature_batch=self.feature_batch, seed=self.seed, verbose=self.verbose)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.dataset = self.dataset or dict(getattr(trainer.datamodule, "dataset_cfg", None) or {})
        device = trainer.strategy.root_device  # the module moves there only after setup
        if self.evaluator is None:
            self.evaluator = self._evaluator(pl_module.model, device)
        else:
            self.evaluator.model = pl_module.model
            self.evaluator.extractor = self.evaluator.extractor.to(device)
        for warning in self.evaluator.warnings:
            if trainer.is_global_zero:
                print(f"FID warning: {warning}", flush=True)

    # --- evaluation ---------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        step = trainer.global_step
        self._last_step = step
        result = self.evaluator(self.num, self.sampler, self.steps, self.seed, self.chunk_size, self.guidance_scale,
                                precision=self.precision)
        entry = {"step": step, "fid": result["fid"], "kid": result["kid"], "num": result["num"],
                 "sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                 "precision": result["precision"],
                 "kid_std": result["kid_std"],
                 "mode": result["mode"], "inception_sha1": result["inception_sha1"], "ref": result["ref"],
                 "ref_sha1": result["ref_sha1"], "seconds": result["seconds"], "world_size": result["world_size"],
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        entry.update(self.more_entry_fields(trainer))
        is_best = False
        if trainer.is_global_zero:
            path = self.history_path(trainer)
            history = [e for e in read_history(path) if e.get("step") != step] + [entry]
            history.sort(key=lambda e: e["step"])
            write_text(path, json.dumps(history, indent=2) + "\n")
            best = best_entry(read_history(path))  # decided from the file itself
            is_best = best is not None and best["step"] == step
        is_best = bool(trainer.strategy.broadcast(is_best, src=0))
        metrics = {self.fid_key: float(result["fid"])}
        if result["kid"] is not None:
            metrics[self.kid_key] = float(result["kid"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        best_path = self.best_path(trainer)
        if is_best and best_path is not None:
            trainer.save_checkpoint(best_path, weights_only=False)  # every rank calls it; rank 0 writes
        if self.verbose and trainer.is_global_zero:
            kid = "" if result["kid"] is None else f"  KID {result['kid']:.5f}"
            best = "  best so far" if is_best else ""
            print(f"step {step}: {self.label} {result['fid']:.3f}{kid} on {self.num} samples ({self.sampler}, "
                  f"{self.steps} steps, {result['precision']}, {result['seconds']:.0f}s){best}", flush=True)
        return entry

    def more_entry_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Fields a subclass adds to this evaluation's history entry, called on every rank once the
        samples are scored and before rank 0 writes the history (so collectives may run here):
        none here."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
