"""The learning rate's schedule, as a factor of ``optim.lr`` per optimizer step: a linear
warm-up, then constant (the paper's) or decayed to 0 at the last step (``train.lr_decay``)."""

from __future__ import annotations

import math
from typing import Any

from scalelong.utils.errors import ConfigError

LR_DECAYS = ("cosine", "linear")


def warmup_constant(step: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from 0 over ``warmup_steps`` optimizer steps, then 1 (as the
    official U-ViT ``customized`` schedule, which gives step 0 a factor of 0)."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


def lr_factor(step: int, warmup_steps: int, decay: str | None = None, total_steps: int = 0) -> float:
    """LR factor at ``step``: the warm-up, then 1 (``decay=None``, the paper's schedule) or a
    decay from 1 after the warm-up to 0 at ``total_steps`` (``cosine`` or ``linear``): a short run
    ends on small steps instead of relying on the EMA alone to average the noise out."""
    factor = warmup_constant(step, warmup_steps)
    if decay is None or step < warmup_steps or total_steps <= warmup_steps:
        return factor
    done = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return factor * (0.5 * (1.0 + math.cos(math.pi * done)) if decay == "cosine" else 1.0 - done)


def check_lr_decay(decay: Any) -> str | None:
    if decay in (None, "none"):
        return None
    if decay not in LR_DECAYS:
        raise ConfigError(f"train.lr_decay={decay!r} is not a schedule; give null (constant after the "
                          f"warm-up, the paper's), {' or '.join(LR_DECAYS)}")
    return decay
