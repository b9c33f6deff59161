"""Lightning checkpoint I/O that never leaves a truncated checkpoint behind."""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from scalelong.utils.errors import OutputError
from scalelong.utils.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file, then rename it over the old checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")

        kept = "the previous one is intact" if os.path.exists(path) else "no partial checkpoint is left"

        def message(err: OSError) -> str:
            return (f"cannot write the checkpoint {path} ({err.strerror or err}); {kept}. "
                    "Free some space or choose another run folder (hydra.run.dir=...)")

        try:
            with atomic_write(path, message=message) as f:
                torch.save(checkpoint, f)
        except OSError as err:  # one that atomic_write let through as not about the file
            raise OutputError(message(err)) from err
