"""torch.compile for a backbone as a run configures it: ``model.compile`` (false, true or auto),
``model.compile_mode`` and ``model.compile_scope`` (blocks or whole); the rules and the measured
times that chose them: ``docs/design.md``, "torch.compile", and ``docs/benchmarks.md``.

Compiling is done in place (``nn.Module.compile`` on each compiled module), so parameter names,
state dicts and checkpoints stay those of the eager network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from scalelong.utils.errors import ConfigError

COMPILE_SCOPES = ("blocks", "whole")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The keys of a ``model`` node that this module reads (not constructor arguments of the network).
COMPILE_KEYS = ("compile", "compile_mode", "compile_scope")
# compile: auto compiles CUDA training runs of at least this many optimizer steps. On an H200 the
# U-ViT-S/2 compiled whole took 50 s and saved 20 ms a step (33.2 against 53.6 ms): repaid after
# about 2,500 steps. 10,000 leaves room for the UNet, whose compile is longer and saving unmeasured,
# and still covers every paper-scale run (CIFAR10: 500,000 steps); short tests and demos stay eager.
AUTO_MIN_STEPS = 10_000
# ... and sampling or evaluation of at least this many network evaluations (images x steps): the
# protocol's FID-50k is 50,000 x 1,000; a grid of 64 images at 50 steps is 3,200.
AUTO_MIN_EVALUATIONS = 1_000_000


def compile_options(model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``compile`` (False, True or "auto"), ``mode`` and ``scope`` of a ``model`` config node, checked."""
    cfg = model_cfg or {}
    setting = cfg.get("compile", False)
    if isinstance(setting, str) and setting.lower() in ("true", "false", "auto"):
        setting = {"true": True, "false": False}.get(setting.lower(), "auto")
    if setting not in (True, False, "auto") or isinstance(setting, int) and not isinstance(setting, bool):
        raise ConfigError(f"model.compile={setting!r} is not one of false, true, auto")
    mode = cfg.get("compile_mode") or "default"
    if mode not in COMPILE_MODES:
        raise ConfigError(f"model.compile_mode={mode!r} is not one of null, {', '.join(COMPILE_MODES)}")
    scope = cfg.get("compile_scope") or "blocks"
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"model.compile_scope={scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    return {"compile": setting, "mode": None if mode == "default" else mode, "scope": scope}


def wants_compile(setting: bool | str, device_type: str, work: int | None, threshold: int) -> bool:
    """Whether ``compile`` (False, True or "auto") compiles here: auto means on CUDA, for at least
    ``threshold`` units of ``work`` (training steps, or network evaluations; None: unknown, off)."""
    if setting == "auto":
        return device_type == "cuda" and work is not None and work >= threshold
    return bool(setting)


def training_compile(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """For a run's config: the ``compile_network`` options if its network is to be compiled, else
    None. ``compile: auto`` compiles on CUDA (``trainer.accelerator`` gpu or cuda, or auto with a
    GPU present) when ``train.max_steps >= AUTO_MIN_STEPS``."""
    options = compile_options(config.get("model"))
    accelerator = str((config.get("trainer") or {}).get("accelerator", "cpu")).lower()
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    max_steps = (config.get("train") or {}).get("max_steps")
    if not wants_compile(options["compile"], "cuda" if cuda else accelerator, max_steps, AUTO_MIN_STEPS):
        return None
    return {"mode": options["mode"], "scope": options["scope"]}


def compiled_blocks(net: nn.Module) -> list[nn.Module] | None:
    """The modules ``scope=blocks`` compiles: the backbone's own blocks (its ``stability_blocks``,
    every ResBlock step, attention and middle block of a UNet, every transformer block of a
    U-ViT), leaving out single torch layers (a stem convolution). None if it lists none."""
    listed = getattr(net, "stability_blocks", None)
    if not callable(listed):
        return None
    blocks = [m for _, m in listed() if not type(m).__module__.startswith("torch.")]
    return blocks or None


def compile_network(net: nn.Module, mode: str | None = None, scope: str = "blocks") -> nn.Module:
    """Compile ``net`` in place and return it (names and state dict unchanged).

    ``scope="blocks"`` compiles each block on its own: blocks of one class share their code,
    so TorchDynamo traces a class once per distinct set of shapes, and Inductor compiles a few
    small graphs instead of one large one; the code between the blocks (embeddings, the skip gates, the head) stays eager.
    ``scope="whole"`` compiles the network as one graph, the skip gates included. A network that
    lists no blocks is compiled whole.
    """
    blocks = compiled_blocks(net) if scope == "blocks" else None
    # Static shapes: training repeats one batch shape. (With torch's automatic dynamic shapes,
    # Inductor 2.14 failed on the UNet's blocks once their widths varied: "cannot determine
    # truth value of Relational".) Each distinct block shape is then one compiled entry of the
    # shared code; a UNet has more than torch's default limit of 8.
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < 64:
        torch._dynamo.config.recompile_limit = 64
    for module in blocks or [net]:
        module.compile(mode=mode, dynamic=False)
    return net


def compile_for_sampling(model: Any, num_images: int, steps: int) -> None:
    """Sampling and evaluation: compile a ``DiffusionModel``'s networks as its run's config says
    (``compile: auto`` = on CUDA for at least ``AUTO_MIN_EVALUATIONS`` network evaluations)."""
    options = compile_options((model.config or {}).get("model"))
    if wants_compile(options["compile"], model.device.type, num_images * steps, AUTO_MIN_EVALUATIONS):
        for net in {id(n): n for n in (model.ema_net, model.net)}.values():
            compile_network(net, options["mode"], options["scope"])
