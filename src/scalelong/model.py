"""A trained diffusion model without Lightning: the network and its EMA copy, the noise schedule and
the data space. It generates samples (with guidance), decodes latents to pixels, and is what
sampling, evaluation, the sample-grid and FID callbacks and the stability probe work with."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scalelong.checkpoints import load_model_parts
from scalelong.data.space import DataSpace
from scalelong.diffusion import NoisePredictor, VPSchedule, sample
from scalelong.precision import AutocastNetwork, sampling_precision, tf32_on_cuda
from scalelong.scaling.sampling_time import scaled_skips
from scalelong.utils.errors import ConfigError


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> [0, 255] uint8, rounding to the nearest level."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DiffusionModel:
    """``net`` (the trained weights), ``ema_net`` (their average, the one to sample from),
    ``sde``, ``space``; ``empty_context`` (tokens, dim) is the null caption of a text model.
    ``config`` is the run's configuration when the model came from a checkpoint (defaults for
    sampling and evaluation: the data set's protocol, where its data lie)."""

    def __init__(self, net: nn.Module, ema_net: nn.Module, sde: VPSchedule, space: DataSpace,
                 empty_context: Tensor | None = None, config: Mapping[str, Any] | None = None):
        self.net, self.ema_net, self.sde, self.space = net, ema_net, sde, space
        self.empty_context = empty_context
        self.config = dict(config or {})
        self.decoder_name, self.decoder_subfolder = space.decoder, space.decoder_subfolder
        self._decoder = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
        """The model stored in a training checkpoint (``checkpoints/last.ckpt`` of a run)."""
        *parts, step = load_model_parts(path, device)
        model = cls(*parts)
        model.step = step
        return model

    @property
    def device(self) -> torch.device:
        return next(self.ema_net.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.space.num_classes

    @property
    def text_conditional(self) -> bool:
        return self.space.text_conditional

    @property
    def latent_scale(self) -> float | None:
        return self.space.latent_scale

    def predictor(self, net: nn.Module, labels: Tensor | None = None, contexts: Tensor | None = None,
                  guidance_scale: float = 0.0) -> NoisePredictor:
        """``eps_fn(x, t)`` of ``net`` for the samplers, conditioned and guided."""
        if labels is not None:
            cond = {"y": labels}
            null = {"y": torch.full_like(labels, self.num_classes)} if guidance_scale else None
            if guidance_scale and not self.space.label_drop_prob:
                raise ConfigError("guidance needs a model trained with label dropout (dataset.label_drop_prob > 0)")
        elif contexts is not None:
            cond = {"context": contexts}
            null = {"context": self.empty_context.to(contexts.dtype).expand_as(contexts)} if guidance_scale else None
        else:
            if guidance_scale:
                raise ConfigError("guidance needs a conditional model")
            cond, null = {}, None
        return NoisePredictor(net, cond, null, guidance_scale=guidance_scale,
                              time_input_scale=self.sde.time_input_scale)

    def set_decoder(self, name: str | None, subfolder: str | None = None) -> None:
        """Decode latents with another autoencoder (a diffusers folder or hub id) from now on."""
        self.decoder_name, self.decoder_subfolder, self._decoder = name, subfolder, None

    def decode(self, x: Tensor) -> Tensor:
        """Model-space samples -> uint8 pixels (N, 3 or C, H, W). Latents go through the
        configured autoencoder (``dataset.decoder``); without one, the first three latent
        channels are shown as a preview."""
        if self.latent_scale is None:
            return to_uint8(x)
        if self.decoder_name:
            if self._decoder is None:
                self._decoder = load_latent_decoder(self.decoder_name, self.device, self.decoder_subfolder)
            with torch.autocast(self.device.type, enabled=False):
                pixels = self._decoder.decode(x.float() / self.latent_scale).sample
            return to_uint8(pixels)
        return to_uint8(x[:, :3] / (4 * self.latent_scale))

    @torch.no_grad()
    def generate(self, num: int, sampler: str = "euler_ode", steps: int = 50, seed: int = 0,
                 use_ema: bool = True, labels: Tensor | None = None, contexts: Tensor | None = None,
                 guidance_scale: float = 0.0, batch_size: int | None = None, progress: bool = False,
                 skip_scale: Any = None, precision: str | None = None) -> Tensor:
        """``num`` samples as uint8 pixels (num, C, H, W); the same ``seed`` gives the same samples.

        Class-conditional models cycle through the classes unless ``labels`` (num,) are given;
        text-conditional models need ``contexts`` (num, tokens, dim). ``guidance_scale`` w > 0
        applies classifier-free guidance, eps = (1 + w) eps(cond) - w eps(null). ``skip_scale``
        multiplies the long skips while sampling (after the trained strategy): one factor, "outer:inner"
        or a factor per skip (``scalelong.scaling.sampling_time``); 1 or None leave the samples as they are.
        ``precision`` of the network call: "bf16" (autocast) or "fp32"; None: bf16 on CUDA, fp32
        elsewhere (``scalelong.precision``). The sampler's arithmetic stays float32 either way.
        """
        net = self.ema_net if use_ema else self.net
        device = self.device
        precision = sampling_precision(device, precision)
        if self.num_classes and labels is None:
            labels = torch.arange(num, device=device) % self.num_classes
        if self.text_conditional and contexts is None:
            raise ConfigError("a text-conditional model samples from caption embeddings: pass contexts")
        g = torch.Generator(device=device).manual_seed(seed)
        out = []
        batch_size = batch_size or num
        with eval_mode(net), scaled_skips(net, skip_scale), tf32_on_cuda(device):
            for lo in range(0, num, batch_size):
                n = min(batch_size, num - lo)
                part_y = None if labels is None else labels[lo:lo + n].to(device)
                part_c = None if contexts is None else contexts[lo:lo + n].to(device)
                eps_fn = self.predictor(AutocastNetwork(net, device, precision), part_y, part_c, guidance_scale)
                x = sample(eps_fn, self.sde, (n, *self.space.image_shape), sampler=sampler, steps=steps,
                           generator=g, device=device, progress=progress)
                out.append(self.decode(x).cpu())
        return torch.cat(out)


def load_latent_decoder(name: str, device: torch.device, subfolder: str | None = None):
    """The Stable Diffusion autoencoder (diffusers ``AutoencoderKL``) from a path or hub id
    (``subfolder`` "vae" for a whole Stable Diffusion repository)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("dataset.decoder needs diffusers: pip install -e '.[coco]'") from None
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        return AutoencoderKL.from_pretrained(name, **kwargs).to(device).eval().requires_grad_(False)
    except Exception as err:
        raise ConfigError(f"cannot load the autoencoder {name!r} ({type(err).__name__}: {err}); "
                          "give dataset.decoder a local diffusers folder or a hub id reachable from here") from None
