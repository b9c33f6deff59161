"""The calibration gates of the learnable strategies: the official per-token gate (U-ViT) and a
shape-independent per-channel gate (any backbone). Each maps a skip to coefficients in (0, 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
                f"the token gate needs at least {reduction} tokens (got {num_tokens}); use smaller patches "
                "(model.patch_size) for more tokens, or scaling.gate=channel for such small models"
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


# --- every skip's channel gate in one pass (the UNet's decoder consumes them one by one) -------


class SkipLayout:
    """Where each skip's descriptors sit in the padded (B, 2N, Cmax) tensor of ``all_channel_gates``.

    Built once per set of skip shapes and device: rows 2i and 2i+1 hold the mean and std of skip
    i, its channels in columns 0..C_i-1; the columns beyond C_i are zero, as the zero padding
    that the gate's convolutions see at a skip's last channel.
    """

    def __init__(self, shapes: list[torch.Size], tokens: bool, device: torch.device) -> None:
        self.tokens = tokens
        self.dims = [(1,) if tokens else tuple(range(2, len(s))) for s in shapes]
        self.channels = [int(s[-1] if tokens else s[1]) for s in shapes]
        self.sizes = [math.prod(int(s[d]) for d in dims) for s, dims in zip(shapes, self.dims)]
        n, cmax = len(shapes), max(self.channels)
        self.cmax = cmax
        # Gather index into cat([mean_1, std_1, ..., mean_N, std_N, 0]) (B, 2 sum C + 1).
        total = 2 * sum(self.channels)
        index = torch.full((2 * n, cmax), total, dtype=torch.long)
        offset = 0
        for i, c in enumerate(self.channels):
            index[2 * i, :c] = torch.arange(offset, offset + c)
            index[2 * i + 1, :c] = torch.arange(offset + c, offset + 2 * c)
            offset += 2 * c
        self.index = index.flatten().to(device)
        # Per row: 1 for a mean, 1/sqrt(n_i) for a std (the norm of x - mean becomes the std).
        scale = torch.tensor([[1.0, 1.0 / math.sqrt(m)] for m in self.sizes], dtype=torch.float32)
        self.row_scale = scale.reshape(2 * n, 1).to(device)
        self.size = torch.tensor(self.sizes, dtype=torch.float32).reshape(n, 1).to(device)
        valid = torch.arange(cmax)[None, :] < torch.tensor(self.channels)[:, None]  # (N, Cmax)
        self.valid = None if all(c == cmax for c in self.channels) else valid.to(device)
        # The gates' columns in the (B, N Cmax) output: one gather, whose backward is one scatter.
        self.gate_index = valid.flatten().nonzero().flatten().to(device)


class _SkipDescriptors(torch.autograd.Function):
    """The statistics of ``_MeanStd`` for every skip at once, in the padded layout of ``SkipLayout``.

    Forward per skip: a mean in fp32 and the norm of x - mean (three kernels); the rest is done
    once for all skips. Backward: the formula of ``_MeanStd``, grad_x = (x - mean) * a + g_mean / n
    with a = g_std / (n std), its small terms computed for all skips together: two full-size
    kernels per skip (three for a bf16/fp16 skip, whose fp32 gradient is cast back).
    """

    @staticmethod
    def forward(ctx, layout: SkipLayout, *skips: Tensor) -> Tensor:
        stats, means = [], []
        for x, dims in zip(skips, layout.dims):
            mean = x.mean(dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
            stats += [mean.flatten(1), torch.linalg.vector_norm(x - mean, dim=dims, keepdim=True).flatten(1)]
            means.append(mean)
        stats.append(stats[0].new_zeros(stats[0].shape[0], 1))
        flat = torch.cat(stats, dim=1)
        padded = flat[:, layout.index].view(flat.shape[0], -1, layout.cmax).mul_(layout.row_scale)
        ctx.save_for_backward(padded, *skips)
        ctx.layout = layout
        return padded

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        padded, *skips = ctx.saved_tensors
        layout: SkipLayout = ctx.layout
        mean, std = padded[:, 0::2], padded[:, 1::2]  # (B, N, Cmax)
        a = torch.where(std > 0, grad[:, 1::2] / (std * layout.size), 0.0)
        c = grad[:, 0::2] / layout.size
        grads = []
        for i, (x, ch) in enumerate(zip(skips, layout.channels)):
            shape = (x.shape[0], 1, ch) if layout.tokens else (x.shape[0], ch) + (1,) * (x.dim() - 2)
            # (x - mean) first: x * a - mean * a would cancel badly where std << |mean|
            centred = x - mean[:, i, :ch].reshape(shape)
            grads.append(torch.addcmul(c[:, i, :ch].reshape(shape), centred, a[:, i, :ch].reshape(shape)).to(x.dtype))
        return None, *grads


def all_channel_gates(gates: list[ChannelGate], skips: list[Tensor], layout: SkipLayout) -> list[Tensor]:
    """``[gates[i](skips[i]) for i]`` (one gate shared by all: ``gates`` of length 1) in a few kernels.

    The skips' descriptors are padded to the widest skip and the gates' convolutions run once
    for all skips: as a batch for one shared gate, as a grouped convolution for one gate per
    skip. The hidden layer is zeroed beyond each skip's channels, so every gate sees exactly the
    zero padding it sees alone: the values are those of the gates one by one, up to rounding.
    """
    n, b = len(skips), skips[0].shape[0]
    descriptor = _SkipDescriptors.apply(layout, *skips).to(skips[0].dtype)  # (B, 2N, Cmax)
    first = gates[0]
    pad = first.mix1.padding
    if len(gates) == 1:
        hidden = torch.relu(first.mix1(descriptor.view(b * n, 2, layout.cmax)))  # (B N, hidden, Cmax)
        if layout.valid is not None:
            hidden = (hidden.view(b, n, -1, layout.cmax) * layout.valid[:, None]).view(b * n, -1, layout.cmax)
        gate = torch.sigmoid(first.mix2(hidden)).view(b, n, layout.cmax)
    else:
        w1, b1 = torch.cat([g.mix1.weight for g in gates]), torch.cat([g.mix1.bias for g in gates])
        w2, b2 = torch.cat([g.mix2.weight for g in gates]), torch.cat([g.mix2.bias for g in gates])
        hidden = torch.relu(F.conv1d(descriptor, w1, b1, padding=pad, groups=n))  # (B, N hidden, Cmax)
        if layout.valid is not None:
            hidden = (hidden.view(b, n, -1, layout.cmax) * layout.valid[:, None]).view(b, -1, layout.cmax)
        gate = torch.sigmoid(F.conv1d(hidden, w2, b2, padding=pad, groups=n))  # (B, N, Cmax)
    # Sliced per skip, each slice's backward would write a zero-filled (B, N, Cmax) gradient:
    # one gather and one split instead.
    flat = gate.view(b, n * layout.cmax)
    flat = flat if layout.valid is None else flat[:, layout.gate_index]
    return [g.unsqueeze(1) if layout.tokens else g.reshape(g.shape + (1,) * (skip.dim() - 2))
            for g, skip in zip(flat.split(layout.channels, dim=1), skips)]
