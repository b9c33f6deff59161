"""The LightningModule: one training step of an epsilon-prediction diffusion model (every random
draw keyed by (seed, step)), and the hooks around the optimizer step: fp16 unscaling, the
divergence guard (decided on the device), EMA, the learning-rate schedule. Nothing in a step reads the device
except on logging steps (every ``trainer.log_every_n_steps`` and the last). Details:
``docs/design.md``, "The training step"."""

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
from scalelong.training.grad_layout import match_gradient_strides
from scalelong.training.guard import DivergenceGuard
from scalelong.training.lr_schedule import check_lr_decay, lr_factor
from scalelong.utils.distributed import is_distributed
from scalelong.utils.errors import ConfigError
from scalelong.utils.seeding import STREAM_DROPOUT, STREAM_TRAIN_NOISE, step_seed


class DiffusionModule(pl.LightningModule):
    """Trains ``net`` (its EMA copy is ``ema.module``) to predict the noise under ``sde``.

    ``optimizer`` is called with the network's parameters (a ``_partial_`` of ``torch.optim.AdamW``
    from the ``optim`` config). ``model`` is the same network, EMA and schedule as a
    ``DiffusionModel`` for sampling. State dict keys: ``net.*``, ``ema.module.*`` and, for text
    models, ``empty_context``.
    """

    def __init__(self, net: nn.Module, sde: VPSchedule, space: DataSpace, optimizer: Callable[..., torch.optim.Optimizer],
                 ema_decay: float = 0.9999, ema_warmup: bool = False, warmup_steps: int = 0, grad_clip: float | None = None,
                 max_nonfinite_in_row: int = 20, seed: int = 0, channels_last: bool = False, compile: bool = False,
                 lr_decay: str | None = None, max_steps: int = 0, min_snr_gamma: float | None = None):
        super().__init__()
        self.net = net
        self.ema = EMA(self.net, float(ema_decay), ema_warmup)
        self.sde, self.space = sde, space
        self.optimizer_factory = optimizer
        self.warmup_steps, self.grad_clip = int(warmup_steps), grad_clip
        self.lr_decay, self.max_steps = check_lr_decay(lr_decay), int(max_steps)
        self.min_snr_gamma = check_min_snr_gamma(min_snr_gamma)
        self.max_nonfinite_in_row = int(max_nonfinite_in_row or 0)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        if compile:  # True, or compile_network's options (mode, scope) from models.compile.training_compile
            # In place: parameter names (and so checkpoints) stay those of the eager model.
            compile_network(self.net, **(compile if isinstance(compile, dict) else {}))
        if space.text_conditional:  # filled from the data set at fit start; kept in checkpoints for sampling
            self.register_buffer("empty_context", torch.zeros(space.context_shape))
        self.guard = DivergenceGuard(self.max_nonfinite_in_row)
        self._found_inf_set_on: torch.optim.Optimizer | None = None
        self._sampling_model: DiffusionModel | None = None

    # The guard's counters on the host (each read is a device sync: for tests and scripts, not per step).
    @property
    def nonfinite_total(self) -> int:
        return self.guard.read()["total"]

    @property
    def overflow_total(self) -> int:
        """fp16 steps the loss scaler skipped."""
        return self.guard.read()["overflow"]

    @property
    def model(self) -> DiffusionModel:
        """The network, its EMA and the schedule as a sampling model (shares the weights; one
        object, so a loaded latent decoder is kept between sample grids)."""
        if self._sampling_model is None:
            self._sampling_model = DiffusionModel(self.net, self.ema.module, self.sde, self.space)
        self._sampling_model.empty_context = getattr(self, "empty_context", None)  # follows .to(device)
        return self._sampling_model

    # --- training -----------------------------------------------------------------------------

    def configure_model(self) -> None:
        # Before the strategy moves the model and DDP wraps it: DDP's gradient buckets take the
        # parameters' strides from now on.
        on_cuda = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if self.channels_last and on_cuda:  # faster cuDNN convolutions (UNet)
            self.net.to(memory_format=torch.channels_last)
            self.ema.module.to(memory_format=torch.channels_last)
        ddp = self._trainer is not None and isinstance(self.trainer.strategy, pl.strategies.DDPStrategy)
        if ddp and not getattr(self, "_grad_strides_matched", False):  # once: a second fit keeps the hooks
            match_gradient_strides(self.net)
            self._grad_strides_matched = True

    def on_fit_start(self) -> None:
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

    def _log_every(self) -> int:
        return self.trainer.log_every_n_steps or 50  # 0 (no logs): the guard still checks every 50

    def _logs_at(self, steps_done: int) -> bool:
        """Whether the step after which ``steps_done`` optimizer steps are done logs: the steps whose
        metrics Lightning writes to the loggers (every ``log_every_n_steps``), and the run's last
        (its values become metrics.json). Other steps log nothing: a ``self.log`` costs host work,
        a logged value read for the loggers a device sync, and ``sync_dist`` a collective."""
        if self._trainer is None:
            return True
        return steps_done % self._log_every() == 0 or steps_done >= (self.trainer.max_steps or 0) > 0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # The batch's step is the trainer's (the sampler starts at it). Read from the batch, which
        # is on the device by now, it would make the host wait for the GPU every step: it is
        # checked on logging steps only.
        step = self.global_step if self._trainer is not None else int(batch["step"])
        logs = self._logs_at(step + 1)
        if logs and int(batch["step"]) != step:
            raise RuntimeError(f"batch of step {int(batch['step'])} at trainer step {step}: the data module's "
                               "sampler must start at the trainer's global_step")
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
        loss = noise_prediction_loss(self.net, x0, self.sde, cond, t=draws["t"], noise=draws["noise"],
                                     min_snr_gamma=self.min_snr_gamma)

        if logs:
            self.log("train/loss", loss, sync_dist=world > 1)
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
        # Gradients are unscaled (AMP) and all-reduced (DDP) here. The norm is taken before
        # clipping: the log shows what the optimizer was given.
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.net.parameters(), float(self.grad_clip), norm, foreach=True)
        loss_finite = getattr(self, "_loss_finite", None)
        loss_finite = torch.isfinite(norm) if loss_finite is None else loss_finite
        if is_distributed():
            # The norm is the same on every rank (all-reduced gradients), the loss is not: with
            # the loss finite everywhere or nowhere, every rank takes the same decisions.
            flag = loss_finite.float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            loss_finite = flag > 0
        scaler = self._loss_scaler()
        skip = self.guard.decide(norm, loss_finite, self.global_step, scaler is not None)
        self._skip_on_the_device(getattr(optimizer, "_optimizer", optimizer), skip, scaler)
        if self._logs_at(self.global_step + 1):
            counts = self.guard.read()  # the only device read of the guard
            self.log("train/grad_norm", norm)
            self.log("train/nonfinite_skipped", float(counts["total"]))
            if scaler is not None:
                self.log("train/overflow_skipped", float(counts["overflow"]))
            self.guard.check(counts, self.global_step, self._log_every())

    def _skip_on_the_device(self, optimizer: torch.optim.Optimizer, skip: Tensor, scaler: Any) -> None:
        """Make the coming optimizer step leave weights and optimizer state (moments, step count)
        untouched where ``skip`` is 1, without reading it: zeroing the gradients would not do,
        as AdamW's weight decay, moment decay and step count move on zero gradients too."""
        if scaler is not None:
            # The loss scaler skips the step on its own found_inf (fused AdamW on the device,
            # others after its own read); ours joins it. It also lowers the scale then, as for
            # the non-finite gradients that a non-finite loss gives.
            for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                torch.maximum(found, skip.to(found.device), out=found)
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused Adam/AdamW (the default on CUDA): the kernel skips parameters and moments
            # where found_inf is 1 and takes the step count back.
            optimizer.found_inf = skip
            self._found_inf_set_on = optimizer
        elif skip.item():
            # Other optimizers cannot skip on the device: one read per step (free on the CPU,
            # a sync on a GPU, where AdamW is fused unless optim.fused=false). Without gradients
            # AdamW leaves these parameters and their state untouched.
            for p in self.net.parameters():
                p.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._found_inf_set_on is not None:  # this step's only: no later step() may see it
            vars(self._found_inf_set_on).pop("found_inf", None)
            self._found_inf_set_on = None
        # Here rather than in on_train_batch_end: callbacks (checkpoints) run before the
        # module's on_train_batch_end and must see this step's average.
        self.ema.update(self.net, self.global_step + 1)  # the n-th update (global_step counts the steps before)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._logs_at(self.global_step):
            for i, c in enumerate(self.net.skip_scaling.coefficients(), start=1):
                self.log(f"scaling/lsc{i}", c.mean)
                if c.std > 0:
                    self.log(f"scaling/lsc{i}_std", c.std)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint.get("nonfinite", {}))

    def configure_optimizers(self):
        # fused AdamW (one kernel for the whole update) on CUDA unless the config says otherwise
        fused = getattr(self.optimizer_factory, "keywords", {}).get("fused")
        extra = {"fused": True} if fused is None and self.device.type == "cuda" else {}
        optimizer = self.optimizer_factory(self.net.parameters(), **extra)
        warmup, decay, total = self.warmup_steps, self.lr_decay, self.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, decay, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_min_snr_gamma(gamma: Any) -> float | None:
    """``train.min_snr_gamma`` as a float, or None (the plain loss); a clear error for anything else."""
    if gamma is None:
        return None
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"train.min_snr_gamma={gamma!r}: give a positive number (5 in the min-SNR "
                          "paper) to weight the loss by min(SNR, gamma) / SNR, or null for the plain loss")
    return value
