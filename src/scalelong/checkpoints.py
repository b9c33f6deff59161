"""Reading training checkpoints safely (``weights_only``: a checkpoint cannot run code) and
rebuilding the model they hold, also from checkpoints written before the configs named classes."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from scalelong.utils.errors import DataError

if TYPE_CHECKING:
    from scalelong.data.space import DataSpace
    from scalelong.diffusion import VPSchedule

# Where this project keeps the run's configuration inside a Lightning checkpoint.
CONFIG_KEY = "scalelong"
FORMAT = 2  # 1: config under hyper_parameters, models by preset name; 2: parts by _target_


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; pass a run's checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _refused_global(str(err))
        if refused is None:  # a damaged file, not a refused one
            raise DataError(f"checkpoint {path} cannot be read (not a valid pickle); it is truncated or not a "
                            "checkpoint") from None
        raise DataError(f"checkpoint {path} wants to import {refused}, which a checkpoint of tensors and plain "
                        "containers never does; it was refused and nothing in it ran. If you trust its source, "
                        f"convert it once with `python scripts/convert_checkpoint.py {path}`") from None
    except Exception as err:
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                        "it is truncated or not a checkpoint") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path} is not a scalelong training checkpoint (not a dict)")
    return ckpt


def _refused_global(message: str) -> str | None:
    """The object torch's safe loader refused ("... GLOBAL posix.system ..."), None for a file that
    is not a valid pickle at all."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def run_config(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The run configuration stored in a checkpoint, in today's form."""
    stored = ckpt.get(CONFIG_KEY)
    if isinstance(stored, Mapping) and "config" in stored:
        return copy.deepcopy(dict(stored["config"]))
    legacy = (ckpt.get("hyper_parameters") or {}).get("config")
    if isinstance(legacy, Mapping):
        return upgrade_legacy_config(legacy)
    raise DataError(f"{path} is not a scalelong training checkpoint (no run configuration in it)")


def upgrade_legacy_config(old: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 configuration (``model.backbone``/``preset``/``options``, ``scaling.name``) in
    today's form: the preset's YAML resolved against the stored data set, the strategy's class."""
    from omegaconf import OmegaConf

    from scalelong.config import conf_dir  # also registers the resolvers the model YAMLs use

    config = copy.deepcopy(dict(old))
    model = dict(config.get("model") or {})
    if "_target_" not in model:
        preset = {"tiny": "unet_tiny"}.get(model.get("preset"), model.get("preset"))
        path = conf_dir() / "model" / f"{preset}.yaml"
        if not path.is_file():
            raise DataError(f"this checkpoint's model preset {model.get('preset')!r} is unknown here "
                            f"(no {path}); it was written by another version of scalelong")
        node = OmegaConf.merge(OmegaConf.load(path), dict(model.get("options") or {}),
                               {"compile": bool(model.get("compile", False)),
                                "channels_last": bool(model.get("channels_last", False))})
        wrapped = OmegaConf.create({"model": node, "dataset": config["dataset"]})
        config["model"] = OmegaConf.to_container(wrapped.model, resolve=True)
    scaling = dict(config.get("scaling") or {})
    if "_target_" not in scaling:
        from scalelong.scaling import STRATEGIES

        name = scaling.get("name", "none")
        cls = STRATEGIES.get(name)
        if cls is None:
            raise DataError(f"this checkpoint's scaling strategy {name!r} is unknown here")
        options = {k: v for k, v in scaling.items() if k != "name" and v is not None}
        if name != "constant":
            options.pop("kappa", None)  # old configs carried kappa for every strategy
        config["scaling"] = {"_target_": f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}", "name": name,
                             **options}
    return config


class ModelParts(NamedTuple):
    """What ``DiffusionModel`` is made of, as a checkpoint stores it (``DiffusionModel.from_checkpoint``
    assembles them), and the training step it was saved at."""

    net: nn.Module
    ema_net: nn.Module
    sde: VPSchedule
    space: DataSpace
    empty_context: torch.Tensor | None
    config: dict[str, Any]
    step: int


def load_model_parts(path: str | Path, device: str | torch.device = "cpu") -> ModelParts:
    """The network, its EMA (both in eval mode on ``device``), schedule, data space and run config of
    a checkpoint, rebuilt from the configuration stored in it."""
    from scalelong.build import build_network, build_schedule, build_space

    ckpt = read_checkpoint(path)
    if "state_dict" not in ckpt:
        raise DataError(f"{path} is not a scalelong training checkpoint (no state_dict in it)")
    config = run_config(ckpt, path)
    net = build_network(config["model"], config["scaling"], config["dataset"])
    ema_net = copy.deepcopy(net)
    state = ckpt["state_dict"]
    empty = state.get("empty_context")
    try:
        net.load_state_dict(_section(state, "net."), strict=True)
        ema_net.load_state_dict(_section(state, "ema.module."), strict=True)
    except RuntimeError as err:
        raise DataError(f"checkpoint {path} does not fit the model its configuration describes "
                        f"({str(err).splitlines()[0]})") from None
    return ModelParts(net.to(device).eval(), ema_net.to(device).eval().requires_grad_(False),
                      build_schedule(config.get("diffusion") or {}), build_space(config["dataset"]),
                      None if empty is None else empty.to(device), config, int(ckpt.get("global_step") or 0))


def _section(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
