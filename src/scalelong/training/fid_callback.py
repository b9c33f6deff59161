"""FID and KID of EMA samples during training, a history file, and the best checkpoint by FID.

Every ``every_n_steps`` optimizer steps, ``num_samples`` samples of the EMA model (DPM-Solver,
50 steps by default: the official protocol is 10k samples every 50k steps) are drawn, shared over
all ranks (see ``scalelong.metrics.sampling``: the total is exact and sample i does not depend on
the world size), turned into Inception features, and reduced as float64 sums. Then:

* ``eval/fid`` and ``eval/kid`` go to every logger (at the evaluation's step) and to
  ``trainer.callback_metrics``;
* rank 0 adds ``{step, fid, kid, num, sampler, steps, ...}`` to ``<run>/fid_history.json`` (a JSON
  list, written atomically; an entry for the same step is replaced, as after a resume);
* the best entry is read back from that file, and when it is this step every rank calls
  ``trainer.save_checkpoint(<run>/checkpoints/best_fid.ckpt)``.

Reference statistics: ``ref`` (a path), or by default the data set's
``<cache>/fid_stats/{dataset}_{mode}_{split}_{res}.npz`` (make it with ``scripts/make_fid_stats.py``,
or set ``build_reference: true`` to compute it from the data set at the start of training).
Missing statistics or weights stop the run before its first step, with one message.

Conditional models sample with ``guidance_scale`` (the data set's ``fid.guidance_scale``). A
latent text-to-image model (MS-COCO) decodes its samples with ``dataset.decoder`` and conditions
sample i on a caption of the features' val split (``scalelong.metrics.conditioning``); its
reference is COCO's val2014 at 256 px (``dataset.coco_dir``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from scalelong.errors import ConfigError, DataError
from scalelong.io import write_text
from scalelong.metrics.conditioning import prepare_sampling
from scalelong.metrics.distributed import rank_zero_first
from scalelong.metrics.evaluation import evaluate_module
from scalelong.metrics.inception import check_mode, load_inception
from scalelong.metrics.reference import (check_compatible, default_reference_path, load_reference,
                                        make_reference_stats, reference_resolution)


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
    def __init__(self, every_n_steps: int = 50000, num_samples: int = 10000, sampler: str = "dpm_solver",
                 steps: int = 50, seed: int = 0, guidance_scale: float = 0.0, mode: str = "clean",
                 ref: str | None = None, split: str = "train",
                 inception_weights: str | None = None, download: bool = True, build_reference: bool = False,
                 chunk_size: int = 250, feature_batch: int = 50, kid: bool = True, kid_max: int = 5000,
                 at_end: bool = False, history_file: str = "fid_history.json",
                 best_checkpoint: str | None = "checkpoints/best_fid.ckpt", dirpath: str | None = None,
                 feature_extractor: Any = None, verbose: bool = True):
        self.every = int(every_n_steps)
        self.num, self.sampler, self.steps, self.seed = int(num_samples), sampler, int(steps), int(seed)
        self.guidance_scale = float(guidance_scale or 0.0)
        self.contexts = None  # caption embeddings of a text-to-image model's samples (set up in setup)
        self.mode = check_mode(mode)
        self.ref_path, self.split = ref, split
        self.weights_path, self.download = inception_weights, bool(download)
        self.build_reference = bool(build_reference)
        self.chunk_size, self.feature_batch = int(chunk_size), int(feature_batch)
        self.kid_max = int(kid_max) if kid else 0
        self.at_end = bool(at_end)
        self.history_name, self.best_name, self.dirpath = history_file, best_checkpoint, dirpath
        self.extractor = feature_extractor
        self.verbose = bool(verbose)
        self.ref = None
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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data_cfg = pl_module.config["dataset"]
        if int(data_cfg.get("channels", 3)) not in (1, 3) and not data_cfg.get("latent_scale"):
            raise ConfigError(f"FID needs images with 1 or 3 channels; data set {data_cfg['name']!r} has "
                              f"{data_cfg['channels']}; drop callbacks=fid")
        # latents need a decoder; captions come from the val split of the features (U-ViT's protocol)
        self.contexts = prepare_sampling(pl_module, seed=self.seed)
        device = trainer.strategy.root_device  # the module moves there only after setup
        if self.extractor is None:
            with rank_zero_first():  # one download into the shared cache
                self.extractor = load_inception(self.mode, self.weights_path, device,
                                                download=self.download, verbose=self.verbose)
        elif hasattr(self.extractor, "to"):
            self.extractor = self.extractor.to(device)
        mode = getattr(self.extractor, "mode", self.mode)
        path = Path(self.ref_path) if self.ref_path else default_reference_path(
            data_cfg["name"], mode, self.split, reference_resolution(data_cfg))
        if not path.is_file() and self.build_reference:
            with rank_zero_first():
                if trainer.is_global_zero and not path.is_file():
                    print(f"FID: computing reference statistics of {data_cfg['name']} ({self.split}) -> {path}",
                          flush=True)
                    make_reference_stats(data_cfg, self.extractor, self.split, out=path, kid_max=self.kid_max or 5000,
                                         batch_size=self.feature_batch, progress=self.verbose)
        if not path.is_file():
            raise DataError(f"FID reference statistics {path} do not exist; make them with `python "
                            f"scripts/make_fid_stats.py dataset={data_cfg['name']} mode={mode} split={self.split}`, "
                            "set callbacks.fid.ref=PATH, or set callbacks.fid.build_reference=true")
        self.ref = load_reference(path)
        for warning in check_compatible(self.ref, mode, getattr(self.extractor, "sha1", None), self.extractor.dim):
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
        result = evaluate_module(pl_module, self.ref, self.extractor, self.num, self.sampler, self.steps, self.seed,
                                 self.chunk_size, self.kid_max, self.feature_batch,
                                 generate_kwargs={"guidance_scale": self.guidance_scale}, contexts=self.contexts)
        entry = {"step": step, "fid": result["fid"], "kid": result["kid"], "num": result["num"],
                 "sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                 "kid_std": result["kid_std"],
                 "mode": result["mode"], "inception_sha1": result["inception_sha1"], "ref": result["ref"],
                 "ref_sha1": result["ref_sha1"], "seconds": result["seconds"], "world_size": result["world_size"],
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        is_best = False
        if trainer.is_global_zero:
            path = self.history_path(trainer)
            history = [e for e in read_history(path) if e.get("step") != step] + [entry]
            history.sort(key=lambda e: e["step"])
            write_text(path, json.dumps(history, indent=2) + "\n")
            best = best_entry(read_history(path))  # decided from the file itself
            is_best = best is not None and best["step"] == step
        is_best = bool(trainer.strategy.broadcast(is_best, src=0))
        metrics = {"eval/fid": float(result["fid"])}
        if result["kid"] is not None:
            metrics["eval/kid"] = float(result["kid"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        best_path = self.best_path(trainer)
        if is_best and best_path is not None:
            trainer.save_checkpoint(best_path)  # every rank calls it; rank 0 writes
        if self.verbose and trainer.is_global_zero:
            kid = "" if result["kid"] is None else f"  KID {result['kid']:.5f}"
            best = "  best so far" if is_best else ""
            print(f"step {step}: FID {result['fid']:.3f}{kid} on {self.num} samples ({self.sampler}, "
                  f"{self.steps} steps, {result['seconds']:.0f}s){best}", flush=True)
        return entry

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
