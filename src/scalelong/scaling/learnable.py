"""Paper's LS strategies: the skip times a gate predicted from the skip itself, one gate network
shared by all LSCs (``learnable``) or one per LSC (``learnable_nonshared``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scalelong.scaling.base import ScalingConfigError, SkipCoefficient, SkipScaling, register_strategy
from scalelong.scaling.gates import ChannelGate, SkipLayout, TokenGate, all_channel_gates

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
        # Per LSC, (skip, gate) computed ahead by ``prepare`` and taken by the forward of that skip.
        self._prepared: dict[int, tuple[Tensor, Tensor]] = {}
        self._layouts: dict[tuple, SkipLayout] = {}

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

    def _all_gates(self) -> list[nn.Module]:
        raise NotImplementedError

    def prepare(self, skips: list[Tensor]) -> None:
        """Compute the channel gates of all LSCs at once (``skips[i-1]`` is LSC i's skip).

        A UNet calls this when its encoder has pushed every skip: one gate at a time would cost
        about 35 small kernels per LSC (forward and backward), the launches that made ``learnable``
        1.21x ``none`` on an H200; together they cost a few kernels per LSC plus a dozen shared
        (``docs/benchmarks.md``, "The UNet gate's cost"). Each ``forward(skip, i)`` with that same
        skip tensor then takes its gate; any other call computes it as before. The values are
        those of the gates one by one, up to rounding. A no-op for the token gate.
        """
        self._prepared = {}
        if self.gate_kind != "channel" or len(skips) != self.num_skips or not skips:
            return
        key = (tuple(s.shape for s in skips), skips[0].device, self.layout)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = SkipLayout([s.shape for s in skips], self.layout == "tokens",
                                                     skips[0].device)
        gates = all_channel_gates(self._all_gates(), skips, layout)
        self._prepared = {i: (s, g) for i, (s, g) in enumerate(zip(skips, gates), start=1)}

    def forward(self, skip: Tensor, index: int) -> Tensor:
        self._check_index(index)
        ready = self._prepared.pop(index, None)
        gate = ready[1] if ready is not None and ready[0] is skip else self._gate_for(index)(skip)
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

    paper_name = "LS"

    def _build(self, skip_shapes, layout) -> None:
        self._resolve_gate(skip_shapes, layout)
        self.gate = self._make_gate(skip_shapes[0]) if skip_shapes else None

    def _gate_for(self, index: int) -> nn.Module:
        return self.gate

    def _all_gates(self) -> list[nn.Module]:
        return [self.gate]


@register_strategy("learnable_nonshared")
class LearnableNonSharedScaling(_GatedScaling):
    """Paper's LS (non-share): one calibration gate per LSC; ``gates[i-1]`` serves LSC i."""

    paper_name = "LS (non-share)"

    def _build(self, skip_shapes, layout) -> None:
        self._resolve_gate(skip_shapes, layout)
        self.gates = nn.ModuleList(self._make_gate(s) for s in skip_shapes)

    def _gate_for(self, index: int) -> nn.Module:
        return self.gates[index - 1]

    def _all_gates(self) -> list[nn.Module]:
        return list(self.gates)
