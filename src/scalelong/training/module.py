"""The LightningModule: an epsilon-prediction diffusion model around one backbone and its strategy.

Every random draw of a training step is a function of (seed, step): the times t, the noise, the
flips, the condition dropout and the latent posterior noise (from explicit generators over the
whole global batch, of which each rank takes its slice) and dropout (the global generator is
reseeded per step and rank). So a resumed run repeats
an uninterrupted one, and W processes see the same global batch as one process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from scalelong.data.coco import sample_latents
from scalelong.data.sampler import batch_len, step_seed
from scalelong.diffusion import TRAIN_T_EPS, NoisePredictor, get_sde, noise_prediction_loss, sample
from scalelong.ema import EMA
from scalelong.errors import ConfigError, TrainingDiverged
from scalelong.models import build_backbone

# Generator streams, so t, noise and flips never share random numbers.
_STREAM_TRAIN_NOISE = 2
_STREAM_DROPOUT = 3


def warmup_constant(step: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from 0 over ``warmup_steps`` optimizer steps, then 1 (as the
    official U-ViT ``customized`` schedule, which gives step 0 a factor of 0)."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> [0, 255] uint8, rounding to the nearest level."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@contextmanager
def eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DiffusionModule(pl.LightningModule):
    """Owns the backbone (``net``), its EMA copy (``ema.module``) and the noise schedule.

    ``config`` is the whole resolved run configuration as a plain dict; it is stored in every
    checkpoint, so ``DiffusionModule.load_from_checkpoint(path)`` rebuilds the model alone.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.save_hyperparameters({"config": dict(config)})
        self.config = config
        data = config["dataset"]
        self.image_shape = (int(data["channels"]), int(data["image_size"]), int(data["image_size"]))
        self.num_classes = int(data.get("num_classes", 0)) if data.get("conditional") else 0
        # Classifier-free guidance: labels become the extra "null" class, captions the empty prompt.
        self.label_drop_prob = float(data.get("label_drop_prob") or 0.0) if self.num_classes else 0.0
        self.text_conditional = bool(data.get("text_conditional"))
        self.text_drop_prob = float(data.get("text_drop_prob") or 0.0) if self.text_conditional else 0.0
        self.latent_scale = float(data["latent_scale"]) if data.get("latent_scale") else None
        self.decoder_name = data.get("decoder")
        self.decoder_subfolder = data.get("decoder_subfolder")
        self._decoder = None
        self.random_flip = bool(data.get("random_flip", False))
        self.seed = int(config["seed"])
        self.net = build_backbone(config["model"], config["scaling"], data)
        self.ema = EMA(self.net, float(config["ema"]["decay"]))
        model_cfg = config["model"]
        self.channels_last = bool(model_cfg.get("channels_last", False))
        if model_cfg.get("compile"):
            # In place: parameter names (and so checkpoints) stay those of the eager model.
            self.net.compile()
        diffusion = dict(config["diffusion"])
        self.sde = get_sde(diffusion.pop("schedule"), **diffusion)
        self.optim = dict(config["optim"])
        if self.text_conditional:  # filled from the data set at fit start; kept in checkpoints for sampling
            shape = (int(data["num_context_tokens"]), int(data["context_dim"]))
            self.register_buffer("empty_context", torch.zeros(shape))
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.overflow_total = 0  # fp16 steps the loss scaler skipped

    # --- training -----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.channels_last and self.device.type == "cuda":  # faster cuDNN convolutions (UNet)
            self.net.to(memory_format=torch.channels_last)
            self.ema.module.to(memory_format=torch.channels_last)
        data = getattr(self.trainer.datamodule, "data", None) if self._trainer is not None else None
        if self.text_conditional and data is not None:
            self.empty_context.copy_(torch.as_tensor(data.empty_context, dtype=torch.float32))

    def _global_draws(self, step: int, global_batch: int) -> dict[str, Tensor]:
        """Random draws for the whole global batch at ``step``: t (B,), noise (B, C, H, W), flip
        and condition-drop masks (B,), and the latent posterior noise (B, C, H, W)."""
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, step, _STREAM_TRAIN_NOISE))
        t = self.sde.sample_t(global_batch, TRAIN_T_EPS, device=self.device, generator=g)
        noise = torch.randn((global_batch, *self.image_shape), device=self.device, generator=g)
        flip = torch.rand(global_batch, device=self.device, generator=g) < 0.5
        # Drawn after the others, so adding them did not change the draws above.
        drop = torch.rand(global_batch, device=self.device, generator=g)
        latent_noise = torch.randn((global_batch, *self.image_shape), device=self.device, generator=g) \
            if self.latent_scale else None
        return {"t": t, "noise": noise, "flip": flip, "drop": drop, "latent_noise": latent_noise}

    def _clean_batch(self, batch: dict[str, Tensor], draws: dict[str, Tensor]) -> Tensor:
        """x0 in model space: pixels in [-1, 1] (flipped when configured), or sampled latents."""
        if "moments" in batch:
            return sample_latents(batch["moments"], scale=self.latent_scale, noise=draws["latent_noise"])
        x0 = batch["images"].float() / 127.5 - 1.0
        if self.random_flip:
            x0 = torch.where(draws["flip"][:, None, None, None], x0.flip(-1), x0)
        return x0

    def _conditioning(self, batch: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
        if self.num_classes:
            y = batch["labels"]
            if self.label_drop_prob:
                y = torch.where(drop < self.label_drop_prob, torch.full_like(y, self.num_classes), y)
            return {"y": y}
        if self.text_conditional:
            context = batch["context"]
            if self.text_drop_prob:
                empty = self.empty_context.to(context.dtype).expand_as(context)
                context = torch.where((drop < self.text_drop_prob)[:, None, None], empty, context)
            return {"context": context}
        return {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = int(batch["step"])
        local = batch_len(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        torch.manual_seed(step_seed(self.seed, step, _STREAM_DROPOUT) + rank)

        draws = {k: None if v is None else v[rank * local:(rank + 1) * local]
                 for k, v in self._global_draws(step, local * world).items()}
        x0 = self._clean_batch(batch, draws)
        if self.channels_last and x0.is_cuda:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        # The loss the tests check, with this step's keyed draws of t and the noise.
        loss = noise_prediction_loss(self.net, x0, self.sde, self._conditioning(batch, draws["drop"]),
                                     t=draws["t"], noise=draws["noise"])

        self.log("train/loss", loss, prog_bar=True, sync_dist=world > 1)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"] if self._trainer else 0.0)
        return loss

    def _loss_scaler(self):
        """The fp16 ``GradScaler`` of Lightning's mixed precision (``16-mixed``), or None."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def on_before_backward(self, loss: Tensor) -> None:
        # Told apart later: a non-finite loss is divergence, non-finite gradients of a finite
        # loss under a loss scaler are an fp16 overflow (the scaler's business).
        self._loss_finite = torch.isfinite(loss.detach())

    def on_after_backward(self) -> None:
        # Lightning leaves unscaling to optimizers that handle it in their step (fused AdamW),
        # so their gradients would still carry the loss scale in the hooks below. Unscale them
        # here, before any callback measures, clips or guards them; the scaler then steps with
        # the unscaled gradients and its own overflow check.
        scaler = self._loss_scaler()
        if scaler is not None and self.automatic_optimization:
            optimizer = self.trainer.optimizers[0]
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                scaler.unscale_(optimizer)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are unscaled (AMP) and all-reduced (DDP) here, so every rank takes the same
        # decision. The norm is taken before clipping: the log shows what the optimizer was given.
        clip = self.optim.get("grad_clip")
        max_norm = float(clip) if clip else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm, foreach=True)
        self.log("train/grad_norm", norm)
        loss_finite = getattr(self, "_loss_finite", None)
        flags = torch.stack([torch.isfinite(norm), loss_finite if loss_finite is not None else torch.isfinite(norm)])
        grads_finite, loss_finite = flags.tolist()  # one device sync per step
        if self._loss_scaler() is not None and loss_finite and not grads_finite:
            # fp16 overflow while the loss scale calibrates: the scaler skips this step and
            # lowers the scale. Not a divergence, and the gradients stay for its own check.
            self.overflow_total += 1
            self.log("train/overflow_skipped", float(self.overflow_total))
            return
        self._guard_nonfinite(grads_finite and loss_finite)

    def _guard_nonfinite(self, finite: bool) -> None:
        """Divergence guard: a step with a non-finite loss or gradient is skipped, counted and
        logged; ``optim.max_nonfinite_in_row`` of them in a row stop the run."""
        if finite:
            self.nonfinite_in_row = 0
        else:
            # No gradient: AdamW leaves these parameters and their state untouched this step.
            for p in self.net.parameters():
                p.grad = None
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            limit = int(self.optim.get("max_nonfinite_in_row") or 0)
            if limit and self.nonfinite_in_row >= limit:
                raise TrainingDiverged(
                    f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (step "
                    f"{self.global_step}, {self.nonfinite_total} in all); the last checkpoint holds the last "
                    "good weights. Lower optim.lr, set optim.grad_clip, or try a smaller scaling.kappa"
                )
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (checkpoints) run before the
        # module's on_train_batch_end and must see this step's average.
        self.ema.update(self.net)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step % max(every, 1) == 0:
            for i, c in enumerate(self.net.skip_scaling.coefficients(), start=1):
                self.log(f"scaling/lsc{i}", c.mean)
                if c.std > 0:
                    self.log(f"scaling/lsc{i}_std", c.std)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite"] = {"in_row": self.nonfinite_in_row, "total": self.nonfinite_total,
                                   "overflow": self.overflow_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("nonfinite", {})
        self.nonfinite_in_row = int(counts.get("in_row", 0))
        self.nonfinite_total = int(counts.get("total", 0))
        self.overflow_total = int(counts.get("overflow", 0))

    def configure_optimizers(self):
        o = self.optim
        # fused: one kernel for the whole update (CUDA by default; `optim.fused=true` elsewhere).
        fused = o.get("fused")
        fused = self.device.type == "cuda" if fused is None else bool(fused)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=float(o["lr"]), betas=tuple(o["betas"]),
                                      weight_decay=float(o["weight_decay"]), fused=fused or None)
        warmup = int(o.get("warmup_steps", 0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- sampling -----------------------------------------------------------------------------

    def _guided_predictor(self, net, labels: Tensor | None, contexts: Tensor | None, guidance_scale: float):
        if labels is not None:
            cond = {"y": labels}
            null = {"y": torch.full_like(labels, self.num_classes)} if guidance_scale else None
            if guidance_scale and not self.label_drop_prob:
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
                # not a registered submodule: checkpoints must not carry the frozen autoencoder
                object.__setattr__(self, "_decoder", load_latent_decoder(self.decoder_name, self.device,
                                                                         self.decoder_subfolder))
            with torch.autocast(self.device.type, enabled=False):
                pixels = self._decoder.decode(x.float() / self.latent_scale).sample
            return to_uint8(pixels)
        return to_uint8(x[:, :3] / (4 * self.latent_scale))

    @torch.no_grad()
    def generate(self, num: int, sampler: str = "euler_ode", steps: int = 50, seed: int = 0,
                 use_ema: bool = True, labels: Tensor | None = None, contexts: Tensor | None = None,
                 guidance_scale: float = 0.0, batch_size: int | None = None, progress: bool = False) -> Tensor:
        """``num`` samples as uint8 pixels (num, C, H, W); the same ``seed`` gives the same samples.

        Class-conditional models cycle through the classes unless ``labels`` (num,) are given;
        text-conditional models need ``contexts`` (num, tokens, dim). ``guidance_scale`` w > 0
        applies classifier-free guidance, eps = (1 + w) eps(cond) - w eps(null).
        """
        net = self.ema.module if use_ema else self.net
        if self.num_classes and labels is None:
            labels = torch.arange(num, device=self.device) % self.num_classes
        if self.text_conditional and contexts is None:
            raise ConfigError("a text-conditional model samples from caption embeddings: pass contexts")
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        batch_size = batch_size or num
        with eval_mode(net):
            for lo in range(0, num, batch_size):
                n = min(batch_size, num - lo)
                part_y = None if labels is None else labels[lo:lo + n].to(self.device)
                part_c = None if contexts is None else contexts[lo:lo + n].to(self.device)
                eps_fn = self._guided_predictor(net, part_y, part_c, guidance_scale)
                x = sample(eps_fn, self.sde, (n, *self.image_shape), sampler=sampler, steps=steps,
                           generator=g, device=self.device, progress=progress)
                out.append(self.decode(x).cpu())
        return torch.cat(out)


def load_latent_decoder(name: str, device: torch.device, subfolder: str | None = None):
    """The Stable Diffusion autoencoder (diffusers ``AutoencoderKL``) from a path or hub id
    (``subfolder`` "vae" for a whole Stable Diffusion repository)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("dataset.decoder needs diffusers: pip install diffusers") from None
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        return AutoencoderKL.from_pretrained(name, **kwargs).to(device).eval().requires_grad_(False)
    except Exception as err:
        raise ConfigError(f"cannot load the autoencoder {name!r} ({type(err).__name__}: {err}); "
                          "give dataset.decoder a local diffusers folder or a hub id reachable from here") from None
