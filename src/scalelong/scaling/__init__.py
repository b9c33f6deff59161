"""Long-skip-connection (LSC) scaling strategies behind one interface (``SkipScaling``).

A backbone builds its strategy once, declares the shape of every long skip (``setup``) and calls
``merge(decoder_input, skip, index)`` where the decoder joins that skip; index 1 is the outermost
LSC. See ``docs/design.md`` for the interface and how to add a strategy from outside the repository.
"""

from scalelong.scaling.base import (
    LAYOUTS,
    STRATEGIES,
    ConstantCoefficients,
    ScalingConfigError,
    SkipCoefficient,
    SkipScaling,
    build_skip_scaling,
    register_strategy,
)
from scalelong.scaling.constant import ConstantScaling, NoScaling, Sqrt2Scaling, check_kappa
from scalelong.scaling.gates import ChannelGate, TokenGate, _MeanStd
from scalelong.scaling.learnable import LearnableNonSharedScaling, LearnableScaling
# After the paper's five: registration order is the order of reports.
from scalelong.scaling.literature import LearnableScalarScaling, MagnitudePreservingConcat
from scalelong.scaling.sampling_time import SkipScale, parse_skip_scale, scaled_skips

__all__ = [
    "LAYOUTS", "STRATEGIES", "ChannelGate", "ConstantCoefficients", "ConstantScaling", "LearnableNonSharedScaling",
    "LearnableScalarScaling", "LearnableScaling", "MagnitudePreservingConcat", "NoScaling", "ScalingConfigError",
    "SkipCoefficient", "SkipScale", "SkipScaling", "Sqrt2Scaling", "TokenGate", "_MeanStd", "build_skip_scaling",
    "check_kappa", "parse_skip_scale", "register_strategy", "scaled_skips",
]
