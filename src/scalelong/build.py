"""Each part of a run built from its own config node (the node's ``_target_`` names the class).

Training (``scalelong.cli.train``) and loading a checkpoint (``scalelong.checkpoints``) build the
network, schedule and data space with these same functions, so a checkpoint always rebuilds
the model it was trained with.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from scalelong.data.space import DataSpace
from scalelong.diffusion import VPSchedule, get_sde
from scalelong.scaling import SkipScaling, build_skip_scaling
from scalelong.utils.errors import ConfigError

# Keys of a ``model`` node that say how the network runs, not how it is built.
RUNTIME_MODEL_KEYS = ("compile", "compile_mode", "compile_scope", "channels_last")


def build_strategy(scaling: Mapping[str, Any] | str | SkipScaling | None) -> SkipScaling:
    """The long-skip strategy of a ``scaling`` node (``_target_`` class, ``name`` label, options)."""
    return build_skip_scaling(scaling)


def network_class(model: Mapping[str, Any]) -> type[nn.Module]:
    from hydra.utils import get_class

    target = model.get("_target_")
    if not target:
        raise ConfigError("the model config names no class: give it `_target_: package.module.Class`")
    try:
        return get_class(str(target))
    except Exception as err:
        raise ConfigError(f"model._target_={target!r} cannot be imported ({err}); is its module on the "
                          "Python path?") from None


def build_network(model: Mapping[str, Any], scaling: Mapping[str, Any] | str | SkipScaling | None,
                  dataset: Mapping[str, Any] | None = None) -> nn.Module:
    """The backbone of a ``model`` node, with the strategy of a ``scaling`` node on its long skips.

    Every other key of the node is a constructor argument (``RUNTIME_MODEL_KEYS`` aside); an
    argument the class does not take is an error that lists the ones it does.
    """
    cls = network_class(model)
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name not in ("self", "scaling") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    args = {k: v for k, v in model.items() if not str(k).startswith("_") and k not in RUNTIME_MODEL_KEYS}
    if dataset is not None and dataset.get("text_conditional") and "context_dim" not in accepted:
        raise ConfigError(f"data set {dataset.get('name')!r} is text-conditional: only model=uvit takes text "
                          f"tokens ({cls.__name__} has no context_dim argument)")
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ConfigError(f"model {cls.__name__} has no argument(s) {', '.join(unknown)}; its arguments: "
                          f"{', '.join(accepted)}")
    if "scaling" not in inspect.signature(cls.__init__).parameters:
        raise ConfigError(f"model {cls.__name__} takes no `scaling` argument: a backbone receives its long-skip "
                          "strategy as `scaling` (see docs/design.md, 'A backbone from outside')")
    try:
        return cls(**args, scaling=build_strategy(scaling))
    except TypeError as err:  # a required argument left out
        raise ConfigError(f"model {cls.__name__}: {err}") from None


def build_schedule(diffusion: Mapping[str, Any]) -> VPSchedule:
    """The noise schedule of a ``diffusion`` node: ``schedule`` (a registered name) and its options."""
    options = dict(diffusion)
    name = options.pop("schedule", "linear")
    try:
        return get_sde(name, **options)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"diffusion.schedule={name}: {err}") from None


def build_space(dataset: Mapping[str, Any]) -> DataSpace:
    """What the data set's samples are to a model (shape, conditioning, latents)."""
    return DataSpace.from_config(dataset)
