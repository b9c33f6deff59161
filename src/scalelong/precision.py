"""The precision of the network while sampling and evaluating: bf16 autocast on CUDA by default,
fp32 elsewhere, and TF32 for what stays in fp32 on CUDA.

Only the network call runs under autocast (``AutocastNetwork``); its output comes back as
float32, so the sampler's own arithmetic (the ODE/SDE update, the time grid, guidance) and the
images it produces stay in float32. ``docs/design.md`` and the README ("FID") say what bf16
changes in the samples and in FID/KID.

    precision = sampling_precision(device, requested)    # "bf16" or "fp32"
    eps_fn = NoisePredictor(AutocastNetwork(net, device, precision), ...)
    with tf32_on_cuda(device):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from scalelong.utils.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def runs_on_cuda(device: Any) -> bool:
    """Whether ``device`` is a CUDA device (the one place the tests mock)."""
    return torch.device(device).type == "cuda"


def sampling_precision(device: Any, requested: str | None = None, name: str = "--precision") -> str:
    """``requested`` checked, or the device's default: bf16 on CUDA, fp32 elsewhere (bf16
    autocast works on the CPU too, but slowly). ``name`` is the option the error names."""
    if requested is None:
        return "bf16" if runs_on_cuda(device) else "fp32"
    if requested not in PRECISIONS:
        raise ConfigError(f"{name} {requested!r} is not a sampling precision; give fp32 or bf16 (or leave it "
                          "out: bf16 on CUDA, fp32 elsewhere)")
    return requested


def autocast_settings(device: Any, precision: str) -> dict[str, Any]:
    """The ``torch.autocast`` arguments of the network call: bf16 autocast, or autocast switched
    off (fp32 even when called inside a mixed-precision training step)."""
    device_type = torch.device(device).type
    if precision == "bf16":
        return {"device_type": device_type, "dtype": torch.bfloat16, "enabled": True}
    return {"device_type": device_type, "enabled": False}


class AutocastNetwork(nn.Module):
    """``net`` called under ``precision``'s autocast, its output returned as float32."""

    def __init__(self, net: nn.Module, device: Any, precision: str):
        super().__init__()
        self.net, self.device, self.precision = net, torch.device(device), sampling_precision(device, precision)
        self._autocast = autocast_settings(self.device, self.precision)  # once, not at every sampler step

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(**self._autocast):
            out = self.net(*args, **kwargs)
        return out.float()


@contextmanager
def tf32_on_cuda(device: Any) -> Iterator[None]:
    """On CUDA, TF32 for float32 matmuls and convolutions while inside (as the fp32 parts of
    sampling and Inception want; training's own setting is put back after). Elsewhere nothing.
    Only the current TF32 API is used: torch >= 2.9 refuses reads of the old flags once the new
    ones were set."""
    if not runs_on_cuda(device):
        yield
        return
    matmul = torch.get_float32_matmul_precision()
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    torch.set_float32_matmul_precision("high")
    if conv is not None:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        if conv is not None:
            torch.backends.cudnn.conv.fp32_precision = conv
