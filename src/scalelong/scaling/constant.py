"""The constant strategies of the paper: Org (``none``), 1/sqrt(2)-CS (``sqrt2``), CS (``constant``)."""

from __future__ import annotations

from typing import Any

from scalelong.scaling.base import ConstantCoefficients, ScalingConfigError, register_strategy


@register_strategy("none")
class NoScaling(ConstantCoefficients):
    """The original UNet (paper: Org): every LSC passes unchanged."""

    paper_name = "Org"

    def coefficient(self, index: int) -> float:
        return 1.0


@register_strategy("sqrt2")
class Sqrt2Scaling(ConstantCoefficients):
    """Paper's 1/sqrt(2)-CS: every long skip times 2^(-1/2)."""

    paper_name = "1/sqrt(2)-CS"

    def coefficient(self, index: int) -> float:
        return 2.0**-0.5


def check_kappa(kappa: Any) -> float:
    """kappa as a float in (0, 1], or a ``ScalingConfigError`` that names the valid range."""
    try:
        k = float(kappa)
    except (TypeError, ValueError):
        raise ScalingConfigError(f"kappa must be a number in (0, 1], got {kappa!r}") from None
    if not (0.0 < k <= 1.0):  # also false for NaN
        raise ScalingConfigError(
            f"kappa must lie in (0, 1], got {kappa!r}; the paper suggests 0.5 to 0.95 "
            "(kappa = 1 is the same as scaling=none)"
        )
    return k


@register_strategy("constant")
class ConstantScaling(ConstantCoefficients):
    """Paper's CS: LSC i gets kappa^(i-1), so the outermost keeps 1 and the innermost kappa^(N-1)."""

    paper_name = "CS"

    def __init__(self, kappa: float = 0.5) -> None:
        super().__init__()
        self.kappa = check_kappa(kappa)

    def coefficient(self, index: int) -> float:
        return self.kappa ** (index - 1)

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, num_skips={self.num_skips}"
