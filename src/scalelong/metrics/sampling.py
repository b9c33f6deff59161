"""Sample generation sharded over ranks by fixed chunks, so the total is exact and sample i is the
same for any number of processes (``docs/design.md``, "Sharded sampling")."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from scalelong.utils.seeding import STREAM_EVAL, step_seed
from scalelong.utils.distributed import rank_and_world

def num_chunks(num: int, chunk_size: int) -> int:
    return -(-int(num) // int(chunk_size))


def chunk_seed(seed: int, chunk: int) -> int:
    return step_seed(int(seed), int(chunk), STREAM_EVAL)


def shard(num: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """This rank's chunks as (chunk index, first global index, count)."""
    if num < 1 or chunk_size < 1:
        raise ValueError(f"num and chunk_size must be positive, got {num} and {chunk_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    return [(c, c * chunk_size, min(chunk_size, num - c * chunk_size))
            for c in range(rank, num_chunks(num, chunk_size), world)]


Contexts = Callable[[Tensor], Tensor]


def generate_shard(module: Any, num: int, sampler: str, steps: int, seed: int = 0, chunk_size: int = 250,
                   rank: int | None = None, world: int | None = None,
                   generate_kwargs: Mapping[str, Any] | None = None,
                   contexts: Contexts | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (global indices (n,), uint8 images (n, C, H, W)) for each of this rank's chunks.

    ``module`` is a ``DiffusionModule`` (EMA weights) or anything with the same ``generate``.
    ``rank``/``world`` default to the process group's. ``contexts(indices)`` gives the caption
    embeddings (n, tokens, dim) of a text-conditional model's samples.
    """
    if rank is None or world is None:
        rank, world = rank_and_world()
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    if getattr(module, "text_conditional", False) and contexts is None:
        from scalelong.utils.errors import ConfigError

        raise ConfigError("samples of a text-to-image model need caption embeddings to condition on; pass the "
                          "val split's caption features (evaluate.py --contexts, the FID callback reads "
                          "dataset.data_dir)")
    for c, lo, n in shard(num, chunk_size, rank, world):
        indices = torch.arange(lo, lo + n)
        labels = indices % num_classes if num_classes else None
        if labels is not None and hasattr(module, "device"):
            labels = labels.to(module.device)
        extra = dict(generate_kwargs or {})
        if contexts is not None:
            extra["contexts"] = contexts(indices)
        images = module.generate(n, sampler, steps, seed=chunk_seed(seed, c), use_ema=True, labels=labels,
                                 batch_size=n, **extra)
        yield indices, images
