"""``scalelong-convert-checkpoint`` / ``python scripts/convert_checkpoint.py CKPT``: rewrite a checkpoint
you trust into one that loads with ``weights_only=True`` (tensors and plain containers only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

USAGE = """Rewrite a trusted checkpoint so that it loads safely.

    python scripts/convert_checkpoint.py old.ckpt [--out new.ckpt]

Loads the file as a full pickle, which RUNS whatever code it holds: do this only for a file whose
source you trust. Keeps tensors, numbers, strings, booleans, None, and dicts, lists and tuples of
them (numpy arrays become tensors, numpy numbers Python numbers); anything else is left out and
named. Writes ``<name>.safe.ckpt`` beside the input unless --out says otherwise (atomically).
"""


def plain(value: Any, where: str, dropped: list[str]) -> Any:
    """``value`` as tensors and plain containers; what cannot be is recorded in ``dropped``."""
    import numpy as np
    import torch

    if isinstance(value, np.generic):  # before float: numpy's float64 is a float subclass
        return value.item()
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):  # OrderedDict, AttributeDict and other dicts become plain dicts
        return {plain(k, where, dropped): plain(v, f"{where}.{k}", dropped) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [plain(v, f"{where}[{i}]", dropped) for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    dropped.append(f"{where} ({type(value).__module__}.{type(value).__qualname__})")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from scalelong.cli import guarded
    from scalelong.checkpoints import read_checkpoint
    from scalelong.utils.errors import DataError
    from scalelong.utils.io import atomic_write

    def run() -> int:
        if not args.checkpoint.is_file():
            raise DataError(f"checkpoint {args.checkpoint} does not exist")
        try:
            full = torch.load(args.checkpoint, map_location="cpu", weights_only=False)  # trusted by the user
        except Exception as err:
            raise DataError(f"checkpoint {args.checkpoint} cannot be read ({type(err).__name__}: {err})") from None
        dropped: list[str] = []
        safe = plain(full, "checkpoint", dropped)
        out = args.out or args.checkpoint.with_suffix(".safe.ckpt")
        with atomic_write(out) as f:
            torch.save(safe, f)
        read_checkpoint(out)  # it loads safely now
        for item in dropped:
            print(f"left out: {item}", file=sys.stderr)
        print(f"wrote {out}")
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
