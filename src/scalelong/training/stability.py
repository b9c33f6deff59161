"""The training-stability measurements of the ScaleLong paper (method.md section 6) as one callback:
feature, skip and gradient norms, the loss's rolling spread, robustness to a perturbed input and
the theory's sums of kappa^2. Keys and timing: ``docs/design.md``, "Stability measurements"."""

from __future__ import annotations

import json
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from scalelong.data import BatchRequest, batch_len
from scalelong.utils.io import write_text
from scalelong.scaling import ConstantCoefficients, SkipScaling
from scalelong.model import eval_mode

__all__ = [
    "StabilityMonitor",
    "ActivationNormRecorder",
    "named_blocks",
    "per_sample_norm",
    "perturbation_gain",
    "scaled_direction",
    "sum_kappa2_tail",
    "theory_summary",
    "block_grad_norms",
    "eager",
]


# --- pure measurements ---------------------------------------------------------------------


def _wide(x: Tensor) -> Tensor:
    # fp16/bf16 sums of squares lose digits; float32 and float64 stay as they are.
    return x.float() if x.element_size() < 4 else x


def per_sample_norm(x: Tensor) -> Tensor:
    """Frobenius norm of each sample: (B, ...) -> (B,), in float32 or wider."""
    return torch.linalg.vector_norm(_wide(x.detach()).flatten(1), dim=1)


def scaled_direction(x: Tensor, relative_size: float, generator: torch.Generator | None = None) -> Tensor:
    """A Gaussian direction d of x's shape with ||d_b|| = relative_size * ||x_b|| per sample b."""
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=_wide(x).dtype)
    scale = relative_size * per_sample_norm(x) / per_sample_norm(d)
    return (d * scale.view(-1, *([1] * (x.dim() - 1)))).to(x.dtype)


def perturbation_gain(f: Callable[[Tensor], Tensor], x: Tensor, d: Tensor) -> Tensor:
    """Per-sample output change per unit input change: ||f(x + d) - f(x)|| / ||d||, (B,).

    ``f`` maps (B, ...) to (B, ...) sample by sample; both points go through one call of ``f``
    on a batch of 2B, so a network runs once. For a linear f(x) = A x this is ||A d|| / ||d||,
    at most the spectral norm of A.
    """
    out = f(torch.cat([x, x + d]))
    base, moved = _wide(out).chunk(2)
    return per_sample_norm(moved - base) / per_sample_norm(d)


def sum_kappa2_tail(coefficients: Sequence[float]) -> list[float]:
    """Per LSC i (outermost first), sum over j >= i of kappa_j^2: N - i + 1 for all-ones."""
    out, acc = [], 0.0
    for k in reversed(list(coefficients)):
        acc += float(k) ** 2
        out.append(acc)
    return out[::-1]


def theory_summary(strategy: SkipScaling) -> dict[str, Any] | None:
    """The theory's numbers for a constant-coefficient strategy, None for learnable ones."""
    if not isinstance(strategy, ConstantCoefficients):
        return None  # learnable coefficients depend on the data; the theory's sum is not fixed
    kappas = [c.mean for c in strategy.coefficients()]
    summary = {"strategy": strategy.name, "num_skips": len(kappas), "coefficients": kappas,
               "sum_kappa2": sum_kappa2_tail(kappas)}
    if hasattr(strategy, "kappa"):
        summary["kappa"] = float(strategy.kappa)
    return summary


def named_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks whose outputs and gradients are measured, in execution order: the backbone's
    ``stability_blocks()`` (``in_00``.., ``mid``, ``out_00``..), or none for one without it."""
    return list(net.stability_blocks()) if hasattr(net, "stability_blocks") else []


def block_grad_norms(blocks: Sequence[tuple[str, Sequence[nn.Parameter]]]) -> dict[str, Tensor]:
    """L2 norm of the current gradients of each named parameter group (0 when none has a grad)."""
    out = {}
    for name, params in blocks:
        grads = [p.grad for p in params if p.grad is not None]
        out[name] = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return out


@contextmanager
def eager(net: nn.Module):
    """Run a ``net.compile()``-d module eagerly inside the block (a no-op for an eager one).

    Compiled graphs ignore forward hooks registered after compilation, so measured forwards
    must bypass them; the compiled graph is kept and serves every other step.
    """
    # model.compile_scope=blocks compiles the blocks inside the network, not the network itself
    saved = [(m, m._compiled_call_impl) for m in net.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield net
    finally:
        for m, compiled in saved:
            m._compiled_call_impl = compiled


class ActivationNormRecorder:
    """Forward hooks that record per-sample norm statistics of block outputs and LSC skips.

    ``attach()`` registers the hooks, ``detach()`` removes them: between the two every forward
    pass of the network overwrites ``stats``, a dict of 0-dim float32 tensors keyed by log name
    (``features/in_00``, ``features/in_00_std``, ``skips/lsc1_before``, ``skips/lsc1_after``).
    Nothing is hooked while detached, so ordinary training steps pay nothing. Given the whole
    network as ``root``, a compiled one runs eagerly while attached (see ``eager``).
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], skip_scaling: nn.Module | None = None,
                 root: nn.Module | None = None):
        self.blocks = list(blocks)
        self.skip_scaling = skip_scaling
        self.root = root
        self.stats: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self._eager: Any = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self.attached:
            return
        self.stats = {}
        if self.root is not None:
            self._eager = eager(self.root)
            self._eager.__enter__()
        for name, module in self.blocks:
            self._handles.append(module.register_forward_hook(self._block_hook(name)))
        if self.skip_scaling is not None:
            self._handles.append(self.skip_scaling.register_forward_hook(self._record_skip))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._eager is not None:
            self._eager.__exit__(None, None, None)
            self._eager = None

    def _block_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record_block(name, output)
        return hook

    def _record_block(self, name: str, output: Tensor) -> None:
        with torch.no_grad():
            # correction=0: a population std, defined for a batch of one as well
            std, mean = torch.std_mean(per_sample_norm(output), correction=0)
        self.stats[f"features/{name}"] = mean
        self.stats[f"features/{name}_std"] = std

    def _record_skip(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        skip, index = args[0], int(args[1])
        with torch.no_grad():
            self.stats[f"skips/lsc{index}_before"] = per_sample_norm(skip).mean()
            self.stats[f"skips/lsc{index}_after"] = per_sample_norm(output).mean()


# --- the callback ----------------------------------------------------------------------------


class StabilityMonitor(pl.Callback):
    """Logs feature, skip and gradient norms, the loss's rolling spread, robustness and theory.

    Args:
        every_n_steps: measure features, skips, gradients and the loss spread on steps that are
            multiples of this (0: never).
        robustness_every_n_steps: probe the output's sensitivity on multiples of this (0: never).
        robustness_times: diffusion times t in (0, 1] at which to probe.
        robustness_relative_size: ||d|| as a fraction of ||x_t||, per sample.
        probe_size: images in the fixed probe batch (drawn once from the training data).
        probe_seed: seed of the probe batch, its noise and its directions d.
        loss_window: training steps in the rolling loss statistics.
        theory_filename: JSON written into the run folder at train start (null: none).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        robustness_every_n_steps: int = 500,
        robustness_times: Sequence[float] = (0.1, 0.5, 0.9),
        robustness_relative_size: float = 1e-3,
        probe_size: int = 16,
        probe_seed: int = 0,
        loss_window: int = 100,
        theory_filename: str | None = "stability_theory.json",
    ):
        self.every = max(0, int(every_n_steps))
        self.robustness_every = max(0, int(robustness_every_n_steps))
        self.times = tuple(float(t) for t in robustness_times)
        if any(not 0.0 < t <= 1.0 for t in self.times):
            raise ValueError(f"robustness_times must lie in (0, 1], got {list(self.times)}")
        self.relative_size = float(robustness_relative_size)
        self.probe_size = int(probe_size)
        self.probe_seed = int(probe_seed)
        self.loss_window = max(2, int(loss_window))
        self.theory_filename = theory_filename
        self.recorder: ActivationNormRecorder | None = None
        self._block_params: list[tuple[str, list[nn.Parameter]]] = []
        self._losses: deque[Tensor] = deque(maxlen=self.loss_window)
        self._probe: dict[str, Any] | None = None
        self._step = -1
        self._measuring = False
        self._pending: dict[str, Tensor] = {}

    # --- set-up -----------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        net = pl_module.net
        blocks = named_blocks(net)
        if not blocks:
            warnings.warn(f"StabilityMonitor: no known blocks in {type(net).__name__}; "
                          "only gradients, loss and robustness are measured")
        self.recorder = ActivationNormRecorder(blocks, getattr(net, "skip_scaling", None), root=net)
        self._block_params = [(name, list(m.parameters())) for name, m in blocks]
        self._block_params.append(("total", list(net.parameters())))
        self._losses.clear()
        if self.robustness_every:
            self._probe = self._make_probe(trainer, pl_module)
        self._log_theory(trainer, pl_module)

    def _make_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """x_t (n, C, H, W), d and t (n,) per probe time, from a fixed seeded draw of the training set."""
        data = getattr(getattr(trainer, "datamodule", None), "data", None)
        if data is None or not hasattr(data, "__getitems__"):
            warnings.warn("StabilityMonitor: the data module exposes no step-keyed `data`; robustness is off")
            return None
        g = torch.Generator().manual_seed(self.probe_seed)
        idx = torch.randperm(len(data), generator=g)[:self.probe_size]
        x0, cond = self._probe_inputs(data.__getitems__(BatchRequest(0, idx.tolist())), pl_module, g)
        points = {}
        for t in self.times:
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            tt = torch.full((len(x0),), t, device=x0.device)
            x_t = pl_module.sde.marginal(x0, tt, noise)
            points[t] = (x_t, scaled_direction(x_t.cpu(), self.relative_size, g).to(x0.device), tt)
        return {"points": points, "cond": cond}

    @staticmethod
    def _probe_inputs(batch: dict[str, Tensor], pl_module: pl.LightningModule,
                      g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Clean model-space inputs x0 (n, C, H, W) and the network's conditioning, as in training
        but with no flip and no condition dropout (pixels, latents, labels or text alike)."""
        batch = {k: v.to(pl_module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        n, space = batch_len(batch), pl_module.space
        latent_noise = torch.randn((n, *space.image_shape), generator=g).to(pl_module.device)
        # no flip, no condition dropout
        return space.clean_input(batch, None, latent_noise), space.condition(batch, None)

    def _log_theory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = getattr(pl_module.net, "skip_scaling", None)
        summary = theory_summary(strategy) if isinstance(strategy, SkipScaling) else None
        if summary is None:
            return
        metrics = {f"theory/sum_kappa2_lsc{i}": v for i, v in enumerate(summary["sum_kappa2"], start=1)}
        self._log(trainer, metrics, trainer.global_step)
        if self.theory_filename:
            write_text(Path(trainer.default_root_dir) / self.theory_filename, json.dumps(summary, indent=2) + "\n")

    # --- per step ---------------------------------------------------------------------------

    def _due(self, every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        # The step of this batch: Lightning logs its train/loss under the same number.
        self._step = step = trainer.global_step
        self._pending = {}
        if self._due(self.robustness_every, step) and self._probe is not None:
            # Before the training forward: a learnable strategy's logged gate statistics come
            # from the training batch, which runs after this probe.
            self._pending.update(self.robustness(pl_module.net, pl_module.sde.time_input_scale))
        self._measuring = self._due(self.every, step) and self.recorder is not None
        if self._measuring:
            self.recorder.attach()  # after the probe: only the training forward is recorded

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if self.recorder is not None and self.recorder.attached:
            self.recorder.detach()  # the training forward is done; nothing else gets measured

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._measuring:
            for name, norm in block_grad_norms(self._block_params).items():
                self._pending[f"grads/{name}"] = norm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().float())  # stays on the device: no sync per step
        if self._measuring:
            self.recorder.detach()  # in case no backward ran
            self._pending.update(self.recorder.stats)
            if len(self._losses) == self.loss_window:
                window = torch.stack(list(self._losses))
                # Non-finite losses belong to skipped steps (train/nonfinite_skipped counts them).
                std, mean = torch.std_mean(window[torch.isfinite(window)])
                self._pending["loss/rolling_mean"], self._pending["loss/rolling_std"] = mean, std
        if self._pending:
            self._log(trainer, self._pending, self._step)
        self._pending, self._measuring = {}, False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.detach()

    # --- robustness -------------------------------------------------------------------------

    @torch.no_grad()
    def robustness(self, net: nn.Module, time_input_scale: float = 999.0) -> dict[str, Tensor]:
        """``robustness/t{t}``: mean over the probe batch of ||f(x_t + d) - f(x_t)|| / ||d||."""
        out = {}
        cond = self._probe["cond"]
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        dtype = next(net.parameters()).dtype
        device_type = next(net.parameters()).device.type
        # Full precision: a 1e-3 perturbation would drown in bf16 rounding.
        with eval_mode(net), eager(net), torch.autocast(device_type, enabled=False):
            for t, (x_t, d, tt) in self._probe["points"].items():
                times = torch.cat([tt, tt]) * time_input_scale
                gain = perturbation_gain(lambda x: net(x.to(dtype), times, **cond2), x_t, d)
                out[f"robustness/t{t:g}"] = gain.mean()
        return out

    # --- output -----------------------------------------------------------------------------

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
        # One host transfer for all values (one sync on a GPU), then plain floats for the loggers.
        keys = list(metrics)
        device = next((v.device for v in metrics.values() if isinstance(v, Tensor)), torch.device("cpu"))
        values = torch.stack([torch.as_tensor(metrics[k]).detach().to(device, torch.float32) for k in keys])
        scalars = dict(zip(keys, values.tolist()))
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
