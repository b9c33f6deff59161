"""The divergence guard decided on the device: a skipped step leaves weights and optimizer state
bit-identical on every optimizer path, nothing in a step reads the device except on logging
steps, and a run that diverges stops at most ``log_every_n_steps`` late with nothing changed
in between."""

from __future__ import annotations

import traceback

import pytest
import torch
from conftest import compose

from scalelong.cli.train import train
from scalelong.training import guard as guard_module
from scalelong.training.guard import DivergenceGuard
from scalelong.training.module import DiffusionModule
from scalelong.utils.errors import TrainingDiverged

# A U-ViT of 2 blocks of width 32 (the guard does not depend on the network), no grids, no
# checkpoints unless asked.
SMALL = ["experiment=smoke", "logger=csv", "train.batch_size=8", "model=uvit_tiny", "model.embed_dim=32",
         "model.depth=2", "model.num_heads=2"]
PATHS = {
    "fused AdamW (the CUDA default), found_inf": ["optim.fused=true"],
    "foreach AdamW (the CPU default), no gradients": ["optim.fused=false"],
    "fp16 with the loss scaler": ["trainer.precision=16-mixed", "optim.fused=true"],
}


def poison(monkeypatch, steps) -> None:
    """A NaN loss at the given steps (the batch's step numbers)."""
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if int(batch["step"]) in steps else loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)


def record_state(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Weights and every optimizer state tensor (moments, step count) at the start of each step."""
    states: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(self, *args, **kwargs):
        out = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        for i, s in enumerate(self.trainer.optimizers[0].state.values()):
            out.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
        states[self.global_step] = out

    monkeypatch.setattr(DiffusionModule, "on_train_batch_start", snapshot, raising=False)
    return states


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_skipped_step_leaves_weights_and_optimizer_state_bit_identical(tmp_path, monkeypatch, path):
    poison(monkeypatch, {2, 3})
    states = record_state(monkeypatch)
    run = train(compose([*SMALL, *PATHS[path], "train.max_steps=6", "trainer.log_every_n_steps=3"], tmp_path))
    assert run["module"].nonfinite_total == 2 and run["metrics"]["train/nonfinite_skipped"] == 2
    assert run["module"].overflow_total == 0
    opt_keys = [k for k in states[3] if k.startswith("opt.")]
    assert any(k.endswith(".exp_avg_sq") for k in opt_keys) and any(k.endswith(".step") for k in opt_keys)
    assert same(states[3], states[4])  # step 3 skipped: weights, moments and step count as they were
    assert same(states[2], states[3])  # step 2 too
    assert not same(states[4], states[5])  # step 4 trained
    assert not same(states[1], states[2])


def test_the_device_is_read_only_on_logging_steps(tmp_path, monkeypatch):
    """On the CUDA path (fused AdamW), over 8 steps logged every 4: no read of a tensor to the
    host (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``cpu``, ``numpy``) on the other steps,
    by our code, our callbacks or Lightning, but the stability measurements' own (every 4 steps
    here, from step 0) and the loader's (host tensors: the sampler's indices); the guard's
    counters read once per logging step."""
    reads: dict[int, set[str]] = {}
    current = {"step": -1}

    def on_start(self, *args, **kwargs):
        current["step"] = self.global_step

    monkeypatch.setattr(DiffusionModule, "on_train_batch_start", on_start, raising=False)

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if current["step"] >= 0:
                where = [f.filename for f in traceback.extract_stack()[:-1]]
                if not any("torch/utils/data" in f for f in where):
                    who = "stability" if any(f.endswith("training/stability.py") for f in where) else "other"
                    reads.setdefault(current["step"], set()).add(who)
            return original(self, *args, **kwargs)

        return read

    guard_reads = []
    host_values = guard_module.host_values
    monkeypatch.setattr(guard_module, "host_values", lambda t: guard_reads.append(current["step"]) or host_values(t))
    cfg = compose([*SMALL, "optim.fused=true", "train.max_steps=8", "trainer.log_every_n_steps=4",
                   "callbacks.stability.every_n_steps=4"], tmp_path)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    train(cfg)
    current["step"] = -1
    # Steps 3 and 7 end with 4 and 8 steps done: Lightning writes their metrics to the loggers.
    assert reads == {0: {"stability"}, 3: {"other"}, 4: {"stability"}, 7: {"other"}}, reads
    assert guard_reads == [3, 7, 7]  # the last: the checkpoint saved at the end, which stores the counters


def test_a_diverged_run_stops_at_most_log_every_n_steps_late_with_nothing_changed(tmp_path, monkeypatch):
    # NaN at steps 4, 5, 6: the third in a row (step 6) trips the guard; steps 7 and 8 are finite
    # but skipped too; the counters are read at step 9 (10 steps done), where the run stops.
    poison(monkeypatch, {4, 5, 6})
    states = record_state(monkeypatch)
    cfg = compose([*SMALL, "optim.fused=true", "train.max_steps=50", "trainer.log_every_n_steps=5",
                   "train.max_nonfinite_in_row=3", "checkpoint.every_n_steps=4"], tmp_path)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    assert str(err.value).startswith("3 steps in a row had a non-finite loss or gradient (step 6, 3 in all; "
                                     "noticed at step 9, the counters being read every 5 steps")
    assert max(states) == 9 and 9 - 6 < 5
    for step in (5, 6, 7, 8, 9):  # the weights and optimizer state of before the first NaN
        assert same(states[4], states[step]), step
    # Saved after step 7 (finite: the run of NaNs over), between the trip and its check: the trip
    # travels with it, so a run resumed from it stops too.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["nonfinite"] == {"in_row": 0, "total": 3, "overflow": 0, "tripped_at": 6}
    assert all(torch.equal(v, states[4][f"net.{k[4:]}"]) for k, v in ckpt["state_dict"].items() if k.startswith("net."))


def test_guard_counts_on_the_device():
    """fp16 overflows are counted apart and leave the run of non-finite steps as it is; a finite
    step ends it; the trip is remembered, skips every later step, and survives a checkpoint."""
    g = DivergenceGuard(limit=2)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    yes, no = torch.tensor(True), torch.tensor(False)
    steps = [(one, yes, True, 0.0), (nan, yes, True, 1.0),  # finite; overflow (finite loss, scaler)
             (nan, no, True, 1.0), (one, yes, True, 0.0),   # diverged; finite again
             (nan, no, False, 1.0), (nan, yes, False, 1.0)]  # diverged twice (no scaler): tripped at step 5
    for step, (norm, loss_finite, scaler, skip) in enumerate(steps):
        assert float(g.decide(norm, loss_finite, step, scaler)) == skip, step
    assert g.read() == {"in_row": 2, "total": 3, "overflow": 1, "tripped_at": 5}
    assert float(g.decide(one, yes, 6, False)) == 1.0  # finite, but after the trip: skipped
    restored = DivergenceGuard(limit=2)
    restored.load_state_dict(g.state_dict())
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row .* \(step 5, 3 in all; noticed at step 7"):
        restored.check(restored.read(), 7, 2)
    old = DivergenceGuard(limit=2)
    old.load_state_dict({"in_row": 1, "total": 4, "overflow": 2})  # a checkpoint from before tripped_at
    assert old.read() == {"in_row": 1, "total": 4, "overflow": 2, "tripped_at": -1}
