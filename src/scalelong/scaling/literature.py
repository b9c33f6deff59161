"""Long-skip weightings from other papers, beside the ScaleLong five: EDM2's magnitude-preserving
concatenation (``mp_cat``) and one learnable scalar per long skip (``learnable_scalar``).

Formulas, defaults and sources: ``docs/strategies.md``. Registered after the paper's strategies,
so reports list the paper's five first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from scalelong.scaling.base import ScalingConfigError, SkipCoefficient, SkipScaling, register_strategy
from scalelong.scaling.constant import check_kappa


def check_balance(t: Any) -> float:
    """mp_cat's balance t as a float in (0, 1), or a ``ScalingConfigError`` naming the range."""
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise ScalingConfigError(f"scaling.t must be a number in (0, 1), got {t!r}") from None
    if not 0.0 < value < 1.0:  # also false for NaN
        raise ScalingConfigError(f"scaling.t must lie in (0, 1) (EDM2's default is 0.5), got {t!r}")
    return value


@register_strategy("mp_cat")
class MagnitudePreservingConcat(SkipScaling):
    """EDM2's ``mp_cat`` at every long skip: cat(wa * decoder_input, wb * skip) with

        wa = (1 - t) * sqrt((Na + Nb) / (Na * ((1 - t)^2 + t^2)))
        wb = t       * sqrt((Na + Nb) / (Nb * ((1 - t)^2 + t^2)))

    (EDM2's C (1 - t) / sqrt(Na) and C t / sqrt(Nb) with C = sqrt((Na + Nb) / ((1 - t)^2 + t^2))),
    Na and Nb the channel counts of the decoder input and of the skip (U-ViT: the token width of
    both). Nb comes from ``setup``; Na from the decoder input at each merge. It weights both halves,
    so it overrides ``merge``; ``forward(skip, i, decoder_channels)`` is the skip's half alone
    (without ``decoder_channels`` it assumes a decoder input as wide as the skip).

    ``coefficients()`` reports wb per LSC, the skip's factor; ``decoder_coefficients()`` reports wa.
    On a "channels" backbone both are NaN until the first merge has shown Na.
    """

    paper_name = "EDM2 mp-cat"

    def __init__(self, t: float = 0.5) -> None:
        super().__init__()
        self.t = check_balance(t)
        self._skip_channels: list[int] = []
        # Decoder input widths per LSC: known at setup for tokens, seen at the first merge otherwise.
        self._decoder_channels: dict[int, int] = {}

    def _build(self, skip_shapes, layout) -> None:
        # The channel axis without the batch: (L, D) -> D; (C, H, W) -> C.
        self._skip_channels = [s[-1] if layout == "tokens" else s[0] for s in skip_shapes]
        if layout == "tokens":  # U-ViT's decoder tokens are as wide as its skips
            self._decoder_channels = {i: c for i, c in enumerate(self._skip_channels, start=1)}

    def weights(self, decoder_channels: int, skip_channels: int) -> tuple[float, float]:
        """(wa, wb): the factors of the decoder input and of the skip."""
        na, nb, t = int(decoder_channels), int(skip_channels), self.t
        spread = (1.0 - t) ** 2 + t**2
        # Written so that equal widths at t = 0.5 give exactly 1.0 (and so the identity).
        return (1.0 - t) * math.sqrt((na + nb) / (na * spread)), t * math.sqrt((na + nb) / (nb * spread))

    def forward(self, skip: Tensor, index: int, decoder_channels: int | None = None) -> Tensor:
        self._check_index(index)
        nb = self._skip_channels[index - 1]
        _, wb = self.weights(nb if decoder_channels is None else decoder_channels, nb)
        return skip if wb == 1.0 else skip * wb

    def merge(self, decoder_input: Tensor, skip: Tensor, index: int) -> tuple[Tensor, Tensor]:
        self._check_index(index)
        na = decoder_input.shape[-1 if self.layout == "tokens" else 1]
        self._decoder_channels[index] = na
        wa, _ = self.weights(na, self._skip_channels[index - 1])
        # Through __call__, so hooks on the strategy (the stability monitor) see the skip's half.
        return (decoder_input if wa == 1.0 else decoder_input * wa), self(skip, index, na)

    def _factors(self, which: int) -> list[SkipCoefficient]:
        out = []
        for i, nb in enumerate(self._skip_channels, start=1):
            na = self._decoder_channels.get(i)
            value = math.nan if na is None else self.weights(na, nb)[which]
            out.append(SkipCoefficient(value, 0.0))
        return out

    def coefficients(self) -> list[SkipCoefficient]:
        return self._factors(1)

    def decoder_coefficients(self) -> list[SkipCoefficient]:
        """The decoder input's factor wa per LSC, outermost first."""
        return self._factors(0)

    def extra_repr(self) -> str:
        return f"t={self.t}, num_skips={self.num_skips}"


INITS = ("one", "constant")


@register_strategy("learnable_scalar")
class LearnableScalarScaling(SkipScaling):
    """One learnable scalar per long skip multiplying it: ``scales[i-1]`` serves LSC i.

    Starts at 1 (``init=one``: the original network) or at CS's kappa^(i-1) (``init=constant``).
    The scalars are ordinary parameters: the optimizer updates (and weight-decays) them as it does
    every other weight.
    """

    paper_name = "learned scalar"

    def __init__(self, init: str = "one", kappa: float = 0.5) -> None:
        super().__init__()
        if init not in INITS:
            raise ScalingConfigError(f"unknown scaling.init={init!r}; valid: {', '.join(INITS)}")
        self.init = init
        self.kappa = check_kappa(kappa)

    def initial_value(self, index: int) -> float:
        return 1.0 if self.init == "one" else self.kappa ** (index - 1)

    def _build(self, skip_shapes, layout) -> None:
        self.scales = nn.ParameterList(nn.Parameter(torch.tensor(self.initial_value(i)))
                                       for i in range(1, len(skip_shapes) + 1))

    def forward(self, skip: Tensor, index: int) -> Tensor:
        self._check_index(index)
        # In the skip's dtype: a float32 scalar must not promote a bf16 skip under autocast.
        return skip * self.scales[index - 1].to(skip.dtype)

    def coefficients(self) -> list[SkipCoefficient]:
        if not self.num_skips:
            return []
        values = torch.stack([p.detach().float() for p in self.scales]).tolist()  # one device sync
        return [SkipCoefficient(v, 0.0) for v in values]

    def extra_repr(self) -> str:
        kappa = f", kappa={self.kappa}" if self.init == "constant" else ""
        return f"init={self.init}{kappa}, num_skips={self.num_skips}"
