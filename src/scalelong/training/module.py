"""The LightningModule: one training step of an epsilon-prediction diffusion model (every random
draw keyed by (seed, step)), and the hooks around the optimizer step: fp16 unscaling, the
divergence guard, EMA, warm-up. Details: ``docs/design.md``, "The training step"."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from scalelong.data.sampler import batch_len
from scalelong.data.space import DataSpace
from scalelong.diffusion import TRAIN_T_EPS, VPSchedule, noise_prediction_loss
from scalelong.model import DiffusionModel
from scalelong.models.compile import compile_network
from scalelong.training.ema import EMA
from scalelong.utils.errors import TrainingDiverged
from scalelong.utils.seeding import STREAM_DROPOUT, STREAM_TRAIN_NOISE, step_seed


def warmup_constant(step: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up from 0 over ``warmup_steps`` optimizer steps, then 1 (as the
    official U-ViT ``customized`` schedule, which gives step 0 a factor of 0)."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


class DiffusionModule(pl.LightningModule):
    """Trains ``net`` (its EMA copy is ``ema.module``) to predict the noise under ``sde``.

    ``optimizer`` is called with the network's parameters (a ``_partial_`` of ``torch.optim.AdamW``
    from the ``optim`` config). ``model`` is the same network, EMA and schedule as a
    ``DiffusionModel`` for sampling. State dict keys: ``net.*``, ``ema.module.*`` and, for text
    models, ``empty_context``.
    """

    def __init__(self, net: nn.Module, sde: VPSchedule, space: DataSpace, optimizer: Callable[..., torch.optim.Optimizer],
                 ema_decay: float = 0.9999, ema_warmup: bool = False, warmup_steps: int = 0, grad_clip: float | None = None,
                 max_nonfinite_in_row: int = 20, seed: int = 0, channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.net = net
        self.ema = EMA(self.net, float(ema_decay), ema_warmup)
        self.sde, self.space = sde, space
        self.optimizer_factory = optimizer
        self.warmup_steps, self.grad_clip = int(warmup_steps), grad_clip
        self.max_nonfinite_in_row = int(max_nonfinite_in_row or 0)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        if compile:  # True, or compile_network's options (mode, scope) from models.compile.training_compile
            # In place: parameter names (and so checkpoints) stay those of the eager model.
            compile_network(self.net, **(compile if isinstance(compile, dict) else {}))
        if space.text_conditional:  # filled from the data set at fit start; kept in checkpoints for sampling
            self.register_buffer("empty_context", torch.zeros(space.context_shape))
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.overflow_total = 0  # fp16 steps the loss scaler skipped
        self._sampling_model: DiffusionModel | None = None

    @property
    def model(self) -> DiffusionModel:
        """The network, its EMA and the schedule as a sampling model (shares the weights; one
        object, so a loaded latent decoder is kept between sample grids)."""
        if self._sampling_model is None:
            self._sampling_model = DiffusionModel(self.net, self.ema.module, self.sde, self.space)
        self._sampling_model.empty_context = getattr(self, "empty_context", None)  # follows .to(device)
        return self._sampling_model

    # --- training -----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.channels_last and self.device.type == "cuda":  # faster cuDNN convolutions (UNet)
            self.net.to(memory_format=torch.channels_last)
            self.ema.module.to(memory_format=torch.channels_last)
        data = getattr(self.trainer.datamodule, "data", None) if self._trainer is not None else None
        if self.space.text_conditional and data is not None:
            self.empty_context.copy_(torch.as_tensor(data.empty_context, dtype=torch.float32))

    def _global_draws(self, step: int, global_batch: int) -> dict[str, Tensor]:
        """Random draws for the whole global batch at ``step``: t (B,), noise (B, C, H, W), flip
        and condition-drop masks (B,), and the latent posterior noise (B, C, H, W)."""
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, step, STREAM_TRAIN_NOISE))
        shape = (global_batch, *self.space.image_shape)
        t = self.sde.sample_t(global_batch, TRAIN_T_EPS, device=self.device, generator=g)
        noise = torch.randn(shape, device=self.device, generator=g)
        flip = torch.rand(global_batch, device=self.device, generator=g) < 0.5
        # Drawn after the others, so adding them did not change the draws above.
        drop = torch.rand(global_batch, device=self.device, generator=g)
        latent_noise = torch.randn(shape, device=self.device, generator=g) if self.space.latent_scale else None
        return {"t": t, "noise": noise, "flip": flip, "drop": drop, "latent_noise": latent_noise}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = int(batch["step"])
        local = batch_len(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        torch.manual_seed(step_seed(self.seed, step, STREAM_DROPOUT) + rank)

        draws = {k: None if v is None else v[rank * local:(rank + 1) * local]
                 for k, v in self._global_draws(step, local * world).items()}
        x0 = self.space.clean_input(batch, draws["flip"], draws["latent_noise"])
        if self.channels_last and x0.is_cuda:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond = self.space.condition(batch, draws["drop"], getattr(self, "empty_context", None))
        # The loss the tests check, with this step's keyed draws of t and the noise.
        loss = noise_prediction_loss(self.net, x0, self.sde, cond, t=draws["t"], noise=draws["noise"])

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
        max_norm = float(self.grad_clip) if self.grad_clip else math.inf
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
            limit = self.max_nonfinite_in_row
            if limit and self.nonfinite_in_row >= limit:
                raise TrainingDiverged(
                    f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (step "
                    f"{self.global_step}, {self.nonfinite_total} in all); the last checkpoint holds the last "
                    "good weights. Lower optim.lr, set train.grad_clip, or try a smaller scaling.kappa"
                )
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (checkpoints) run before the
        # module's on_train_batch_end and must see this step's average.
        self.ema.update(self.net, self.global_step + 1)  # the n-th update (global_step counts the steps before)

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
        # fused AdamW (one kernel for the whole update) on CUDA unless the config says otherwise
        fused = getattr(self.optimizer_factory, "keywords", {}).get("fused")
        extra = {"fused": True} if fused is None and self.device.type == "cuda" else {}
        optimizer = self.optimizer_factory(self.net.parameters(), **extra)
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
