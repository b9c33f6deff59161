"""``python train.py`` / ``scalelong-train``: compose the configuration (Hydra), check it, build
every part from its own config node and train. The only place that sees the whole configuration."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scalelong.cli import (JobFailed, _remove_if_untouched, check_group_choices, check_launcher,
                           check_output_folder, fail, skip_the_last_collection)
from scalelong.config import conf_dir, describe_accelerator, resolve_resume, to_plain, world_size
from scalelong.cli.lost_rank import watch_the_other_ranks
from scalelong.utils.errors import EXIT_DIVERGED, ConfigError, TrainingDiverged
from scalelong.utils.io import write_text


def main() -> int:
    """The command-line entry point: ``scalelong-train [group=option ...] [key=value ...]``."""
    import hydra

    skip_the_last_collection()
    check_output_folder(sys.argv[1:])
    check_launcher(sys.argv[1:])
    try:
        config_path = str(conf_dir())
    except ConfigError as err:
        fail(str(err))
    check_group_choices(sys.argv[1:])
    hydra_main = hydra.main(version_base="1.3", config_path=config_path, config_name="train")(run_training)
    return hydra_main()


def check_before_start(config: Mapping[str, Any]) -> None:
    """Checks that fail fast with one readable line, before anything is built or written."""
    from scalelong.build import build_strategy
    from scalelong.data.sampler import check_global_batch
    from scalelong.training.lr_schedule import check_lr_decay

    build_strategy(config["scaling"])  # an unknown strategy, option or a bad kappa
    check_global_batch(int(config["train"]["batch_size"]), world_size(config["trainer"]))
    if int(config["train"]["max_steps"]) < 1:
        raise ConfigError(f"train.max_steps must be at least 1, got {config['train']['max_steps']}")
    check_lr_decay(config["train"].get("lr_decay"))


def _sweep_job_needs_own_processes(config: dict) -> bool:
    """True for a job of a local multirun sweep that trains on several processes.

    Lightning starts ranks 1..W-1 by re-running the command line; inside a sweep that command
    line is the whole sweep, so each extra rank would run every job. Such a job therefore runs
    as a fresh single-run process of its own (whose extra ranks re-run just that job), and the
    sweep only waits for it: a failing or crashing job ends its own processes, not the sweep.
    Jobs that a cluster launcher already started (SLURM, torchrun) are left alone.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or world_size(config["trainer"]) <= 1:
        return False
    launched_externally = any(v in os.environ for v in ("SLURM_PROCID", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"))
    return not launched_externally and "BasicLauncher" in str(hc.launcher.get("_target_", ""))


def _run_job_in_own_process() -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = hc.runtime.output_dir
    # The job's own overrides (this point of the sweep), in single-run mode, in the job's folder.
    command = [sys.executable, os.path.abspath(sys.argv[0]), *hc.overrides.task,
               f'hydra.run.dir="{job_dir}"', "hydra.output_subdir=null"]
    code = subprocess.call(command, cwd=hc.runtime.cwd)
    if code != 0:
        raise JobFailed(f"job {hc.job.num} ({', '.join(hc.overrides.task)}) exited with status {code}; "
                        f"see {job_dir}")
    metrics_file = Path(job_dir) / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def _optimized_value(config: dict, metrics: dict) -> float | None:
    """The value a sweeper minimises, when ``optimized_metric`` is set."""
    name = config.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise JobFailed(f"optimized_metric {name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}")
    return float(metrics[name])


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def _config_error(err: ConfigError, run_dir: Path | None) -> None:
    if run_dir is not None:
        _remove_if_untouched(run_dir)
    if _in_multirun():  # let the sweep go on with its other jobs
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise JobFailed(str(err)) from None
    fail(str(err))


def run_training(cfg: DictConfig) -> Any:
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # called outside Hydra
        run_dir = None
    try:
        config = to_plain(cfg)
        check_before_start(config)  # before the slow imports: bad input costs a second
        resolve_resume(config)
    except ConfigError as err:
        _config_error(err, run_dir)
    if _sweep_job_needs_own_processes(config):
        return _optimized_value(config, _run_job_in_own_process())

    watch = watch_the_other_ranks(config, run_dir)
    try:
        result = train(config)
    except TrainingDiverged as err:
        if _in_multirun():  # one diverged job of a sweep: its line, and the sweep goes on with the others
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise JobFailed(str(err)) from None
        fail(str(err), code=EXIT_DIVERGED)
    except ConfigError as err:
        _config_error(err, run_dir)
    except SystemExit as err:
        if not _stopped_by_a_signal(err):
            raise
        print(f"stopped by a signal; checkpoint saved to {run_dir}/checkpoints/last.ckpt. Run the same "
              f"command again (it resumes in the same folder) or pass resume={run_dir}", file=sys.stderr, flush=True)
        raise SystemExit(0) from None
    except Exception as err:
        if watch is None or not watch.lost_a_rank(err):
            if watch is not None:
                watch.armed = False  # this rank's own error: its traceback, not a report about another
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            import traceback

            traceback.print_exception(err)
        watch.report_failed_collective()  # a few lines and exit status 4
    if result["trainer"] is not None and result["trainer"].is_global_zero:
        print(f"run folder: {result['run_dir']}")
    return _optimized_value(config, result["metrics"])


def _stopped_by_a_signal(err: BaseException) -> bool:
    """Whether ``err`` is Lightning's SIGTERMException (a SystemExit). Looked up, not imported:
    a run that stops on its input (missing data, a refused checkpoint) does so before Lightning
    is imported, and only Lightning raises it."""
    lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return lightning is not None and isinstance(err, lightning.SIGTERMException)


# --- the composition root ---------------------------------------------------------------------


def train(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train as ``cfg`` says; return the run folder, the last checkpoint, the final metrics, the
    trainer and the module. Every part is built here from its own config node."""
    from hydra.utils import instantiate

    from scalelong.checkpoints import read_checkpoint
    from scalelong.data import build_dataset

    config = to_plain(cfg)
    check_before_start(config)
    finished = _finished_run(config)
    if finished is not None:  # a sweep run again (to resume it) skips the jobs that are done
        print(f"run folder: {finished['run_dir']} finished already at step {finished['metrics']['step']}; "
              "not run again (delete its metrics.json to train it anew)", flush=True)
        return finished
    ckpt_path = resolve_resume(config)
    # Everything that can fail on the user's input fails here, before the run writes anything
    # or starts a logger (and, for the checkpoint and the data, before Lightning is imported):
    # a refused or unreadable checkpoint, missing data, a checkpoint of another model, weights.
    checkpoint = read_checkpoint(ckpt_path, mmap=True) if ckpt_path else None
    dataset = build_dataset(config["dataset"])

    from scalelong.data.module import DiffusionDataModule
    from scalelong.training.callbacks import ConfigInCheckpoints, PeriodicCheckpoint, ProgressPrinter, SampleGrid
    from scalelong.training.end_of_run import end_of_run_estimate, grid_at_end, load_inception_for_the_end, quick_eval

    t = config["train"]
    data = DiffusionDataModule(config["dataset"], int(t["batch_size"]), int(config["seed"]),
                               num_workers=int(t.get("num_workers", 0)))
    data.data = dataset
    module = build_module(config)
    if checkpoint is not None:
        _check_checkpoint_fits(module, checkpoint, ckpt_path)
    extra_callbacks = [instantiate(spec) for spec in (config.get("callbacks") or {}).values() if spec]
    for callback in extra_callbacks:
        if hasattr(callback, "prepare"):
            callback.prepare(module.model, config["dataset"])
    inception = load_inception_for_the_end(config) if config.get("quick_eval") else None
    run_dir = Path(config["resume"] or config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)

    s, c = config["sample"], config["checkpoint"]
    checkpoints = PeriodicCheckpoint(run_dir / "checkpoints", c["every_n_steps"], c.get("keep_every_n_steps"),
                                     c.get("stop_check_seconds", 1.0))
    grids = SampleGrid(run_dir / "samples", s["every_n_steps"], s["num"], s["sampler"], s["steps"], s["seed"],
                       s.get("guidance_scale", 0.0), at_end=grid_at_end(config))
    progress = ProgressPrinter(config["trainer"].get("log_every_n_steps", 50),
                               after_training=end_of_run_estimate(config, inception))
    from scalelong.training.posthoc_ema import PostHocEMA  # first: checkpoints see this step's averages

    callbacks = [*PostHocEMA.for_run(config["ema"], run_dir), progress, grids, checkpoints,
                 ConfigInCheckpoints(config), *extra_callbacks]
    trainer = build_trainer(config["trainer"], int(t["max_steps"]), build_loggers(config, run_dir), callbacks, run_dir)
    if trainer.is_global_zero:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))

    with warnings.catch_warnings():
        if _only_the_ema_copy_in_eval_mode(module):
            # EMA.train keeps the average in eval mode on purpose; Lightning would count its
            # modules and warn that they are "in eval mode at the start of training".
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # Lightning 2.6's own use of a torch 2.14 deprecation, nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    quick = config.get("quick_eval")
    if quick:  # on every rank: the evaluation shares its work (and its collectives) over all of them
        metrics.update(quick_eval(module, data, quick, s, run_dir, trainer.is_global_zero, inception[0]))
    if trainer.is_global_zero:  # what a sweeper (or a script) reads back
        write_text(run_dir / "metrics.json", json.dumps({"step": trainer.global_step, **metrics}, indent=2) + "\n")
    for logger in trainer.loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            # the results as W&B summary values, then end this W&B run: the next job of a sweep
            # in this process must not log into it
            from scalelong.training.loggers import finish_wandb_run

            finish_wandb_run(logger, config, run_dir, metrics, trainer.global_step)
    return {"run_dir": run_dir, "checkpoint": checkpoints.last_path, "samples": grids.last_path,
            "metrics": metrics, "trainer": trainer, "module": module}


def _same_settings(stored: Any, current: Any) -> bool:
    """Every setting the stored run had is the same now. A key only the current config has is one
    added to the configs since (with its default): it does not make a finished run unfinished."""
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        return all(k in current and _same_settings(v, current[k]) for k, v in stored.items())
    return stored == current


def _finished_run(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result of this run folder's earlier, finished run: its metrics.json reached max_steps
    and its configuration is this one (apart from where it runs)."""
    run_dir = Path(config.get("resume") or config.get("run_dir") or ".")
    metrics_file, config_file = run_dir / "metrics.json", run_dir / "config.yaml"
    if not (config.get("auto_resume", True) and metrics_file.is_file() and config_file.is_file()):
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
        stored = OmegaConf.to_container(OmegaConf.load(config_file))
    except (ValueError, OSError):
        return None
    same = _same_settings({k: v for k, v in stored.items() if k != "run_dir"}, config)
    if not same or int(metrics.get("step", -1)) < int(config["train"]["max_steps"]):
        return None
    return {"run_dir": run_dir, "checkpoint": run_dir / "checkpoints" / "last.ckpt", "samples": None,
            "metrics": {k: v for k, v in metrics.items() if k != "step"} | {"step": metrics["step"]},
            "trainer": None, "module": None}


def _check_checkpoint_fits(module, checkpoint: Mapping[str, Any], path: str) -> None:
    """One line, not Lightning's list of missing keys, when a checkpoint is of another model."""
    stored = checkpoint.get("state_dict") or {}
    ours = module.state_dict()
    missing = sorted(set(ours) - set(stored))
    unexpected = sorted(set(stored) - set(ours))
    shapes = sorted(k for k in set(ours) & set(stored) if tuple(ours[k].shape) != tuple(stored[k].shape))
    if missing or unexpected or shapes:
        what = (f"{len(missing)} weights missing" if missing else f"{len(unexpected)} weights unknown" if unexpected
                else f"{len(shapes)} weights of another shape, e.g. {shapes[0]}")
        raise ConfigError(f"checkpoint {path} is of another model than this configuration builds ({what}); "
                          "continue a run with the overrides it was started with (its config.yaml lists them)")


def build_module(config: Mapping[str, Any]):
    """The ``DiffusionModule`` of a run: network (``model`` + ``scaling``), schedule (``diffusion``),
    data space (``dataset``), optimizer (``optim``) and the step settings (``train``, ``ema``);
    initial weights from ``seed``."""
    import torch
    from hydra.utils import instantiate

    from scalelong.build import build_network, build_schedule, build_space
    from scalelong.models.compile import training_compile
    from scalelong.training.module import DiffusionModule

    torch.manual_seed(int(config["seed"]))
    data_cfg, model_cfg, t = config["dataset"], config["model"], config["train"]
    return DiffusionModule(
        build_network(model_cfg, config["scaling"], data_cfg), build_schedule(config["diffusion"]),
        build_space(data_cfg), instantiate(config["optim"]), ema_decay=config["ema"]["decay"],
        ema_warmup=config["ema"].get("warmup", False),
        warmup_steps=t.get("warmup_steps", 0), grad_clip=t.get("grad_clip"),
        max_nonfinite_in_row=t.get("max_nonfinite_in_row", 20), seed=config["seed"],
        channels_last=model_cfg.get("channels_last", False), compile=training_compile(config) or False,
        lr_decay=t.get("lr_decay"), max_steps=t["max_steps"], min_snr_gamma=t.get("min_snr_gamma"))


def build_loggers(config: Mapping[str, Any], run_dir: Path) -> list:
    """The ``logger`` group's loggers (``csv``, ``wandb``), writing into the run folder."""
    from hydra.utils import instantiate

    spec = config.get("logger") or {}
    loggers = []
    if spec.get("csv"):
        loggers.append(instantiate(spec["csv"], save_dir=str(run_dir)))
    if spec.get("wandb"):
        # plain containers, not instantiated: the run's configuration as W&B's config
        logger = instantiate(spec["wandb"], save_dir=str(run_dir), name=run_dir.name, run_config=config,
                             _recursive_=False, _convert_="all")
        if logger is not None:
            loggers.append(logger)
    return loggers


def build_trainer(trainer_cfg: Mapping[str, Any], max_steps: int, loggers: list, callbacks: list, run_dir: Path):
    """The ``trainer`` group's ``pytorch_lightning.Trainer``, with what every run fixes."""
    from hydra.utils import instantiate

    from scalelong.training.checkpoint_io import AtomicCheckpointIO

    t = dict(trainer_cfg)
    precision = str(t.pop("precision", "32-true"))
    plugins: list = [AtomicCheckpointIO()]
    if precision in ("16-mixed", "16") and t.get("accelerator") == "cpu":
        # Lightning would quietly switch fp16 AMP on the CPU to bf16; torch runs it, so the
        # paper's precision (and its loss scaler) can be tried and tested on the CPU as asked.
        from pytorch_lightning.plugins.precision import MixedPrecision

        plugins.append(MixedPrecision("16-mixed", "cpu"))
        precision = None
    with _without_lightnings_advert():
        trainer = instantiate(
            t, precision=precision, max_steps=max_steps, max_epochs=-1, logger=loggers or False,
            callbacks=callbacks, plugins=plugins, default_root_dir=str(run_dir),
            enable_checkpointing=False,  # PeriodicCheckpoint does it
            enable_progress_bar=False,  # ProgressPrinter does it
            use_distributed_sampler=False,  # StepBatchSampler shards the data itself
            limit_val_batches=0, num_sanity_val_steps=0)
    if trainer.is_global_zero:  # where it trains (trainer=auto chose), and how to use idle GPUs
        print(describe_accelerator(trainer_cfg), flush=True)
    return trainer


@contextlib.contextmanager
def _without_lightnings_advert():
    """Lightning 2.6 prints a tip to install its cloud logger whenever a Trainer is made; a run's
    first screen is for what the run does."""
    import logging

    def not_the_advert(record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)

    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    log.addFilter(not_the_advert)
    try:
        yield
    finally:
        log.removeFilter(not_the_advert)


def _only_the_ema_copy_in_eval_mode(module) -> bool:
    ema = {id(m) for m in module.ema.modules()}
    return all(m.training or id(m) in ema for m in module.modules())


if __name__ == "__main__":
    sys.exit(main())
