"""Training-free scaling of the long skips while sampling (Skip-Tuning, Ma et al. 2024), on top of
whatever strategy the network was trained with.

A ``SkipScale`` gives a factor per LSC, outermost first, written as one of

    0.9            one factor on every long skip
    1.0:0.8        linear from the outermost (LSC 1) to the innermost (LSC N) skip
    1,0.95,0.9     one factor per long skip, outermost first (exactly N of them)

``scaled_skips(net, scale)`` multiplies the skip that ``net.skip_scaling.merge`` hands to the
decoder (after the trained strategy) by its LSC's factor, for the duration of a ``with`` block.
A factor of exactly 1 returns the skip untouched, so ``1`` reproduces unscaled samples bit for bit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from scalelong.utils.errors import ConfigError

SYNTAX = ("one factor (0.9), outer:inner for a schedule linear from the outermost to the innermost long skip "
          "(1.0:0.8), or one factor per long skip, outermost first (1,0.95,0.9)")


@dataclass(frozen=True)
class SkipScale:
    """Sampling-time factors of the long skips: ``kind`` is "constant" (one value), "linear"
    (outer, inner) or "list" (one value per LSC); ``text`` is how it was written."""

    kind: str
    values: tuple[float, ...]
    text: str

    def factors(self, num_skips: int) -> list[float]:
        """The factor of every LSC, outermost first."""
        if self.kind == "constant":
            return [self.values[0]] * num_skips
        if self.kind == "linear":
            outer, inner = self.values
            if num_skips == 1:
                return [outer]
            return [outer + (inner - outer) * k / (num_skips - 1) for k in range(num_skips)]
        if len(self.values) != num_skips:
            raise ConfigError(f"skip scale {self.text} lists {len(self.values)} factors, but this network has "
                              f"{num_skips} long skips; give {num_skips} factors, one factor, or outer:inner")
        return list(self.values)

    @property
    def label(self) -> str:
        """A file-name form without dots (a dot would read as a suffix): 0p9, 1p0-0p8, 1_0p95_0p9."""
        return self.text.replace(":", "-").replace(",", "_").replace(".", "p")

    @property
    def number(self) -> float | None:
        """The single factor of a constant scale (for plotting against it), else None."""
        return self.values[0] if self.kind == "constant" else None


def parse_skip_scale(value: str | float | Sequence[float] | SkipScale) -> SkipScale:
    """A ``SkipScale`` from its text (see the module docstring), a number or a list of numbers."""
    if isinstance(value, SkipScale):
        return value
    if isinstance(value, (int, float)):
        value = repr(float(value)) if isinstance(value, float) else str(value)
    elif not isinstance(value, str):
        value = ",".join(str(float(v)) for v in value)
    text = re.sub(r"\s+", "", value)
    kind, parts = ("linear", text.split(":")) if ":" in text else ("list", text.split(",")) if "," in text \
        else ("constant", [text])
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        numbers = ()
    if not numbers or (kind == "linear" and len(numbers) != 2):
        raise ConfigError(f"skip scale {value!r} is not a skip scale; write {SYNTAX}")
    if not all(math.isfinite(v) and v > 0 for v in numbers):
        raise ConfigError(f"skip scale {value!r}: every factor must be a positive finite number")
    return SkipScale(kind, numbers, text)


@contextmanager
def scaled_skips(net: nn.Module, scale: str | float | Sequence[float] | SkipScale | None) -> Iterator[list[float]]:
    """Within the block, the skips ``net`` merges are multiplied by ``scale``'s factors; yields them.

    It wraps the instance's ``skip_scaling.merge`` (the strategy's own merge runs first), so every
    backbone that merges through its strategy is covered; leaving the block restores the strategy.
    ``None`` changes nothing.
    """
    if scale is None:
        yield []
        return
    scale = parse_skip_scale(scale)
    strategy = getattr(net, "skip_scaling", None)
    if strategy is None or not strategy.num_skips:
        raise ConfigError(f"a skip scale needs a network with long skips merged through `skip_scaling` "
                          f"({type(net).__name__} has none)")
    factors = scale.factors(strategy.num_skips)
    trained_merge = strategy.merge
    had_own = "merge" in vars(strategy)  # an enclosing scaled_skips block

    def merge(decoder_input, skip, index):
        decoder_input, skip = trained_merge(decoder_input, skip, index)
        factor = factors[index - 1]
        return decoder_input, (skip if factor == 1.0 else skip * factor)

    strategy.merge = merge
    try:
        yield factors
    finally:
        if had_own:
            strategy.merge = trained_merge
        else:
            del strategy.merge
