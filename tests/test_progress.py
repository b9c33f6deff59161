"""The progress lines a user watches: the pace, the time left, and after ``estimate_at`` steps how
long the whole run (training, then the sampling and evaluation at its end) will take."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scalelong.training import callbacks as cb


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def test_the_progress_lines_give_the_pace_the_time_left_and_one_estimate_of_the_whole_run(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(cb.time, "perf_counter", clock)
    asked = []

    def after_training(seconds_per_step):
        asked.append(seconds_per_step)
        return 30.0, "100 samples and their KID/FID"

    logger = Recorder()
    trainer = SimpleNamespace(global_step=0, max_steps=10, world_size=1, loggers=[logger],
                              callback_metrics={"train/loss": torch.tensor(0.5)})
    printer = cb.ProgressPrinter(every_n_steps=2, estimate_at=4, after_training=after_training)
    printer.on_train_start(trainer, None)
    batch = {"images": torch.zeros(8, 1, 4, 4)}
    for step in range(1, 11):
        clock.now += 5.0 if step == 1 else 2.0  # the first step pays for warm-up
        trainer.global_step = step
        printer.on_train_batch_end(trainer, None, None, batch, step - 1)
    lines = capsys.readouterr().out.splitlines()
    # After 4 steps: the steps after the first give 2 s/step; 6 steps left = 12 s, then 30 s.
    assert asked == [pytest.approx(2.0)]
    estimate = [line for line in lines if line.startswith("expected:")]
    assert estimate == ["expected: about 0.7 min from now (12 s of training, then about 30 s for 100 samples and "
                        "their KID/FID); machines of this kind differ 2-4x in speed from day to day"]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 5 and steps[-1].startswith("step 10/10  loss 0.5000")
    assert "left 0s" in steps[-1] and "elapsed 23s" in steps[-1]
    # Each line after the first logs the pace since the one before: 2 s per step here.
    assert [s for s, _ in logger.logged] == [4, 6, 8, 10]
    assert all(m["time/seconds_per_step"] == pytest.approx(2.0) for _, m in logger.logged)
