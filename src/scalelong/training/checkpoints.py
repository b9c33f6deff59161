"""Loading a training checkpoint back into a model, with readable errors."""

from __future__ import annotations

from pathlib import Path

import torch

from scalelong.errors import DataError
from scalelong.training.module import DiffusionModule


def load_module(path: str | Path, device: str | torch.device = "cpu") -> DiffusionModule:
    """The ``DiffusionModule`` (backbone, EMA, schedule, config) stored in a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; pass a run's checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                        "it is truncated or not a checkpoint") from None
    config = (ckpt.get("hyper_parameters") or {}).get("config") if isinstance(ckpt, dict) else None
    if config is None or "state_dict" not in ckpt:
        raise DataError(f"{path} is not a scalelong training checkpoint (no config or state_dict in it)")
    module = DiffusionModule(config)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(device).eval()
