"""What ``StabilityMonitor`` costs: the same short training with and without it, in one process.

    python scripts/benchmark_stability.py --steps 501 [hydra overrides ...]

With no overrides this is the quickstart (digits, tiny UNet, batch 64) at the intervals of
``conf/callbacks/stability.yaml``; e.g. ``model=uvit callbacks.stability.every_n_steps=10`` for
others. It prints three figures:

- the mean step time of both runs and their ratio (on a shared, busy CPU this ratio moves by
  10% and more from run to run, far more than the monitor costs);
- the monitor's own time (every callback hook and forward hook timed) as a share of the loop;
- a paired wall-clock estimate: each monitored step against the median of its unmonitored
  neighbours in the same run, which includes costs the self-timing misses and follows slow
  changes of the machine's load. Step 0 (warm-up) is left out, so 501 steps include the probe
  of step 500.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from scalelong.training.stability import StabilityMonitor

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class StepTimer(pl.Callback):
    """Wall time of the training loop and of each step (one batch start to the next)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last = time.perf_counter()

    @property
    def steps(self) -> int:
        return len(self.starts)

    @property
    def durations(self) -> list[float]:
        """Seconds of step s = start of s + 1 minus start of s, so every callback's work is in."""
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.last])]

    @property
    def seconds_per_step(self) -> float:
        return (self.last - self.starts[0]) / max(self.steps, 1)


def paired_overhead(durations: list[float], monitored: set[int], radius: int = 5) -> float:
    """Extra wall time of the monitored steps over the median of their unmonitored neighbours,
    summed, as a fraction of the whole loop: steady under slow drifts of a shared machine's load."""
    extra = 0.0
    for s in monitored:
        near = [durations[k] for k in range(max(1, s - radius), min(len(durations), s + radius + 1))
                if k not in monitored]
        if s > 0 and near:  # step 0 also pays the warm-up, which is no cost of the monitor
            extra += durations[s] - sorted(near)[len(near) // 2]
    return extra / sum(durations[1:])


class TimedStabilityMonitor(StabilityMonitor):
    """``StabilityMonitor`` that adds up the time spent in its own code, per training step."""

    _HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds_by_step: dict[int, float] = {}
        self.setup_seconds = 0.0
        for name in self._HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _add(self, seconds: float) -> None:
        self.seconds_by_step[self._step] = self.seconds_by_step.get(self._step, 0.0) + seconds

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(time.perf_counter() - t0)
        return wrapper

    def on_train_start(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        super().on_train_start(trainer, pl_module)
        self.setup_seconds = time.perf_counter() - t0
        if self.recorder is not None:  # the forward hooks look these up at call time
            self.recorder._record_block = self._timed(self.recorder._record_block)
            self.recorder._record_skip = self._timed(self.recorder._record_skip)


def _run(config: dict[str, Any], run_dir: Path, monitor: dict[str, Any] | None) -> tuple[StepTimer, Any]:
    from scalelong.cli.train import train

    config = {**config, "run_dir": str(run_dir), "callbacks": {"timer": {"_target_": f"{__name__}.StepTimer"}}}
    if monitor is not None:
        config["callbacks"]["stability"] = {**monitor, "_target_": f"{__name__}.TimedStabilityMonitor"}
    result = train(config)
    callbacks = result["trainer"].callbacks
    timer = next(c for c in callbacks if isinstance(c, StepTimer))
    timed = next((c for c in callbacks if isinstance(c, TimedStabilityMonitor)), None)
    return timer, timed


def measure(steps: int, overrides: list[str]) -> dict[str, float]:
    """Train ``steps`` steps without, then with, the monitor; return the timings (seconds)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    quiet = ["logger=csv", "callbacks=stability", f"train.max_steps={steps}", "sample.every_n_steps=0",
             "sample.num=1", "sample.steps=1", "checkpoint.every_n_steps=0", "checkpoint.keep_every_n_steps=null",
             "quick_eval=null",
             "++trainer.enable_model_summary=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*quiet, *overrides, "run_dir=."])
    config = OmegaConf.to_container(cfg, resolve=True)
    monitor = dict(config["callbacks"]["stability"])
    with tempfile.TemporaryDirectory() as tmp:
        plain, _ = _run(config, Path(tmp) / "without", None)
        timer, timed = _run(config, Path(tmp) / "with", monitor)
    per_step = timed.seconds_by_step
    every, rob = timed.every, timed.robustness_every
    measured = [s for s in per_step if every and s % every == 0]
    probed = [s for s in per_step if rob and s % rob == 0]
    loop = timer.seconds_per_step * timer.steps
    paired = paired_overhead(timer.durations, set(measured) | set(probed))
    return {
        "paired_fraction": paired,
        "steps": steps, "every_n_steps": every, "robustness_every_n_steps": rob,
        "step_without": plain.seconds_per_step, "step_with": timer.seconds_per_step,
        "ratio": timer.seconds_per_step / plain.seconds_per_step,
        "own_seconds": sum(per_step.values()), "own_fraction": sum(per_step.values()) / loop,
        "setup_seconds": timed.setup_seconds,
        "measurement_steps": len(measured), "robustness_probes": len(probed),
        "other_step_seconds": sum(v for s, v in per_step.items() if s not in measured and s not in probed)
        / max(1, len(per_step) - len(set(measured) | set(probed))),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=501, help="training steps per run (default 501)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=uvit")
    args = parser.parse_args(argv)
    r = measure(args.steps, args.overrides)
    print(f"\n{r['steps']} steps, features/grads every {r['every_n_steps']}, "
          f"robustness every {r['robustness_every_n_steps']}; overrides: {' '.join(args.overrides) or '(none)'}")
    print(f"step time without monitor: {r['step_without'] * 1e3:8.2f} ms")
    print(f"step time with monitor:    {r['step_with'] * 1e3:8.2f} ms   ratio {r['ratio']:.4f} "
          f"({100 * (r['ratio'] - 1):+.2f}%, wall clock)")
    print(f"monitor's own time:        {r['own_seconds']:.3f} s = {100 * r['own_fraction']:.2f}% of the loop "
          f"({r['measurement_steps']} measurement steps, {r['robustness_probes']} probes; "
          f"{r['other_step_seconds'] * 1e6:.0f} us on an ordinary step); set-up {r['setup_seconds']:.3f} s")
    print(f"paired wall-clock estimate: {100 * r['paired_fraction']:+.2f}% of the loop (monitored steps "
          "against the median of their unmonitored neighbours, step 0 left out)")


if __name__ == "__main__":
    main()
