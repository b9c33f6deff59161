"""The configuration: where ``conf/`` is, the resolvers its YAML files use, composing it from
Python (tests, scripts, notebooks), and the checks on a composed run that need no Lightning."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scalelong.utils.errors import ConfigError

CONF_ENV = "SCALELONG_CONF"


def conf_dir() -> Path:
    """The configuration folder: ``$SCALELONG_CONF``, else the checkout's ``conf/``."""
    path = Path(os.environ.get(CONF_ENV) or Path(__file__).resolve().parents[2] / "conf")
    if not (path / "train.yaml").is_file():
        raise ConfigError(f"no configuration at {path} (train.yaml missing); run from a checkout of scalelong "
                          f"(pip install -e .) or point ${CONF_ENV} at its conf/ folder")
    return path


# --- resolvers --------------------------------------------------------------------------------


_CLAIMED: dict[str, str] = {}  # a new folder's name -> the folder this process claimed for it


def _claimed(name: str) -> str:
    """A folder no other run or sweep has: ``name``, else ``name_2``, ``_3``, ..., claimed by
    creating it (``mkdir`` fails for all but one of several processes wanting the same name), and
    remembered, so that asking again in this process gives the same folder."""
    if name not in _CLAIMED:
        base = Path(name)
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            folder = base if n == 1 else base.with_name(f"{base.name}_{n}")
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            _CLAIMED[name] = str(folder)
            break
        else:
            raise ConfigError(f"{name} and 9,998 numbered folders beside it exist already; give the run its own "
                              "folder with hydra.run.dir=... (a sweep: hydra.sweep.dir=...)")
    return _CLAIMED[name]


def _run_folder(resume: str | None, new_folder: str) -> str:
    """hydra.run.dir: a resumed run continues in its own folder, a new one gets a new folder.

    The new folder's name holds the second the run started, so two runs started in the same
    second with the same data set, model and strategy (``python train.py seed=1 & python train.py
    seed=2``) would share it and overwrite each other's checkpoints and records. So the folder is
    claimed here, before Hydra writes to it (``_claimed``): the run that comes second gets
    ``<name>_2``. Hydra's ``now`` is fixed within a process, so resolving the key again gives the
    same folder."""
    return str(resume) if resume else _claimed(new_folder)


def _sweep_folder(new_folder: str) -> str:
    """hydra.sweep.dir: a new sweep's folder, claimed as a run's is, so two sweeps started in the
    same second do not share one. Registered with OmegaConf's cache: Hydra copies a sweep's
    resolved values into each job's config (as it does for ``now``), so a job started in another
    process (submitit) finds the sweep's folder instead of claiming one of its own."""
    return _claimed(new_folder)


def _label_classes(dataset: Mapping[str, Any]) -> int:
    """A network's label embeddings for a data set: -1 unconditional, else its classes plus the
    null class when labels are dropped for classifier-free guidance."""
    if not dataset.get("conditional"):
        return -1
    return int(dataset["num_classes"]) + (1 if float(dataset.get("label_drop_prob") or 0) > 0 else 0)


def _job_folder(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides: no slashes, and cut (with a short hash that
    keeps it unique) where a long command line would exceed what a file system allows."""
    import hashlib

    name = str(overrides).replace("/", "_")
    if len(name) <= limit:
        return name
    return f"{name[:limit - 9]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _precision_for(accelerator: str, gpu_precision: str) -> str:
    """A trainer's precision when the user sets none: full precision on the CPU."""
    return "32-true" if str(accelerator) == "cpu" else str(gpu_precision)


def _patch_for(image_size: int, tokens_per_side: int) -> int:
    """The patch size that cuts a square image into ``tokens_per_side`` x ``tokens_per_side`` tokens
    (the digits' U-ViT keeps 4 x 4 at 16x16 and at their native 8x8)."""
    size, side = int(image_size), int(tokens_per_side)
    if side <= 0 or size % side:
        raise ConfigError(f"an image of {size}x{size} does not cut into {side}x{side} patches; set model.patch_size")
    return size // side


def _snr_shift_for(image_size: int, reference_size: int) -> float:
    """The SNR factor that gives images of ``image_size`` the noise levels of ``reference_size``
    ones: (reference / size)^2, as a pixel of the small image carries the noise that that many
    pixels of the large one average away (the quickstart's 8x8 digits: 4; at 16x16: 1)."""
    size, reference = int(image_size), int(reference_size)
    if size <= 0 or reference <= 0:
        raise ConfigError(f"image sizes must be positive, got {size} and {reference}; set diffusion.snr_shift")
    return (reference / size) ** 2


def _auto_accelerator() -> str:
    """``trainer=auto`` (the default): ``gpu`` where torch sees a CUDA GPU, else ``cpu``."""
    import torch  # only here: composing a configuration needs no torch otherwise

    return "gpu" if torch.cuda.is_available() else "cpu"


def describe_accelerator(trainer_cfg: Mapping[str, Any]) -> str:
    """The run's first line about where it trains, with what to type for the GPUs it leaves idle:
    ``accelerator: gpu, 1 of 8 GPUs, bf16-mixed; use all 8 with trainer=ddp``."""
    import torch

    accelerator, precision = str(trainer_cfg.get("accelerator")), trainer_cfg.get("precision")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "cpu":
        why = "no CUDA GPU found" if not gpus else f"{gpus} CUDA GPU{'s' * (gpus > 1)} idle; trainer=auto or gpu uses one"
        return f"accelerator: cpu, {precision} ({why})"
    if accelerator not in ("gpu", "cuda"):
        return f"accelerator: {accelerator}, {precision}"
    used = world_size({**trainer_cfg, "num_nodes": 1})
    line = f"accelerator: gpu, {used} of {gpus} GPU{'s' * (gpus > 1)}, {precision}"
    if used < gpus:
        line += f"; use all {gpus} with trainer=ddp" if used == 1 else f"; all {gpus} with trainer.devices=-1"
    return line


for _name, _fn in (("run_folder", _run_folder), ("label_classes", _label_classes),
                   ("precision_for", _precision_for), ("job_folder", _job_folder),
                   ("auto_accelerator", _auto_accelerator), ("patch_for", _patch_for),
                   ("snr_shift_for", _snr_shift_for)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
if not OmegaConf.has_resolver("sweep_folder"):
    OmegaConf.register_new_resolver("sweep_folder", _sweep_folder, use_cache=True)


# --- composing from Python ----------------------------------------------------------------------


def compose(overrides: Sequence[str] = (), run_dir: str | Path = ".", config_name: str = "train") -> DictConfig:
    """The configuration ``python train.py <overrides>`` would run with (``run_dir`` stands in for
    Hydra's output folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hydra.errors import MissingConfigException

    overrides = [*overrides, f"run_dir={run_dir}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app already
            return hydra_compose(config_name=config_name, overrides=overrides)
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as err:
        raise ConfigError(unknown_option_message(err)) from None


def unknown_option_message(err: Exception) -> str:
    """One line for Hydra's "Could not find 'scaling/lernable'": the valid choices, and a close one."""
    import difflib
    import re

    text = str(err)
    found = re.search(r"Could not (?:find|load) '([^']+)'", text)
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    if not found:
        return text.strip().splitlines()[0]
    group, _, option = found.group(1).rpartition("/")
    guess = difflib.get_close_matches(option, options, n=1)
    hint = f"; did you mean {group}={guess[0]}?" if guess else ""
    choices = f"; valid choices: {', '.join(options)}" if options else ""
    return f"unknown {group}={option}{choices}{hint}" if group else f"unknown config {option!r}{choices}{hint}"


def to_plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved configuration as plain Python containers. A resolver's ``ConfigError`` (an
    image that does not cut into patches, ...) comes out as itself, naming the key, not wrapped in
    OmegaConf's resolution error."""
    from omegaconf.errors import InterpolationResolutionError

    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except InterpolationResolutionError as err:
        cause = err
        while cause is not None and not isinstance(cause, ConfigError):  # OmegaConf re-wraps it
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise ConfigError(f"{err.full_key}: {cause}") from None


# --- checks on a composed run ------------------------------------------------------------------


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    import torch

    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "auto", "-1"):
        accel = trainer_cfg.get("accelerator", "auto")
        devices = torch.cuda.device_count() if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


def resolve_resume(config: Mapping[str, Any]) -> str | None:
    """The checkpoint to continue from: ``ckpt_path``, or ``<resume>/checkpoints/last.ckpt``."""
    if config.get("ckpt_path") and config.get("resume"):
        raise ConfigError("give either ckpt_path or resume, not both")
    if config.get("resume"):
        path = Path(config["resume"]) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"resume={config['resume']}: no checkpoint at {path}; pass a run folder that has one")
        return str(path)
    if config.get("ckpt_path"):
        path = Path(config["ckpt_path"])
        if not path.is_file():
            raise ConfigError(f"ckpt_path={path}: no such file")
        return str(path)
    # A requeued job (SLURM, submitit) restarts with the same command and folder: continue.
    last = Path(config.get("run_dir") or ".") / "checkpoints" / "last.ckpt"
    if config.get("auto_resume", True) and config.get("run_dir") and last.is_file():
        return str(last)
    return None
