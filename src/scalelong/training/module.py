"""The LightningModule: an epsilon-prediction diffusion model around one backbone and its strategy.

Every random draw of a training step is a function of (seed, step): the times t, the noise, the
flips (from explicit generators over the whole global batch, of which each rank takes its
slice) and dropout (the global generator is reseeded per step and rank). So a resumed run repeats
an uninterrupted one, and W processes see the same global batch as one process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from scalelong.data.sampler import step_seed
from scalelong.diffusion import TIME_INPUT_SCALE, TRAIN_T_EPS, NoisePredictor, get_sde, sample
from scalelong.ema import EMA
from scalelong.errors import TrainingDiverged
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
        self.random_flip = bool(data.get("random_flip", False))
        self.seed = int(config["seed"])
        self.net = build_backbone(config["model"], config["scaling"], data)
        self.ema = EMA(self.net, float(config["ema"]["decay"]))
        diffusion = dict(config["diffusion"])
        self.sde = get_sde(diffusion.pop("schedule"), **diffusion)
        self.optim = dict(config["optim"])
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0

    # --- training -----------------------------------------------------------------------------

    def _global_draws(self, step: int, global_batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """t (B,), noise (B, C, H, W) and flip mask (B,) for the whole global batch at ``step``."""
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, step, _STREAM_TRAIN_NOISE))
        t = self.sde.sample_t(global_batch, TRAIN_T_EPS, device=self.device, generator=g)
        noise = torch.randn((global_batch, *self.image_shape), device=self.device, generator=g)
        flip = torch.rand(global_batch, device=self.device, generator=g) < 0.5
        return t, noise, flip

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = int(batch["step"])
        images = batch["images"]
        local = images.shape[0]
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        torch.manual_seed(step_seed(self.seed, step, _STREAM_DROPOUT) + rank)

        t, noise, flip = (d[rank * local:(rank + 1) * local] for d in self._global_draws(step, local * world))
        x0 = images.float() / 127.5 - 1.0
        if self.random_flip:
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        x_t = self.sde.marginal(x0, t, noise)
        cond = {"y": batch["labels"]} if self.num_classes else {}
        pred = self.net(x_t, t * TIME_INPUT_SCALE, **cond)
        loss = F.mse_loss(pred.float(), noise)

        self.log("train/loss", loss, prog_bar=True, sync_dist=world > 1)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"] if self._trainer else 0.0)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are unscaled (AMP) and all-reduced (DDP) here, so every rank takes the same
        # decision. The norm is taken before clipping: the log shows what the optimizer was given.
        clip = self.optim.get("grad_clip")
        max_norm = float(clip) if clip else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm, foreach=True)
        self.log("train/grad_norm", norm)
        self._guard_nonfinite(bool(torch.isfinite(norm)))  # one device sync per step

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
        checkpoint["nonfinite"] = {"in_row": self.nonfinite_in_row, "total": self.nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("nonfinite", {})
        self.nonfinite_in_row = int(counts.get("in_row", 0))
        self.nonfinite_total = int(counts.get("total", 0))

    def configure_optimizers(self):
        o = self.optim
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=float(o["lr"]), betas=tuple(o["betas"]),
                                      weight_decay=float(o["weight_decay"]), fused=fused or None)
        warmup = int(o.get("warmup_steps", 0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, num: int, sampler: str = "euler_ode", steps: int = 50, seed: int = 0,
                 use_ema: bool = True, labels: Tensor | None = None, batch_size: int | None = None,
                 progress: bool = False) -> Tensor:
        """``num`` samples as uint8 (num, C, H, W); the same ``seed`` gives the same samples.

        Class-conditional models cycle through the classes unless ``labels`` (num,) are given.
        """
        net = self.ema.module if use_ema else self.net
        if self.num_classes and labels is None:
            labels = torch.arange(num, device=self.device) % self.num_classes
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        batch_size = batch_size or num
        with eval_mode(net):
            for lo in range(0, num, batch_size):
                n = min(batch_size, num - lo)
                part = None if labels is None else labels[lo:lo + n].to(self.device)
                eps_fn = NoisePredictor(net, {} if part is None else {"y": part})
                x = sample(eps_fn, self.sde, (n, *self.image_shape), sampler=sampler, steps=steps,
                           generator=g, device=self.device, progress=progress)
                out.append(to_uint8(x).cpu())
        return torch.cat(out)
