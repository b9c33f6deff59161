"""The calibration gates of the learnable strategies: the official per-token gate (U-ViT) and a
shape-independent per-channel gate (any backbone). Each maps a skip to coefficients in (0, 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scalelong.scaling.base import ScalingConfigError


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
