"""U-ViT (Bao et al., CVPR 2023) with pluggable long-skip scaling; module names follow the official
code, so its checkpoints load (``convert_official_uvit_state_dict``). Presets: ``conf/model/uvit_*.yaml``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from scalelong.utils.errors import ConfigError
from scalelong.scaling import SkipScaling, build_skip_scaling

__all__ = ["UViT", "timestep_embedding", "convert_official_uvit_state_dict"]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), patches in raster order, channels fastest."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, channels: int, grid: int) -> Tensor:
    """Inverse of ``patchify`` for a square grid: (B, grid^2, p * p * C) -> (B, C, grid*p, grid*p)."""
    b, n, d = tokens.shape
    p = int(round(math.sqrt(d // channels)))
    if n != grid * grid or p * p * channels != d:
        raise ValueError(f"cannot unpatchify {tuple(tokens.shape)} into {channels} channels on a {grid}x{grid} grid")
    x = tokens.reshape(b, grid, grid, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * p, grid * p)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient
    kernels where the device has them)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale  # None: SDPA's default 1/sqrt(head_dim), as the official model
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; a decoder block first merges its long skip.

    ``skip_linear`` receives ``cat([x, skip])``: the decoder tokens first, the (already scaled)
    skip second, so a hook on it sees both halves of the merge.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 skip: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    """U-ViT noise predictor: ``forward(x, timesteps, y=None, context=None) -> eps`` of x's shape.

    Args follow the official constructor. ``depth`` counts the in + out blocks (the model has
    ``depth // 2`` in blocks, one mid block and ``depth // 2`` out blocks, so depth 12 is the
    paper's 13-block network with N = 6 long skips). ``num_classes > 0`` adds a label token;
    ``context_dim`` with ``num_context_tokens`` adds text tokens (MS-COCO: 768 and 77), passed as
    ``context`` of shape (B, num_context_tokens, context_dim). ``scaling`` is a strategy name, a
    mapping ``{"name": ..., **options}`` or a ``SkipScaling`` object.

    Shapes: x (B, in_chans, img_size, img_size); timesteps (B,) float, the continuous time times
    999; y (B,) long in [0, num_classes).
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        use_checkpoint: bool = False,
        conv: bool = True,
        skip: bool = True,
        scaling: str | Mapping[str, Any] | SkipScaling | None = "none",
        context_dim: int | None = None,
        num_context_tokens: int = 0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}; "
                "choose a patch size that divides the image size"
            )
        if num_classes > 0 and context_dim:
            raise ConfigError("a U-ViT takes either a class label (num_classes) or text context, not both")
        # Build the strategy first: a bad name or kappa fails before any large allocation.
        strategy = build_skip_scaling(scaling)
        img_size, patch_size, in_chans, depth = int(img_size), int(patch_size), int(in_chans), int(depth)

        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.grid = img_size // patch_size
        num_patches = self.grid**2

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        self.extras = 1  # the time token
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras += 1
        self.num_context_tokens = num_context_tokens if context_dim else 0
        if context_dim:
            self.context_embed = nn.Linear(context_dim, embed_dim)
            self.extras += num_context_tokens
        self.num_tokens = self.extras + num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))

        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     qk_scale=qk_scale, use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList(Block(**block) for _ in range(depth // 2))
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList(Block(**block, skip=skip) for _ in range(depth // 2))

        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

        # Attached after the init above, so learnable gates keep PyTorch's default init (as the
        # official LS does), which starts them near 0.5.
        self.use_skips = skip
        self.num_skips = depth // 2 if skip else 0
        strategy.setup([(self.num_tokens, embed_dim)] * self.num_skips, "tokens")
        self.skip_scaling = strategy

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        """Blocks the stability monitor measures, in execution order: ``in_{k}`` feeds LSC k+1,
        ``out_{k}`` consumes LSC N-k."""
        return ([(f"in_{k:02d}", m) for k, m in enumerate(self.in_blocks)] + [("mid", self.mid_block)]
                + [(f"out_{k:02d}", m) for k, m in enumerate(self.out_blocks)])

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(f"expected {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim).to(x.dtype)).unsqueeze(1)
        # Token order as in the official models: [label, time, patches] or [time, text, patches].
        if self.num_context_tokens:
            if context is None:
                raise ValueError("this U-ViT is text-conditional: pass context (B, tokens, dim)")
            x = torch.cat([time_token, self.context_embed(context), x], dim=1)
        else:
            x = torch.cat([time_token, x], dim=1)
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this U-ViT is class-conditional: pass labels y")
            x = torch.cat([self.label_emb(y).unsqueeze(1), x], dim=1)
        x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for k, blk in enumerate(self.out_blocks):
            # The first out block takes the innermost skip (index N), the last the outermost (1).
            skip = skips.pop()
            if self.use_skips:
                x, skip = self.skip_scaling.merge(x, skip, self.num_skips - k)
            x = blk(x, skip)

        x = self.decoder_pred(self.norm(x))
        x = unpatchify(x[:, self.extras:, :], self.in_chans, self.grid)
        return self.final_layer(x)


def convert_official_uvit_state_dict(state_dict: Mapping[str, Tensor], num_skips: int | None = None) -> dict[str, Tensor]:
    """Map a checkpoint of the official U-ViT or ScaleLong ``UViT`` onto this class.

    The trunk's names are the same. ScaleLong keeps its gates in ``se`` (shared, ``scalelong=3``)
    or ``se.{k}`` (non-shared, ``scalelong=4``), where ``k`` counts decoder blocks from the first,
    i.e. k = 0 is the innermost LSC. Here the non-shared gates are indexed by LSC, outermost first,
    so ``se.{k}`` becomes ``skip_scaling.gates.{N-1-k}``. Load the result with ``strict=True`` into
    a UViT built with the matching ``scaling`` (``none``/``sqrt2``/``constant`` for 0/1/2,
    ``learnable`` for 3, ``learnable_nonshared`` for 4).
    """
    out: dict[str, Tensor] = {}
    nonshared = {k for k in state_dict if k.startswith("se.") and k.split(".")[1].isdigit()}
    if nonshared and num_skips is None:
        num_skips = 1 + max(int(k.split(".")[1]) for k in nonshared)
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("se."):
            parts = key.split(".")
            if parts[1].isdigit():
                key = ".".join(["skip_scaling", "gates", str(num_skips - 1 - int(parts[1])), *parts[2:]])
            else:
                key = "skip_scaling.gate." + ".".join(parts[1:])
        out[key] = value
    return out
