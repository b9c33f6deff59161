"""Any diffusers ``UNet2DModel`` as a backbone, with the long-skip strategy on its long skips.

The long skips of a ``UNet2DModel`` are the residual samples its down blocks hand to its up
blocks: the ``conv_in`` output, every down-block layer's output and every downsample's output.
Each up-block resnet consumes one of them as ``cat([hidden_states, res_sample])``. A forward
pre-hook on each of those resnets splits its input back into the decoder half and the skip half,
passes them through ``skip_scaling.merge`` and concatenates the result, so a strategy acts on
exactly the long skips (and, for ``mp_cat``, on the decoder half beside each) whatever the block
types, and ``diffusers``' own forward runs unchanged. When the strategy returns both halves
untouched (``none``), the hook returns nothing and the resnet sees diffusers' own tensor.

Presets: ``conf/model/diffusers_unet_*.yaml``; export: ``scalelong-export-diffusers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from scalelong.scaling import SkipScaling, build_skip_scaling
from scalelong.utils.errors import ConfigError

__all__ = ["DiffusersUNet", "DOWN_BLOCKS", "UP_BLOCKS"]

# Block types whose skips are one tensor per layer plus one per downsample, each consumed by one
# up-block resnet through a concatenation. The Skip* blocks (score-SDE's FIR skip path) hand a sum
# of two paths to the up blocks, with no module whose output is the skip, and are not supported.
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")

MISSING = "model diffusers_unet needs diffusers: pip install -e '.[diffusers]'"


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    return tuple(str(v) for v in value)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of integers, got {value!r}") from None


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` (``self.unet``) predicting the noise, with ScaleLong skip scaling.

    Arguments are ``UNet2DModel``'s (same names and meaning; the defaults here are the DDPM CIFAR10
    configuration of google/ddpm-cifar10-32, not ``UNet2DModel``'s) plus ``scaling`` and
    ``use_checkpoint`` (diffusers' gradient checkpointing). ``num_class_embeds``: classes including
    a null class, or -1 / None for an unconditional model. Fixed here: positional time embedding
    (the network gets ``timesteps = t * 999``, continuous, as the other backbones), no input
    centring, no class-embedding type (a plain embedding table when conditional).

    Shapes: x (B, in_channels, sample_size, sample_size); timesteps (B,) float; y (B,) long.
    """

    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: Sequence[int] = (128, 256, 256, 256),
        layers_per_block: int = 2,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types: Sequence[str] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        attention_head_dim: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        act_fn: str = "silu",
        flip_sin_to_cos: bool = False,
        freq_shift: int = 1,
        downsample_padding: int = 0,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        resnet_time_scale_shift: str = "default",
        mid_block_scale_factor: float = 1.0,
        add_attention: bool = True,
        num_class_embeds: int | None = None,
        scaling: str | Mapping[str, Any] | SkipScaling | None = "none",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise ConfigError(MISSING) from None
        down_block_types = _strings(down_block_types)
        up_block_types = _strings(up_block_types)
        block_out_channels = _ints(block_out_channels, "block_out_channels")
        for kind, types, known in (("down", down_block_types, DOWN_BLOCKS), ("up", up_block_types, UP_BLOCKS)):
            unknown = [t for t in types if t not in known]
            if unknown:
                raise ConfigError(f"{kind}_block_types {', '.join(unknown)} not supported as long-skip backbones; "
                                  f"supported: {', '.join(known)}")
        sample_size, in_channels = int(sample_size), int(in_channels)
        levels = len(block_out_channels)
        if not levels or sample_size < 1 or sample_size % 2 ** (levels - 1):
            raise ConfigError(f"sample_size {sample_size} is not divisible by 2**{levels - 1} ({levels} levels)")
        num_class_embeds = None if num_class_embeds is None or int(num_class_embeds) <= 0 else int(num_class_embeds)
        # Build the strategy first: a bad name or option fails before any allocation.
        strategy = build_skip_scaling(scaling)
        # mid_block_type is newer than diffusers 0.27: passed only when it is not the default.
        mid = {} if mid_block_type == "UNetMidBlock2D" else {"mid_block_type": mid_block_type}
        try:
            self.unet = UNet2DModel(
                sample_size=sample_size, in_channels=in_channels,
                out_channels=in_channels if out_channels is None else int(out_channels),
                block_out_channels=block_out_channels, layers_per_block=int(layers_per_block),
                down_block_types=down_block_types, up_block_types=up_block_types, **mid,
                attention_head_dim=None if attention_head_dim is None else int(attention_head_dim),
                norm_num_groups=int(norm_num_groups), norm_eps=float(norm_eps), dropout=float(dropout),
                act_fn=act_fn, flip_sin_to_cos=bool(flip_sin_to_cos), freq_shift=int(freq_shift),
                downsample_padding=int(downsample_padding), downsample_type=downsample_type,
                upsample_type=upsample_type, resnet_time_scale_shift=resnet_time_scale_shift,
                mid_block_scale_factor=float(mid_block_scale_factor), add_attention=bool(add_attention),
                num_class_embeds=num_class_embeds, time_embedding_type="positional",
            )
        except (ValueError, TypeError, KeyError) as err:  # diffusers' own checks (lengths, groups, names)
            raise ConfigError(f"model diffusers_unet: {str(err).splitlines()[0]}") from None
        if use_checkpoint:
            self.unet.enable_gradient_checkpointing()
        self.sample_size, self.in_channels, self.num_class_embeds = sample_size, in_channels, num_class_embeds

        self.skip_shapes = self._long_skip_shapes()
        self.num_skips = len(self.skip_shapes)
        consumers = self.skip_consumers()
        if len(consumers) != self.num_skips:
            raise ConfigError(f"this UNet2DModel's down path hands {self.num_skips} skips to up blocks with "
                              f"{len(consumers)} resnets; give up blocks one more layer than down blocks")
        # Execution order: the first up-block resnet takes the deepest skip (LSC N).
        for k, resnet in enumerate(consumers):
            index = self.num_skips - k
            skip_channels = self.skip_shapes[index - 1][0]
            resnet.scalelong_lsc = index
            resnet.scalelong_decoder_channels = resnet.in_channels - skip_channels
            resnet.register_forward_pre_hook(self._merge_long_skip)
        strategy.setup(self.skip_shapes, "channels")
        self.skip_scaling = strategy

    def _long_skip_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of every long skip, outermost first, as UNet2DModel.forward collects them."""
        res = self.sample_size
        shapes = [(self.unet.conv_in.out_channels, res, res)]
        for block in self.unet.down_blocks:
            channels = block.resnets[-1].out_channels
            shapes += [(channels, res, res)] * len(block.resnets)
            if block.downsamplers is not None:
                res //= 2
                shapes.append((channels, res, res))
        return shapes

    def skip_consumers(self) -> list[nn.Module]:
        """The up-block resnets, in execution order: resnet k consumes LSC N-k."""
        return [resnet for block in self.unet.up_blocks for resnet in block.resnets]

    def skip_producers(self) -> list[nn.Module]:
        """Modules whose output is the long skip of LSC i (list index i-1)."""
        out: list[nn.Module] = [self.unet.conv_in]
        for block in self.unet.down_blocks:
            out += list(getattr(block, "attentions", None) or block.resnets)
            if block.downsamplers is not None:
                out.append(block.downsamplers[0])
        return out

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        """Blocks the stability monitor measures, in execution order: ``in_{i-1}`` outputs LSC i,
        then the mid block, then ``out_{k}``, the up-block resnet consuming LSC N-k."""
        mid = [("mid", self.unet.mid_block)] if self.unet.mid_block is not None else []
        return ([(f"in_{k:02d}", m) for k, m in enumerate(self.skip_producers())] + mid
                + [(f"out_{k:02d}", m) for k, m in enumerate(self.skip_consumers())])

    @torch.no_grad()
    def merges_are_identity(self) -> bool:
        """Whether the strategy hands every long skip and decoder input on untouched (``none``, CS
        with kappa = 1), i.e. whether ``self.unet`` alone computes this network: a probe merge of
        zeros of each LSC's shapes must return the very tensors it was given."""
        param = next(self.unet.parameters())
        for resnet in self.skip_consumers():
            index = resnet.scalelong_lsc
            channels, h, w = self.skip_shapes[index - 1]
            decoder_input = torch.zeros(1, resnet.scalelong_decoder_channels, h, w, dtype=param.dtype,
                                        device=param.device)
            skip = torch.zeros(1, channels, h, w, dtype=param.dtype, device=param.device)
            new_input, new_skip = self.skip_scaling.merge(decoder_input, skip, index)
            if new_input is not decoder_input or new_skip is not skip:
                return False
        return True

    def _merge_long_skip(self, resnet: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook of an up-block resnet: its input cat([h, skip]) through the strategy."""
        merged, *rest = args
        split = resnet.scalelong_decoder_channels
        decoder_input, skip = merged[:, :split], merged[:, split:]
        new_input, new_skip = self.skip_scaling.merge(decoder_input, skip, resnet.scalelong_lsc)
        if new_input is decoder_input and new_skip is skip:
            return None  # untouched: diffusers' own tensor goes on, bit for bit
        return (torch.cat([new_input, new_skip], dim=1), *rest)

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        if self.num_class_embeds is None and y is not None:
            raise ValueError("this UNet is unconditional (num_class_embeds unset) but got labels y")
        if self.num_class_embeds is not None and y is None:
            raise ValueError(f"this UNet is class-conditional ({self.num_class_embeds} classes): pass y")
        return self.unet(x, timesteps, class_labels=y, return_dict=False)[0]
