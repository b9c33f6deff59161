"""Compose the parts of a training run from one resolved configuration and run it.

``train.py`` at the repository root hands Hydra's config to ``train``; tests call ``train``
with configs composed through Hydra's compose API.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from scalelong.config import resolve_resume, to_plain, validate
from scalelong.data.module import DiffusionDataModule
from scalelong.io import write_text
from scalelong.training.callbacks import PeriodicCheckpoint, ProgressPrinter, SampleGrid
from scalelong.training.checkpoint_io import AtomicCheckpointIO
from scalelong.training.module import DiffusionModule


def build_loggers(config: Mapping[str, Any], run_dir: Path) -> list:
    from pytorch_lightning.loggers import CSVLogger

    cfg = config.get("logger") or {}
    loggers = []
    if cfg.get("csv"):
        # csv/version_K/metrics.csv: a resumed run opens a new version instead of overwriting.
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    wandb_cfg = cfg.get("wandb")
    if wandb_cfg:
        logger = _wandb_logger(wandb_cfg, config, run_dir)
        if logger is not None:
            loggers.append(logger)
    return loggers


def _wandb_logger(wandb_cfg: Mapping[str, Any], config: Mapping[str, Any], run_dir: Path):
    from pytorch_lightning.loggers import WandbLogger

    # One W&B run per run folder: a resumed run keeps its id and continues the same W&B run.
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    if not id_file.is_file() and pl.utilities.rank_zero_only.rank == 0:
        write_text(id_file, run_id + "\n")
    # Offline unless asked otherwise, so a run never waits on the network; WANDB_MODE wins.
    mode = os.environ.get("WANDB_MODE") or ("offline" if wandb_cfg.get("offline", True) else "online")
    try:
        logger = WandbLogger(
            project=wandb_cfg.get("project", "scalelong"), entity=wandb_cfg.get("entity"),
            group=wandb_cfg.get("group"), tags=list(wandb_cfg.get("tags") or []),
            name=run_dir.name, id=run_id, resume="allow", save_dir=str(run_dir), mode=mode,
            config=config, settings=_wandb_settings(),
        )
        if pl.utilities.rank_zero_only.rank == 0:
            logger.experiment  # start the W&B run now, where a failure can still be caught
        return logger
    except Exception as err:  # a logging problem must never stop training
        warnings.warn(f"W&B logger disabled ({type(err).__name__}: {err}); metrics still go to the CSV logger")
        return None


def _wandb_settings():
    import wandb

    # Online runs give up on an unreachable server after 30 s instead of the default 90 s.
    return wandb.Settings(init_timeout=30)


def build_extra_callbacks(spec: Mapping[str, Any] | None) -> list[pl.Callback]:
    """Instantiate the ``callbacks`` config group: ``{name: {_target_: ..., **kwargs}}``."""
    from hydra.utils import instantiate

    return [instantiate(c) for c in (spec or {}).values() if c]


def build_trainer(config: Mapping[str, Any], run_dir: Path, callbacks: list) -> pl.Trainer:
    t = dict(config["trainer"])
    precision = str(t.get("precision", "32-true"))
    plugins: list = [AtomicCheckpointIO()]
    if precision in ("16-mixed", "16") and t.get("accelerator") == "cpu":
        # Lightning would quietly switch fp16 AMP on the CPU to bf16; torch runs it, so the
        # paper's precision (and its loss scaler) can be tried and tested on the CPU as asked.
        from pytorch_lightning.plugins.precision import MixedPrecision

        plugins.append(MixedPrecision("16-mixed", "cpu"))
        precision = None
    return pl.Trainer(
        accelerator=t.get("accelerator", "auto"), devices=t.get("devices", 1), num_nodes=t.get("num_nodes", 1),
        strategy=t.get("strategy", "auto"), precision=precision,
        max_steps=int(config["train"]["max_steps"]), max_epochs=-1,
        log_every_n_steps=int(t.get("log_every_n_steps", 50)),
        logger=build_loggers(config, run_dir) or False,
        callbacks=callbacks, plugins=plugins,
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # PeriodicCheckpoint does it
        enable_progress_bar=False,  # ProgressPrinter does it
        enable_model_summary=bool(t.get("enable_model_summary", True)),
        use_distributed_sampler=False,  # StepBatchSampler shards the data itself
        limit_val_batches=0, num_sanity_val_steps=0,
        deterministic=bool(t.get("deterministic", False)),
    )


def _quick_eval(module: DiffusionModule, data: DiffusionDataModule, num: int, run_dir: Path) -> dict[str, float]:
    """KID and FID on a CPU-sized count at the end of a short run (the quickstart); written to
    quick_eval.json. Missing Inception weights skip it with a note: the run itself succeeded."""
    from scalelong.errors import DataError
    from scalelong.metrics.evaluation import nan_to_none, quick_kid_fid

    try:
        result = quick_kid_fid(module, data.data, num=num)
    except DataError as err:
        print(f"KID/FID skipped: {err}", flush=True)
        return {}
    write_text(run_dir / "quick_eval.json", json.dumps({k: nan_to_none(v) for k, v in result.items()}, indent=2,
                                                       default=str) + "\n")
    return {"eval/quick_kid": float(result["kid"]), "eval/quick_fid": float(result["fid"])}


def _only_the_ema_copy_in_eval_mode(module: DiffusionModule) -> bool:
    ema = {id(m) for m in module.ema.modules()}
    return all(m.training or id(m) in ema for m in module.modules())


def train(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train as ``cfg`` says; return the run folder, the last checkpoint and the final metrics."""
    config = to_plain(cfg)
    validate(config)
    ckpt_path = resolve_resume(config)
    run_dir = Path(config["resume"] or config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(int(config["seed"]))  # the initial weights
    module = DiffusionModule(config)
    data = DiffusionDataModule(config["dataset"], int(config["train"]["batch_size"]), int(config["seed"]),
                               num_workers=int(config["train"].get("num_workers", 0)))
    s, c = config["sample"], config["checkpoint"]
    checkpoints = PeriodicCheckpoint(run_dir / "checkpoints", c["every_n_steps"], c.get("keep_every_n_steps"))
    grids = SampleGrid(run_dir / "samples", s["every_n_steps"], s["num"], s["sampler"], s["steps"], s["seed"],
                       s.get("guidance_scale", 0.0))
    callbacks = [ProgressPrinter(config["trainer"].get("log_every_n_steps", 50)), grids, checkpoints,
                 *build_extra_callbacks(config.get("callbacks"))]
    trainer = build_trainer(config, run_dir, callbacks)
    if trainer.is_global_zero:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))

    with warnings.catch_warnings():
        if _only_the_ema_copy_in_eval_mode(module):
            # EMA.train keeps the average in eval mode on purpose; Lightning would count its
            # modules and warn that they are "in eval mode at the start of training".
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    quick = config.get("quick_eval")
    if quick and trainer.is_global_zero:
        metrics.update(_quick_eval(module, data, int(quick["num"]), run_dir))
    if trainer.is_global_zero:  # what a sweeper (or a script) reads back
        write_text(run_dir / "metrics.json", json.dumps({"step": trainer.global_step, **metrics}, indent=2) + "\n")
    for logger in trainer.loggers:
        logger.finalize("success")
    return {"run_dir": run_dir, "checkpoint": checkpoints.last_path, "samples": grids.last_path,
            "metrics": metrics, "trainer": trainer, "module": module}
