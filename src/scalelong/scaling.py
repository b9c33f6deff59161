"""Long-skip-connection (LSC) scaling strategies: the five ScaleLong variants behind one interface.

A backbone builds a strategy once, tells it the shape of every long skip (``setup``), and then
calls ``strategy(skip, index)`` right where the decoder merges that skip. ``index`` counts LSCs
from the outside in: 1 joins the shallowest encoder feature to the last decoder block, N the
deepest encoder feature to the first decoder block. The coefficient multiplies the skip only;
the decoder's own path never passes through here.

Adding a strategy is one subclass registered with ``@register_strategy("name")`` (and a YAML
file under ``conf/scaling``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from scalelong.errors import ConfigError

__all__ = [
    "SkipCoefficient",
    "SkipScaling",
    "NoScaling",
    "Sqrt2Scaling",
    "ConstantScaling",
    "LearnableScaling",
    "LearnableNonSharedScaling",
    "TokenGate",
    "ChannelGate",
    "STRATEGIES",
    "build_skip_scaling",
    "register_strategy",
]

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
    """Base class: scales the skip feature of LSC ``index`` (1 = outermost)."""

    name: str = ""

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


STRATEGIES: dict[str, type[SkipScaling]] = {}


def register_strategy(name: str) -> Callable[[type[SkipScaling]], type[SkipScaling]]:
    def add(cls: type[SkipScaling]) -> type[SkipScaling]:
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return add


@register_strategy("none")
class NoScaling(ConstantCoefficients):
    """The original UNet (paper: Org): every LSC passes unchanged."""

    def coefficient(self, index: int) -> float:
        return 1.0


@register_strategy("sqrt2")
class Sqrt2Scaling(ConstantCoefficients):
    """Paper's 1/sqrt(2)-CS: every long skip times 2^(-1/2)."""

    def coefficient(self, index: int) -> float:
        return 2.0**-0.5


def _check_kappa(kappa: Any) -> float:
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

    def __init__(self, kappa: float = 0.5) -> None:
        super().__init__()
        self.kappa = _check_kappa(kappa)

    def coefficient(self, index: int) -> float:
        return self.kappa ** (index - 1)

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}, num_skips={self.num_skips}"


# --- learnable gates -------------------------------------------------------------------------


class TokenGate(nn.Module):
    """The official U-ViT ScaleLong gate: one coefficient per sample and token.

    (B, L, D) -> mean over D -> Linear(L, L//r) -> ReLU -> Linear(L//r, L) -> sigmoid -> (B, L, 1).
    Tied to the token count L, so it fits one resolution and token layout only. Its layers keep
    PyTorch's default initialisation, which puts the gates near 0.5 at the start.
    """

    def __init__(self, num_tokens: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = num_tokens // reduction
        if hidden < 1:
            raise ScalingConfigError(
                f"the token gate needs at least {reduction} tokens (got {num_tokens}); "
                "use scaling.gate=channel for such small models"
            )
        self.layer1 = nn.Linear(num_tokens, hidden)
        self.layer2 = nn.Linear(hidden, num_tokens)

    def forward(self, skip: Tensor) -> Tensor:
        pooled = skip.mean(dim=-1)
        return torch.sigmoid(self.layer2(torch.relu(self.layer1(pooled)))).unsqueeze(-1)


class ChannelGate(nn.Module):
    """A shape-independent gate: one coefficient per sample and channel.

    Each channel is described by the mean and standard deviation of its values over positions
    (pixels for a feature map, tokens for a sequence); a small 1-D convolution across the channel
    axis (as in ECA channel attention) maps these descriptors to a sigmoid gate. Its parameters
    do not depend on channel count or resolution, so one gate can serve every LSC of a UNet whose
    levels differ in width and size, and it transfers across resolutions.
    """

    def __init__(self, hidden: int = 8, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ScalingConfigError(f"channel gate kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.mix1 = nn.Conv1d(2, hidden, kernel_size, padding=pad)
        self.mix2 = nn.Conv1d(hidden, 1, kernel_size, padding=pad)

    def forward(self, skip: Tensor) -> Tensor:
        tokens = skip.dim() == 3  # (B, L, D): channels last; else (B, C, H, W)
        positions = (1,) if tokens else tuple(range(2, skip.dim()))
        mean, std = _MeanStd.apply(skip, positions)
        descriptor = torch.stack([mean, std], dim=1).to(skip.dtype)  # (B, 2, C)
        gate = torch.sigmoid(self.mix2(torch.relu(self.mix1(descriptor))))[:, 0]  # (B, C)
        return gate.unsqueeze(1) if tokens else gate[:, :, None, None]


class _MeanStd(torch.autograd.Function):
    """``torch.std_mean(x, dims, correction=0)`` in at least fp32 (returned as mean, std), cheaper.

    On the CPU ``std_mean``'s Welford pass took about 40x as long as a plain sum, and its
    backward several full-size passes; together they were most of the ~3% a channel gate added
    to a UNet training step. Here: mean, then the norm of x - mean, and a backward of two cheap
    passes, grad_x = g_mean / n + (x - mean) * g_std / (n std) per row. The reduction runs over
    ``dims`` in place, so channels-last maps and (B, L, D) tokens need no copy, and a bf16/fp16
    skip is not kept as an fp32 copy for the backward. As in torch, a row with std = 0 gets no
    gradient through its std.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        n = math.prod([x.shape[d] for d in dims])
        mean = x.mean(dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        std = torch.linalg.vector_norm(x - mean, dim=dims, keepdim=True) / math.sqrt(n)
        ctx.save_for_backward(x, mean, std)
        ctx.n = n
        return mean.squeeze(dims), std.squeeze(dims)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: Tensor, g_std: Tensor) -> tuple[Tensor, None]:
        x, mean, std = ctx.saved_tensors
        a = torch.where(std > 0, g_std.reshape(std.shape) / (ctx.n * std), 0.0)
        return (x - mean).mul_(a).add_(g_mean.reshape(mean.shape) / ctx.n).to(x.dtype), None


GATES = ("token", "channel")


class _GatedScaling(SkipScaling):
    """Common part of ``learnable`` and ``learnable_nonshared``: skip * gate(skip)."""

    def __init__(self, gate: str | None = None, reduction: int = 16, hidden: int = 8, kernel_size: int = 3):
        super().__init__()
        if gate is not None and gate not in GATES:
            raise ScalingConfigError(f"unknown gate {gate!r}; valid gates: {', '.join(GATES)}")
        self.gate_kind = gate
        self.reduction = int(reduction)
        self.hidden = int(hidden)
        self.kernel_size = int(kernel_size)
        # Per LSC, the detached gate of the last forward pass (for logging).
        self._last_gate: dict[int, Tensor] = {}

    def _resolve_gate(self, skip_shapes, layout) -> str:
        # The official per-token gate on token layouts; the channel gate where shapes differ.
        kind = self.gate_kind or ("token" if layout == "tokens" else "channel")
        if kind == "token":
            if layout != "tokens":
                raise ScalingConfigError(
                    "the token gate needs a token layout (U-ViT); use scaling.gate=channel for the UNet"
                )
            if len({s[0] for s in skip_shapes}) > 1:
                raise ScalingConfigError("the token gate needs the same token count on every LSC")
        self.gate_kind = kind
        return kind

    def _make_gate(self, skip_shape: tuple[int, ...]) -> nn.Module:
        if self.gate_kind == "token":
            return TokenGate(skip_shape[0], self.reduction)
        return ChannelGate(self.hidden, self.kernel_size)

    def _gate_for(self, index: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, skip: Tensor, index: int) -> Tensor:
        self._check_index(index)
        gate = self._gate_for(index)(skip)
        # Keep the small gate itself; its statistics are computed only when someone asks.
        self._last_gate[index] = gate.detach()
        return skip * gate

    def coefficients(self) -> list[SkipCoefficient]:
        out = []
        for i in range(1, (self.num_skips or 0) + 1):
            gate = self._last_gate.get(i)
            if gate is None:
                out.append(SkipCoefficient(math.nan, math.nan))
            else:
                std, mean = torch.stack(torch.std_mean(gate.float(), correction=0)).tolist()
                out.append(SkipCoefficient(mean, std))
        return out

    def extra_repr(self) -> str:
        return f"gate={self.gate_kind}, num_skips={self.num_skips}"


@register_strategy("learnable")
class LearnableScaling(_GatedScaling):
    """Paper's LS: one calibration gate, shared by all LSCs, predicts the coefficient from the skip."""

    def _build(self, skip_shapes, layout) -> None:
        self._resolve_gate(skip_shapes, layout)
        self.gate = self._make_gate(skip_shapes[0]) if skip_shapes else None

    def _gate_for(self, index: int) -> nn.Module:
        return self.gate


@register_strategy("learnable_nonshared")
class LearnableNonSharedScaling(_GatedScaling):
    """Paper's LS (non-share): one calibration gate per LSC; ``gates[i-1]`` serves LSC i."""

    def _build(self, skip_shapes, layout) -> None:
        self._resolve_gate(skip_shapes, layout)
        self.gates = nn.ModuleList(self._make_gate(s) for s in skip_shapes)

    def _gate_for(self, index: int) -> nn.Module:
        return self.gates[index - 1]


# --- factory ---------------------------------------------------------------------------------


def build_skip_scaling(spec: str | Mapping[str, Any] | SkipScaling | None) -> SkipScaling:
    """Build a strategy from a name, a mapping ``{"name": ..., **options}``, or pass one through.

    ``None`` means ``none``. Unknown names and options raise ``ScalingConfigError`` listing the
    valid choices.
    """
    if isinstance(spec, SkipScaling):
        return spec
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        options = {str(k): v for k, v in spec.items() if not str(k).startswith("_")}
        name = options.pop("name", None)
        if name is None:
            raise ScalingConfigError(f"a scaling mapping needs a 'name'; valid names: {', '.join(STRATEGIES)}")
    else:
        raise ScalingConfigError(f"scaling must be a name, a mapping or a SkipScaling, got {type(spec).__name__}")
    cls = STRATEGIES.get(str(name))
    if cls is None:
        raise ScalingConfigError(f"unknown scaling strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    # Options that do not apply to this strategy (kappa for `none`, say) are ignored when they
    # come from a shared config, but a typo in an option name must not pass silently.
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - set(ALL_OPTIONS))
    if unknown:
        raise ScalingConfigError(
            f"unknown option(s) {', '.join(unknown)} for scaling; known options: {', '.join(ALL_OPTIONS)}"
        )
    if "kappa" in options and options["kappa"] is not None:
        _check_kappa(options["kappa"])  # bad kappa is an error whatever the strategy
    return cls(**{k: v for k, v in options.items() if k in accepted})


def _accepted_options(cls: type[SkipScaling]) -> tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters
    return tuple(p for p in params if p != "self")


ALL_OPTIONS = ("kappa", "gate", "reduction", "hidden", "kernel_size")
