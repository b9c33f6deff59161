"""DDPM / ADM style convolutional UNet predicting the noise, with scalable long skips (every encoder
output is a long skip, 12 for the DDPM CIFAR10 model). Presets: ``conf/model/{ddpm_*,unet_*}.yaml``;
the skip layout, the learnable gates on this backbone and the initialisation: ``docs/design.md``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scalelong.utils.errors import ConfigError
from scalelong.scaling import SkipScaling, build_skip_scaling

__all__ = [
    "UNet",
    "timestep_embedding",
    "ResBlock",
    "AttentionBlock",
    "ResAttnBlock",
]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) float timesteps (in [0, 999] units) -> (B, dim) float32.

    DDPM's layout: ``dim // 2`` sines then ``dim // 2`` cosines at geometric frequencies from 1
    down to 1/max_period; a zero column pads an odd ``dim``.
    """
    half = dim // 2
    # DDPM divides by (half - 1) so the slowest frequency is exactly 1/max_period.
    scale = math.log(max_period) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, device=timesteps.device, dtype=torch.float32))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with ``max_groups`` groups, or the largest common divisor with ``channels``.

    The fallback lets tiny models use widths such as 8 or 48; eps 1e-6 as in DDPM.
    """
    return nn.GroupNorm(math.gcd(max_groups, channels), channels, eps=eps)


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block on (B, in_ch, H, W) with a (B, emb_ch) time embedding -> (B, out_ch, H, W).

    GroupNorm -> SiLU -> conv3x3 -> + Linear(SiLU(emb)) per channel -> GroupNorm -> SiLU ->
    Dropout -> conv3x3, plus the input (through a 1x1 conv when the width changes).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_ch: int,
        dropout: float = 0.0,
        zero_init: bool = True,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.use_checkpoint = use_checkpoint
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:
            _zero_(self.conv2)  # the branch starts as 0, the block as the (projected) identity
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            # Recompute activations in backward: trades ~30% compute for most of the memory.
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of (B, C, H, W), residual; same shape out.

    GroupNorm -> 1x1 conv to q, k, v -> scaled_dot_product_attention per head (head width
    C / num_heads, softmax scale head_width^-1/2) -> 1x1 output projection -> + input.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        zero_init: bool = True,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ConfigError(f"attention on {channels} channels cannot use num_heads={num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        if zero_init:
            _zero_(self.proj)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        d = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, d, hh * ww)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj(out)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class ResAttnBlock(nn.Module):
    """One encoder or decoder step: a ``ResBlock`` optionally followed by ``AttentionBlock``.

    In the decoder the block's first input is ``torch.cat([h, scaled_skip], dim=1)``; there
    ``skip_index`` (1 = outermost LSC) and ``skip_channels`` say which LSC it consumes and how
    many trailing channels of the input are the (scaled) skip. Both are None in the encoder.
    """

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.skip_index: int | None = None
        self.skip_channels: int | None = None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return h if self.attn is None else self.attn(h)


class Downsample(nn.Module):
    """Stride-2 conv3x3: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then conv3x3: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderLevel(nn.Module):
    """The encoder blocks at one resolution, then (except at the deepest level) a downsample."""

    def __init__(self, blocks: Iterable[ResAttnBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class DecoderLevel(nn.Module):
    """The decoder blocks at one resolution, then (except at level 0) an upsample."""

    def __init__(self, blocks: Iterable[ResAttnBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample


class MiddleBlock(nn.Module):
    """Res block, self-attention, res block at the deepest resolution; shape preserved."""

    def __init__(
        self,
        channels: int,
        emb_ch: int,
        num_heads: int,
        dropout: float,
        zero_init: bool,
        ckpt: bool,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_ch, dropout, zero_init, ckpt, norm_groups)
        self.attn = AttentionBlock(channels, num_heads, zero_init, ckpt, norm_groups)
        self.res2 = ResBlock(channels, channels, emb_ch, dropout, zero_init, ckpt, norm_groups)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x, emb)), emb)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    # Configs may hand over "1,2,2,2", an int or a ListConfig.
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, int):
        value = [value]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a sequence of integers, got {value!r}") from None


class UNet(nn.Module):
    """DDPM / ADM style UNet predicting the noise epsilon, with ScaleLong skip scaling.

    Args:
        img_size: input height = width in pixels; must be divisible by 2**(levels - 1).
        in_chans: image channels. out_chans: predicted channels (None: in_chans).
        base_channels: width of level 0; level l has ``base_channels * channel_mult[l]``.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        attn_resolutions: feature-map sizes (pixels) at which self-attention follows each
            residual block, e.g. (16,) for a 32x32 model.
        num_heads: attention heads (must divide the width at every attention resolution).
        dropout: dropout probability inside the residual blocks.
        num_classes: > 0 adds a learned class embedding to the time embedding; then ``y`` is
            required (reserve a class id yourself for classifier-free "null" labels).
        scaling: LSC strategy: a name from ``scalelong.scaling.STRATEGIES``, a mapping
            ``{"name": ..., "kappa": ...}`` or a ``SkipScaling``; bad ones raise ``ValueError``.
        use_checkpoint: gradient checkpointing of every res/attention block (saves memory).
        zero_init: zero-initialise residual output convs, attention projections and the head.
        norm_groups: GroupNorm groups, at most (32 as in DDPM); a width that 32 does not divide
            uses the largest common divisor. Narrow models want fewer: at 32 channels, 32 groups
            normalise each channel on its own.

    Attributes:
        skip_shapes: (C, H, W) of every LSC, outermost first (index i-1 is LSC i).
        num_skips: number of LSCs.
        skip_scaling: the strategy module (its gates, if any, are part of the parameters).
    """

    def __init__(
        self,
        img_size: int = 32,
        in_chans: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.1,
        num_classes: int = -1,
        scaling: str | Mapping[str, Any] | SkipScaling | None = "none",
        out_chans: int | None = None,
        use_checkpoint: bool = False,
        zero_init: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        channel_mult = _int_tuple(channel_mult, "channel_mult")
        attn_resolutions = _int_tuple(attn_resolutions, "attn_resolutions")
        img_size, in_chans, base_channels = int(img_size), int(in_chans), int(base_channels)
        num_res_blocks, num_heads, num_classes = int(num_res_blocks), int(num_heads), int(num_classes)
        out_chans = in_chans if out_chans is None else int(out_chans)
        if not channel_mult or min(channel_mult) < 1:
            raise ConfigError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
        if base_channels < 1 or in_chans < 1 or out_chans < 1 or num_res_blocks < 1:
            raise ConfigError("base_channels, in_chans, out_chans and num_res_blocks must be positive")
        norm_groups = int(norm_groups)
        if norm_groups < 1:
            raise ConfigError(f"norm_groups must be a positive int (32 in DDPM), got {norm_groups}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        levels = len(channel_mult)
        if img_size < 1 or img_size % 2 ** (levels - 1):
            raise ConfigError(f"img_size {img_size} is not divisible by 2**{levels - 1} ({levels} levels)")
        resolutions = [img_size // 2**lvl for lvl in range(levels)]
        unused = sorted(set(attn_resolutions) - set(resolutions))
        if unused:
            raise ConfigError(f"attn_resolutions {unused} never occur; this model's resolutions are {resolutions}")

        # Build the strategy first so a bad name / kappa fails before any allocation.
        skip_scaling = build_skip_scaling(scaling)

        self.img_size, self.in_chans, self.out_chans = img_size, in_chans, out_chans
        self.base_channels, self.channel_mult = base_channels, channel_mult
        self.num_res_blocks, self.attn_resolutions = num_res_blocks, attn_resolutions
        self.num_heads, self.num_classes = num_heads, num_classes
        self.norm_groups = norm_groups
        emb_ch = 4 * base_channels
        drop, zi, ck = float(dropout), bool(zero_init), bool(use_checkpoint)

        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.label_embed = nn.Embedding(num_classes, emb_ch) if num_classes > 0 else None

        def step(cin: int, cout: int, res: int) -> ResAttnBlock:
            attn = AttentionBlock(cout, num_heads, zi, ck, norm_groups) if res in attn_resolutions else None
            return ResAttnBlock(ResBlock(cin, cout, emb_ch, drop, zi, ck, norm_groups), attn)

        # Encoder; `skip_shapes` mirrors the runtime skip stack (push order = outermost first).
        self.stem = nn.Conv2d(in_chans, base_channels, 3, padding=1)
        skip_shapes: list[tuple[int, int, int]] = [(base_channels, img_size, img_size)]
        ch = base_channels
        down = []
        for lvl, mult in enumerate(channel_mult):
            res = resolutions[lvl]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(step(ch, base_channels * mult, res))
                ch = base_channels * mult
                skip_shapes.append((ch, res, res))
            downsample = None
            if lvl != levels - 1:
                downsample = Downsample(ch)
                skip_shapes.append((ch, res // 2, res // 2))
            down.append(EncoderLevel(blocks, downsample))
        self.down = nn.ModuleList(down)

        self.mid = MiddleBlock(ch, emb_ch, num_heads, drop, zi, ck, norm_groups)

        # Decoder, built deepest level first (execution order) but stored by level, so that
        # up[l] works at the same resolution as down[l].
        up: list[DecoderLevel | None] = [None] * levels
        remaining = len(skip_shapes)
        for lvl in reversed(range(levels)):
            res = resolutions[lvl]
            blocks = []
            for _ in range(num_res_blocks + 1):
                skip_ch, skip_h, _ = skip_shapes[remaining - 1]
                assert skip_h == res  # the stack lines up with the decoder by construction
                block = step(ch + skip_ch, base_channels * channel_mult[lvl], res)
                block.skip_index, block.skip_channels = remaining, skip_ch
                remaining -= 1
                blocks.append(block)
                ch = base_channels * channel_mult[lvl]
            up[lvl] = DecoderLevel(blocks, Upsample(ch) if lvl != 0 else None)
        assert remaining == 0
        self.up = nn.ModuleList(up)

        out_conv = nn.Conv2d(ch, out_chans, 3, padding=1)
        self.out = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(), _zero_(out_conv) if zi else out_conv)

        self.skip_shapes = skip_shapes
        self.num_skips = len(skip_shapes)
        self.skip_scaling = skip_scaling
        self.skip_scaling.setup(skip_shapes, "channels")

    # --- introspection helpers (hooks, analyses) -------------------------------------------

    def encoder_skip_modules(self) -> list[nn.Module]:
        """Modules whose forward output is the encoder feature of LSC i (list index i-1)."""
        mods: list[nn.Module] = [self.stem]
        for level in self.down:
            mods.extend(level.blocks)
            if level.downsample is not None:
                mods.append(level.downsample)
        return mods

    def decoder_merge_blocks(self) -> list[ResAttnBlock]:
        """Decoder blocks that consume LSC i (list index i-1), outermost first."""
        blocks = [b for level in self.up for b in level.blocks]
        return sorted(blocks, key=lambda b: b.skip_index)

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        """Blocks the stability monitor measures, in execution order: ``in_{i-1}`` is the encoder
        module feeding LSC i, then the middle block, then ``out_{k}`` consuming LSC N-k."""
        decoder = self.decoder_merge_blocks()[::-1]  # execution order: the deepest LSC first
        return ([(f"in_{k:02d}", m) for k, m in enumerate(self.encoder_skip_modules())] + [("mid", self.mid)]
                + [(f"out_{k:02d}", m) for k, m in enumerate(decoder)])

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict epsilon.

        Args:
            x: (B, in_chans, img_size, img_size) noisy images.
            timesteps: (B,) float times already scaled to [0, 999] (a scalar is broadcast).
            y: (B,) long class labels; required iff ``num_classes > 0``.
        Returns:
            (B, out_chans, img_size, img_size).
        """
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        weight = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(timesteps, self.base_channels).to(weight.dtype))
        if self.label_embed is not None:
            if y is None:
                raise ValueError(f"this UNet is class-conditional ({self.num_classes} classes): pass y")
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes <= 0) but got labels y")

        h = self.stem(x)
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)

        # Every skip is known now: a learnable strategy computes all its gates in one pass
        # (a few kernels instead of ~35 per skip). Traced whole by torch.compile, each gate is
        # left to Inductor's fusion instead.
        prepare = getattr(self.skip_scaling, "prepare", None)
        if prepare is not None and not torch.compiler.is_compiling():
            prepare(skips)
        h = self.mid(h, emb)

        for level in reversed(self.up):
            for block in level.blocks:
                # The stack's depth is the LSC index: the last push (deepest) is LSC N.
                index = len(skips)
                h, skip = self.skip_scaling.merge(h, skips.pop(), index)
                h = block(torch.cat([h, skip], dim=1), emb)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.out(h)
