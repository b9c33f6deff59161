"""The strategy interface every long-skip scaling implements, and building one from a config."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from scalelong.utils.errors import ConfigError

# Skip layouts a backbone can declare in ``setup``:
#   "tokens":   (B, L, D), a transformer's token sequence (U-ViT)
#   "channels": (B, C, H, W), a convolutional feature map (UNet)
LAYOUTS = ("tokens", "channels")


class ScalingConfigError(ConfigError):
    """A strategy was asked for with a name or option that cannot work."""


@dataclass(frozen=True)
class SkipCoefficient:
    """The coefficient one LSC applied in the last forward pass.

    ``mean`` is the value for constant strategies and the batch mean of the gate for learnable
    ones; ``std`` is the gate's spread over samples and positions (0 for constants). Both are NaN
    for a learnable strategy that has not run a forward pass yet.
    """

    mean: float
    std: float


class SkipScaling(nn.Module):
    """Base class: scales the skip feature of LSC ``index`` (1 = outermost) where it is merged.

    Subclasses implement ``forward(skip, index)`` (the scaled skip) and ``coefficients()``; a
    strategy that also weights the decoder's own input overrides ``merge``. ``name`` labels runs
    and reports; ``paper_name`` is the ScaleLong paper's name for it, where it has one.
    """

    name: str = ""
    paper_name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.num_skips: int | None = None
        self.layout: str | None = None

    def setup(self, skip_shapes: Sequence[Sequence[int]], layout: str) -> None:
        """Declare the LSCs: one shape per LSC without the batch axis, outermost first.

        Called once by the backbone, before training; learnable strategies create their gate
        parameters here, so a strategy object can be handed to a backbone unconfigured.
        """
        if layout not in LAYOUTS:
            raise ScalingConfigError(f"unknown skip layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
        if self.num_skips is not None:
            raise ScalingConfigError(
                f"this {type(self).__name__} is already set up for {self.num_skips} skips; "
                "build a new strategy object for each backbone"
            )
        self.num_skips = len(skip_shapes)
        self.layout = layout
        self._build(tuple(tuple(int(d) for d in s) for s in skip_shapes), layout)

    def _build(self, skip_shapes: tuple[tuple[int, ...], ...], layout: str) -> None:
        """Hook for subclasses that own parameters."""

    def forward(self, skip: Tensor, index: int) -> Tensor:
        raise NotImplementedError

    def merge(self, decoder_input: Tensor, skip: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """The two tensors the decoder concatenates at LSC ``index``: by default its own input
        unchanged and the scaled skip. Shapes are the backbone's (tokens or feature maps)."""
        return decoder_input, self(skip, index)

    def coefficients(self) -> list[SkipCoefficient]:
        """Current coefficient of every LSC, outermost first (for logging)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_skips={self.num_skips}"

    def _check_index(self, index: int) -> None:
        if self.num_skips is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before use")
        if not 1 <= index <= self.num_skips:
            raise IndexError(f"LSC index {index} outside 1..{self.num_skips}")


class ConstantCoefficients(SkipScaling):
    """Strategies whose coefficient for each LSC is a fixed number."""

    def coefficient(self, index: int) -> float:
        raise NotImplementedError

    def forward(self, skip: Tensor, index: int) -> Tensor:
        self._check_index(index)
        c = self.coefficient(index)
        # Multiplying by exactly 1.0 would give the same values; skipping it saves a kernel.
        return skip if c == 1.0 else skip * c

    def coefficients(self) -> list[SkipCoefficient]:
        return [SkipCoefficient(self.coefficient(i), 0.0) for i in range(1, (self.num_skips or 0) + 1)]


# The strategies that ship with the project, by name (for Python callers; configs name a class).
STRATEGIES: dict[str, type[SkipScaling]] = {}


def register_strategy(name: str) -> Callable[[type[SkipScaling]], type[SkipScaling]]:
    def add(cls: type[SkipScaling]) -> type[SkipScaling]:
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return add


def build_skip_scaling(spec: str | Mapping[str, Any] | SkipScaling | None) -> SkipScaling:
    """A strategy from a name, a mapping, or a strategy object (passed through); None means ``none``.

    A mapping is a ``scaling`` config node: ``_target_`` (the class, any importable one) or
    ``name`` (a built-in), and the class's constructor options. ``name`` also labels the object.
    Unknown names and options, and bad values, raise ``ScalingConfigError`` naming the choices.
    """
    if isinstance(spec, SkipScaling):
        return spec
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ScalingConfigError(f"scaling must be a name, a mapping or a SkipScaling, got {type(spec).__name__}")
    options = {str(k): v for k, v in spec.items() if not str(k).startswith("_")}
    name = options.pop("name", None)
    target = spec.get("_target_")
    if target is not None:
        cls = _import_class(str(target))
    elif name is None:
        raise ScalingConfigError(f"a scaling config needs a _target_ (a class) or a name; built-in names: "
                                 f"{', '.join(STRATEGIES)}")
    elif str(name) not in STRATEGIES:
        raise ScalingConfigError(f"unknown scaling strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    else:
        cls = STRATEGIES[str(name)]
    accepted = _constructor_options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ScalingConfigError(
            f"unknown option(s) {', '.join(unknown)} for scaling {name or cls.__name__!r} ({cls.__name__}); "
            f"its options: {', '.join(accepted) or 'none'}")
    try:
        strategy = cls(**options)
    except TypeError as err:  # a required option left out
        raise ScalingConfigError(f"scaling {name or cls.__name__!r} ({cls.__name__}): {err}") from None
    if name is not None:
        _check_label(str(name), cls)
        strategy.name = str(name)
    return strategy


def _check_label(name: str, cls: type[SkipScaling]) -> None:
    """A built-in class keeps its own name: ``scaling.name=lernable`` is a typo, not a new label."""
    registered = next((n for n, c in STRATEGIES.items() if c is cls), None)
    if registered is not None and name != registered:
        raise ScalingConfigError(
            f"scaling.name={name!r} is not the name of {cls.__name__} ({registered!r}); choose a strategy with "
            f"scaling=NAME (valid strategies: {', '.join(STRATEGIES)}, or a config of your own)")


def _import_class(target: str) -> type[SkipScaling]:
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as err:
        raise ScalingConfigError(f"scaling._target_={target!r} cannot be imported ({err}); "
                                 "is its module on the Python path?") from None
    if not (isinstance(cls, type) and issubclass(cls, SkipScaling)):
        raise ScalingConfigError(f"scaling._target_={target!r} is not a SkipScaling subclass")
    return cls


def _constructor_options(cls: type[SkipScaling]) -> tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
