"""Post-hoc EMA (EDM2): track power-function EMAs of the weights while training, save snapshots of
them at intervals, and afterwards combine the snapshots into the EMA of any length.

``PostHocEMA`` is the training side (a callback; ``ema.posthoc`` in the config): on global rank 0 it
keeps one float32 average per tracked ``sigma_rel``, updated after every optimizer step with the
decay of that step (``power_decay(step, gamma)``: keyed by the step, so a resumed run continues them
exactly; their state travels in every checkpoint), and every ``every_n_steps`` (and at the end)
writes them to ``<run>/ema_snapshots/step_XXXXXXX.pt``, atomically, loadable with
``torch.load(weights_only=True)``. It also sets the run's own EMA to a power profile when
``ema.sigma_rel`` or ``ema.gamma`` asks for one.

``read_snapshots`` and ``reconstruct`` are the other side: the coefficients that best match a
target profile (``scalelong.training.power_ema``), applied to the stored snapshots one file at a
time (``scalelong-posthoc-ema``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from scalelong.training.power_ema import (SIGMA_REL_MAX, gamma_of_sigma_rel, power_decay, representable_range,
                                          sigma_rel_of_gamma, solve_coefficients)
from scalelong.utils.errors import ConfigError, DataError
from scalelong.utils.io import write_bytes

SNAPSHOT_DIR = "ema_snapshots"
FORMAT = 1
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP16_MAX = 65504.0


def check_sigma_rel(value: Any, key: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number in (0, {SIGMA_REL_MAX:.3f}], got {value!r}") from None
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ConfigError(f"{key}={value} is outside (0, {SIGMA_REL_MAX:.3f}]: no power-function EMA is longer "
                          "than 0.300 of the run (EDM2 tracks 0.05 and 0.10)")
    return s


def run_ema_gamma(ema: Mapping[str, Any]) -> float | None:
    """The exponent of the run's own EMA from ``ema.sigma_rel`` or ``ema.gamma``; None: constant decay."""
    sigma_rel, gamma = ema.get("sigma_rel"), ema.get("gamma")
    if sigma_rel is not None and gamma is not None:
        raise ConfigError("set ema.sigma_rel or ema.gamma, not both (they name the same profile)")
    if sigma_rel is not None:
        return gamma_of_sigma_rel(check_sigma_rel(sigma_rel, "ema.sigma_rel"))
    if gamma is not None:
        if not float(gamma) > -0.5:
            raise ConfigError(f"ema.gamma must be above -0.5, got {gamma}")
        return float(gamma)
    return None


class PowerAverages:
    """Float32 power-function EMAs of a network's parameters, one per exponent; buffers are copied
    (as ``EMA`` does) when a snapshot is taken, not averaged."""

    def __init__(self, net: nn.Module, gammas: Sequence[float]):
        self.gammas = [float(g) for g in gammas]
        params = {id(p): p for p in net.parameters()}
        state = net.state_dict(keep_vars=True)
        # state_dict keys (those of ema.module.*) of the parameters; tied weights share one average
        self.keys = [k for k, v in state.items() if id(v) in params]
        self.averages = [[state[k].detach().float().clone() for k in self.keys] for _ in self.gammas]
        # The parameters themselves, looked up once: a state_dict per step costs more than the lerps.
        self._net, self._params = net, [state[k] for k in self.keys]

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        if net is not self._net:
            raise ValueError("PowerAverages.update: not the network the averages were made for")
        params = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self._params]
        for gamma, average in zip(self.gammas, self.averages):
            torch._foreach_lerp_(average, params, 1.0 - power_decay(step, gamma))

    def state(self, index: int) -> dict[str, Tensor]:
        return dict(zip(self.keys, self.averages[index]))

    def load(self, stored: Sequence[Mapping[str, Tensor]]) -> None:
        for average, values in zip(self.averages, stored):
            if set(values) != set(self.keys):
                raise ConfigError("the checkpoint's post-hoc EMA averages are of another network; resume with the "
                                  "overrides the run was started with (its config.yaml lists them)")
            for a, k in zip(average, self.keys):
                a.copy_(values[k])


class PostHocEMA(pl.Callback):
    """Tracks power-function EMAs of lengths ``sigma_rels`` and saves them every ``every_n_steps``
    (0: tracks nothing) into ``dirpath`` in ``dtype``; sets the run's EMA to exponent ``ema_gamma``
    (None: leaves its constant decay). Placed before the checkpoint callback: a checkpoint of step
    s holds the averages after step s, as it holds the run's EMA after step s."""

    def __init__(self, dirpath: str | Path, sigma_rels: Sequence[float] = (0.05, 0.10), every_n_steps: int = 0,
                 dtype: str = "float16", ema_gamma: float | None = None):
        self.dirpath = Path(dirpath)
        self.every = int(every_n_steps or 0)
        if self.every < 0:
            raise ConfigError(f"ema.posthoc.every_n_steps must be 0 (off) or positive, got {every_n_steps}")
        self.sigma_rels = [check_sigma_rel(s, "ema.posthoc.sigma_rels") for s in sigma_rels]
        if self.every and not self.sigma_rels:
            raise ConfigError("ema.posthoc.sigma_rels is empty; list the lengths to track, e.g. [0.05,0.10]")
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"ema.posthoc.dtype={dtype!r}; valid: {', '.join(STORAGE_DTYPES)}")
        self.dtype = dtype
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.ema_gamma = ema_gamma
        self.averages: PowerAverages | None = None
        self.updates = 0  # the step of the last update
        self._stored: dict[str, Any] | None = None
        self._last_snapshot = -1

    @classmethod
    def for_run(cls, ema: Mapping[str, Any], run_dir: str | Path) -> list[PostHocEMA]:
        """From the run's ``ema`` node (``posthoc.{sigma_rels, every_n_steps, dtype}``, ``sigma_rel``,
        ``gamma``): the callback, or none when the run neither tracks nor uses a power EMA (its
        checkpoints then stay exactly as without this feature)."""
        posthoc = dict(ema.get("posthoc") or {})
        callback = cls(Path(run_dir) / SNAPSHOT_DIR, posthoc.get("sigma_rels", (0.05, 0.10)),
                       posthoc.get("every_n_steps", 0), posthoc.get("dtype", "float16"), run_ema_gamma(ema))
        return [callback] if callback.active or callback.ema_gamma is not None else []

    @property
    def active(self) -> bool:
        return self.every > 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.ema_gamma is not None:
            pl_module.ema.gamma = self.ema_gamma

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the module is on its device, and a resumed run's weights, callback states and step
        # are loaded (the step only after on_fit_start).
        if not (self.active and trainer.is_global_zero):
            return
        self.averages = PowerAverages(pl_module.net, self.gammas)
        self.updates = 0
        stored, self._stored = self._stored, None
        if stored:
            self._check_same_tracking(stored)
            self.averages.load(stored["averages"])
            self.updates = int(stored["updates"])
            self._last_snapshot = int(stored.get("last_snapshot", -1))
        elif trainer.global_step > 0:
            raise ConfigError(f"this run reached step {trainer.global_step} without post-hoc EMA, whose averages "
                              "start at step 1; start a new run with ema.posthoc, or resume with "
                              "ema.posthoc.every_n_steps=0")
        if self.updates != trainer.global_step:
            raise ConfigError(f"the checkpoint's post-hoc EMA averages are of step {self.updates}, its weights of "
                              f"step {trainer.global_step}; it was not written by this code")

    def _check_same_tracking(self, stored: Mapping[str, Any]) -> None:
        if [round(s, 12) for s in stored["sigma_rels"]] != [round(s, 12) for s in self.sigma_rels]:
            listed = ",".join(f"{s:g}" for s in stored["sigma_rels"])
            raise ConfigError(f"this run tracks ema.posthoc.sigma_rels=[{listed}]; resume it with that list")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.averages is None or step <= self.updates:  # not rank 0, or no optimizer step (accumulation)
            return
        self.averages.update(pl_module.net, step)
        self.updates = step
        if step % self.every == 0:
            self.save_snapshot(pl_module.net, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.averages is not None and self._last_snapshot != self.updates and self.updates > 0:
            self.save_snapshot(pl_module.net, self.updates)

    def save_snapshot(self, net: nn.Module, step: int) -> Path:
        """Every tracked average after update ``step``, with the network's buffers, in ``self.dtype``
        (a tensor whose values fp16 cannot hold stays float32)."""
        dtype = STORAGE_DTYPES[self.dtype]
        averaged = set(self.averages.keys)
        buffers = {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k not in averaged}
        averages = []
        for i in range(len(self.gammas)):
            stored = {}
            for k, v in self.averages.state(i).items():
                keep = dtype == torch.float16 and v.numel() and float(v.abs().max()) > FP16_MAX
                stored[k] = v.detach().cpu().clone() if keep else v.detach().to("cpu", dtype)
            averages.append(stored)
        snapshot = {"format": FORMAT, "step": int(step), "sigma_rels": list(self.sigma_rels),
                    "gammas": list(self.gammas), "dtype": self.dtype, "averages": averages, "buffers": buffers}
        path = self.dirpath / f"step_{step:07d}.pt"
        buffer = io.BytesIO()
        torch.save(snapshot, buffer)
        write_bytes(path, buffer.getvalue())
        self._last_snapshot = step
        return path

    def state_dict(self) -> dict[str, Any]:
        if self.averages is None:
            return {}
        return {"format": FORMAT, "sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas),
                "updates": self.updates, "last_snapshot": self._last_snapshot,
                "averages": [self.averages.state(i) for i in range(len(self.gammas))]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stored = dict(state_dict) if state_dict else None


# --- reconstruction ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    path: Path
    step: int
    sigma_rels: list[float]
    gammas: list[float]


def read_snapshots(run_dir: str | Path, up_to_step: int | None = None) -> list[Snapshot]:
    """The run's snapshots (their headers; memory-mapped, so reading them costs no copy of the
    weights), oldest first, those after ``up_to_step`` left out."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    paths = sorted(folder.glob("step_*.pt"))
    if not paths:
        raise DataError(f"{folder} holds no snapshots; train with post-hoc EMA on, e.g. "
                        "ema.posthoc.every_n_steps=1000 (docs: README, 'Choosing the EMA after training')")
    snapshots = []
    for path in paths:
        s = _load(path)
        if s.get("format") != FORMAT:
            raise DataError(f"{path} is not a post-hoc EMA snapshot of format {FORMAT}")
        if up_to_step is None or s["step"] <= up_to_step:
            snapshots.append(Snapshot(path, int(s["step"]), list(s["sigma_rels"]), list(s["gammas"])))
    if not snapshots:
        raise DataError(f"no snapshot in {folder} is of step {up_to_step} or earlier (the first is of step "
                        f"{int(_load(paths[0])['step'])})")
    return snapshots


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise DataError(f"cannot read the snapshot {path} ({type(err).__name__}: {err}); "
                        "it is damaged, delete it and reconstruct from the others") from None


@dataclass
class Solution:
    """How the EMA of ``sigma_rel`` at ``step`` is made from the snapshots."""
    sigma_rel: float
    gamma: float
    step: int
    coefficients: list[tuple[int, int, float]]  # (snapshot index, average index, coefficient)
    fit_error: float


def solve(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None) -> Solution:
    """The least-squares coefficients of the stored averages for the EMA of ``sigma_rel`` at
    ``step`` (default: the last snapshot's)."""
    step = int(step if step is not None else snapshots[-1].step)
    gamma = gamma_of_sigma_rel(sigma_rel)
    columns = [(i, j, s.step, g) for i, s in enumerate(snapshots) for j, g in enumerate(s.gammas)]
    x, error = solve_coefficients([c[2] for c in columns], [c[3] for c in columns], step, gamma)
    return Solution(float(sigma_rel), gamma, step, [(c[0], c[1], float(v)) for c, v in zip(columns, x)], error)


def representable(snapshots: Sequence[Snapshot], step: int, max_error: float) -> tuple[float, float] | None:
    columns = [(s.step, g) for s in snapshots for g in s.gammas]
    return representable_range([c[0] for c in columns], [c[1] for c in columns], step, max_error)


def check_representable(snapshots: Sequence[Snapshot], solutions: Sequence[Solution], max_error: float) -> None:
    """One line naming the targets whose profile the snapshots cannot match within ``max_error``,
    and the range of sigma_rel they can."""
    bad = [s for s in solutions if not s.fit_error <= max_error]
    if not bad:
        return
    step = bad[0].step
    span = representable(snapshots, step, max_error)
    can = (f"they represent sigma_rel {span[0]:.3f} to {span[1]:.3f}" if span else "they represent none")
    which = ", ".join(f"{s.sigma_rel:g} (fit error {s.fit_error:.1%})" for s in bad)
    raise ConfigError(f"sigma_rel {which} cannot be reconstructed from the {len(snapshots)} snapshots up to step "
                      f"{step} within a profile fit error of {max_error:.0%}: {can} (denser snapshots, "
                      "ema.posthoc.every_n_steps, reach shorter ones; --max-fit-error changes the limit)")


def reconstruct(snapshots: Sequence[Snapshot], solution: Solution) -> dict[str, Tensor]:
    """The network's state dict (float32 parameters) of the EMA ``solution`` describes: the
    weighted sum of the stored averages, read one snapshot at a time; buffers from the last one."""
    by_snapshot: dict[int, list[tuple[int, float]]] = {}
    for i, j, c in solution.coefficients:
        by_snapshot.setdefault(i, []).append((j, c))
    total: dict[str, Tensor] = {}
    for i, terms in sorted(by_snapshot.items()):
        stored = _load(snapshots[i].path)
        for j, c in terms:
            for k, v in stored["averages"][j].items():
                if k in total:
                    total[k].add_(v.to(torch.float64), alpha=c)
                else:
                    total[k] = v.to(torch.float64) * c
    last = stored  # the loop's last pass loaded the latest snapshot used
    state = {k: v.to(torch.float32) for k, v in total.items()}
    state.update({k: v.clone() for k, v in last["buffers"].items()})
    return state


def describe(solution: Solution) -> str:
    return (f"sigma_rel {solution.sigma_rel:g} (gamma {solution.gamma:.3f}) at step {solution.step}: profile fit "
            f"error {solution.fit_error:.2%}, coefficients sum to {sum(c for *_, c in solution.coefficients):.4f}")


def sigma_rel_label(sigma_rel: float) -> str:
    return f"{sigma_rel:.3f}".rstrip("0").rstrip(".") if not math.isnan(sigma_rel) else "nan"


__all__ = ["PostHocEMA", "PowerAverages", "Snapshot", "Solution", "read_snapshots", "solve", "reconstruct",
           "check_representable", "representable", "describe", "run_ema_gamma", "sigma_rel_of_gamma"]
