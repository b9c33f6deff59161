"""Never lose a run: kill and resume, pre-emption signals, the divergence guard, atomic writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from conftest import ROOT, compose
from warm_python import WarmProcess, run_warm

from scalelong.utils.errors import OutputError, TrainingDiverged
from scalelong.cli.train import train
from scalelong.training.module import DiffusionModule

# The quickstart's UNet at a third of its width (half the CPU time of a step; nothing here depends
# on the width).
# A constant rate after the warm-up: the killed runs are started with a far larger max_steps than
# the run they are compared with, and a decayed rate (the digits recipe's cosine) depends on it.
LONG = ["experiment=smoke", "logger=csv", "train.batch_size=16", "trainer.log_every_n_steps=1", "model.base_channels=8",
        "train.lr_decay=null"]


def start(run_dir: Path, *overrides: str) -> WarmProcess:
    """``python train.py`` as a process of its own (forked warm: see warm_python). The same
    environment as this process: the same thread count, hence the same float summation order,
    which the bit-for-bit comparison after a resume relies on."""
    return WarmProcess([ROOT / "train.py", *LONG, *overrides, f"hydra.run.dir={run_dir}"])


def wait_for_step(proc: WarmProcess, step: int, timeout: float = 120) -> None:
    """Read the progress lines until ``step`` has been printed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"no step {step} within {timeout}s")


def final_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=False)
    out = dict(state["state_dict"])
    for pid, s in state["optimizer_states"][0]["state"].items():
        for k, v in s.items():
            out[f"opt.{pid}.{k}"] = torch.as_tensor(v)
    out["global_step"] = torch.tensor(state["global_step"])
    return out


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    common = ["train.max_steps=14", "checkpoint.every_n_steps=4"]
    full = train(compose([*LONG, *common], tmp_path / "full"))

    run = tmp_path / "killed"
    proc = start(run, *common, "train.max_steps=10000")  # would run long: we kill it
    wait_for_step(proc, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert saved in (8, 9)  # the last periodic save before the kill (9 if it was saving then)
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no half-written file left

    train(compose([*LONG, *common, f"resume={run}"], run))
    a, b = final_state(full["checkpoint"]), final_state(run / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:  # bit for bit: every random draw is keyed by (seed, step)
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_cleanly(tmp_path, sig):
    run = tmp_path / "run"
    proc = start(run, "train.max_steps=10000", "checkpoint.every_n_steps=1000")
    wait_for_step(proc, 3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by a signal; checkpoint saved" in err and "Traceback" not in err
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert step >= 3
    # The same command (same folder) continues from there.
    resumed = train(compose([*LONG, f"train.max_steps={step + 2}"], run))
    assert resumed["trainer"].global_step == step + 2


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """`python train.py seed=1 & python train.py seed=2`: the default folder's name holds the
    second a run started, the data set, model and strategy, so the two would share it and
    overwrite each other's checkpoints and records. Each claims its folder before Hydra writes to
    it: the second gets <name>_2. The name is pinned here through the resolver the default uses,
    so that the two processes, started together (two interpreters of their own, as typed), surely
    want the same one."""
    pinned = "hydra.run.dir=${run_folder:null,runs/same}"
    procs = [subprocess.Popen([sys.executable, ROOT / "train.py", *LONG, "train.max_steps=2", f"seed={seed}", pinned],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["same", "same_2"]
    seeds = set()
    for name in folders:
        run = tmp_path / "runs" / name
        seeds.add(OmegaConf.load(run / "config.yaml")["seed"])
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
        assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]  # one run's log, not two
    assert seeds == {1, 2}


def test_a_run_resolves_its_claimed_folder_the_same_every_time(tmp_path, monkeypatch):
    from scalelong import config

    monkeypatch.setattr(config, "_CLAIMED", {})
    first = config._run_folder(None, str(tmp_path / "runs" / "x"))
    assert config._run_folder(None, str(tmp_path / "runs" / "x")) == first == str(tmp_path / "runs" / "x")
    monkeypatch.setattr(config, "_CLAIMED", {})  # another process, wanting the same name
    assert config._run_folder(None, str(tmp_path / "runs" / "x")) == str(tmp_path / "runs" / "x_2")
    assert config._run_folder(str(tmp_path / "old"), str(tmp_path / "runs" / "y")) == str(tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x", "x_2"]  # resuming claims nothing


def test_checkpoints_land_at_their_steps_with_no_collective(tmp_path, monkeypatch):
    """A one-process run (trainer=cpu) saves every checkpoint.every_n_steps, every
    keep_every_n_steps and at the end, and asks no other process about a stop: neither Lightning's
    reduce_boolean_decision (one call per step before) nor any torch.distributed call."""
    import pytorch_lightning as pl
    import torch.distributed as dist
    from pytorch_lightning.strategies import Strategy

    saves, collectives = [], []
    real_save = pl.Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *args, **kwargs):
        saves.append((self.global_step, Path(filepath).name))
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(Strategy, "reduce_boolean_decision", lambda self, *a, **k: collectives.append("reduce"))
    for name in ("all_reduce", "broadcast", "barrier", "all_gather"):
        monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: collectives.append(_name))
    train(compose([*LONG, "trainer=cpu", "train.max_steps=7", "checkpoint.every_n_steps=3",
                   "checkpoint.keep_every_n_steps=2"], tmp_path))
    assert saves == [(2, "step_0000002.ckpt"), (3, "last.ckpt"), (4, "step_0000004.ckpt"), (6, "step_0000006.ckpt"),
                     (6, "last.ckpt"), (7, "last.ckpt")]
    assert collectives == []


def two_rank_trainer():
    """What PeriodicCheckpoint reads of a trainer of rank 0 in a world of 2 (the other rank lives in
    the test's all-reduce), and the list of the (step, file) it saves."""
    import types

    saves = []
    trainer = types.SimpleNamespace(
        world_size=2, global_step=0, strategy=types.SimpleNamespace(root_device=torch.device("cpu")),
        fit_loop=types.SimpleNamespace(epoch_loop=types.SimpleNamespace()),
        save_checkpoint=lambda path, **kw: saves.append((trainer.global_step, Path(path).name)))
    return trainer, saves


def test_several_processes_agree_on_a_stop_about_every_stop_check_seconds(monkeypatch):
    """PeriodicCheckpoint with 2 ranks (the other one simulated inside the all-reduce) and steps
    of 0.1 s: the ranks agree after the first step, then every 1.0 s / 0.1 s = 10 steps; a signal
    that reaches only the other rank at step 13 stops both after step 21, with last.ckpt saved."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from scalelong.training import callbacks

    clock = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock["now"])
    other_requests = {"flag": False}
    agreed_at = []

    def all_reduce(votes, *args, **kwargs):  # this rank's votes plus the other's (same step time)
        agreed_at.append(trainer.global_step)
        votes += torch.tensor([int(other_requests["flag"]), int(votes[1]), 0])

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    trainer, saves = two_rank_trainer()
    checkpoint = callbacks.PeriodicCheckpoint("ckpts", every_n_steps=0, stop_check_seconds=1.0)
    checkpoint.on_train_start(trainer, None)
    try:
        with pytest.raises(SIGTERMException):
            for step in range(1, 40):
                clock["now"] += 0.1
                trainer.global_step = step
                other_requests["flag"] = step >= 13
                checkpoint.on_train_batch_end(trainer, None, None, None, step)
    finally:
        checkpoint.on_exception(trainer, None, None)
    assert agreed_at == [1, 11, 21]
    assert trainer.global_step == 21 and saves == [(21, "last.ckpt")]


def signal_self_at_step(monkeypatch, step: int, sig: int) -> None:
    """The in-process run sends itself ``sig`` as step ``step`` starts (its handler runs at once)."""
    def at_step(self, batch, batch_idx):
        if self.global_step == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(DiffusionModule, "on_train_batch_start", at_step, raising=False)


class RequeuedTask:
    """A job callable as Hydra's submitit launcher submits it: checkpointable by resubmission."""

    def __call__(self):
        return None

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


@pytest.fixture
def submitit_requeue(tmp_path):
    """submitit's own handler of its requeue signal (SIGUSR2), installed as a submitit job does at
    its start, for a job of rank 0 with a 60-minute limit and 3 requeues left. ``probe.requeued``
    lists, for each requeue, what ``probe.at_requeue()`` saw at that moment (by default the step of
    ``<tmp_path>/run``'s last.ckpt, None without one); the handler then exits, as in a job
    (SystemExit -1)."""
    import types

    from submitit.core.job_environment import SignalHandler
    from submitit.helpers import DelayedSubmission

    def saved_step():
        last = tmp_path / "run" / "checkpoints" / "last.ckpt"
        return torch.load(last, weights_only=False)["global_step"] if last.exists() else None

    probe = types.SimpleNamespace(requeued=[], at_requeue=saved_step)
    env = types.SimpleNamespace(global_rank=0, _requeue=lambda countdown: probe.requeued.append(probe.at_requeue()))
    delayed = DelayedSubmission(RequeuedTask())
    delayed.set_timeout(60, 3)
    handler = SignalHandler(env, types.SimpleNamespace(submitted_pickle=tmp_path / "submitted.pkl"), delayed)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        yield probe
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_submitits_requeue_signal_saves_the_step_before_the_job_is_requeued(tmp_path, monkeypatch, submitit_requeue):
    """SIGUSR2 under submitit (time limit near): the run finishes its step and saves last.ckpt,
    then submitit requeues the job and exits. Before, its handler requeued and exited at once, in
    the middle of step 4, and the requeued job went back to the last periodic save (none here)."""
    signal_self_at_step(monkeypatch, 4, signal.SIGUSR2)
    with pytest.raises(SystemExit) as stopped:
        train(compose([*LONG, "train.max_steps=10000", "checkpoint.every_n_steps=1000"], tmp_path / "run"))
    assert stopped.value.code == -1  # submitit's exit after the requeue, not our "stopped by a signal"
    assert submitit_requeue.requeued == [5]  # requeued once, with step 5 (the signal's step done) saved
    assert (tmp_path / "submitted.pkl").exists()  # what the requeued job runs: the same task
    assert signal.getsignal(signal.SIGUSR2).__name__ == "checkpoint_and_try_requeue"  # submitit's again


@pytest.mark.slow
def test_a_job_submitit_requeues_continues_from_its_saved_step_in_its_own_folder(tmp_path):
    """End to end through submitit's local executor (cluster=slurm's launcher, with local processes
    in place of SLURM's): a one-job sweep in the default sweep folder; SIGUSR2, submitit's requeue
    signal, reaches the job's process after step 5. The job finishes its step, saves, submitit
    requeues it and starts it again in a new process, which finds the same sweep folder (not a
    `_2` of its own), continues from the saved step and ends with the weights of a run never
    interrupted, bit for bit."""
    common = [*LONG, "train.max_steps=60", "checkpoint.every_n_steps=1000", "seed=1"]
    launcher = subprocess.Popen([sys.executable, ROOT / "train.py", "-m", "hydra/launcher=submitit_local",
                                 "hydra.launcher.timeout_min=10", *common], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        logs = list(tmp_path.glob("outputs/multirun/*/.submitit/*/*_0_log.out"))
        if logs and "\nstep 5/" in "\n" + logs[0].read_text():
            break
        assert launcher.poll() is None, launcher.stderr.read()[-2000:]
        time.sleep(0.05)
    job = logs[0].parent.name  # the pid of submitit's local controller; the job's process is its child
    (task,) = Path(f"/proc/{job}/task/{job}/children").read_text().split()
    os.kill(int(task), signal.SIGUSR2)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-2000:]

    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    (run,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    out = logs[0].read_text()
    assert "Caught signal SIGUSR2" in (logs[0].parent / f"{job}_0_log.err").read_text() and "Requeued job" in out
    first, again = out.split("Restored all states from the checkpoint")  # the second process resumed once
    steps = [[int(line.split()[1].split("/")[0]) for line in part.splitlines() if line.startswith("step ")]
             for part in (first, again)]
    stop = steps[0][-1]  # the step the first process saved and ended after
    assert stop >= 5 and steps[1][0] == stop + 1 and steps[1][-1] == 60  # the second continued from it
    full = train(compose(common, tmp_path / "full"))
    a, b = final_state(full["checkpoint"]), final_state(run / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lightnings_slurm_requeue_under_srun_comes_after_the_steps_save(tmp_path, monkeypatch):
    """Plain srun (no submitit): Lightning's SLURM auto-requeue owns SIGUSR1. The run finishes its
    step and saves last.ckpt, then Lightning saves its hpc checkpoint and calls `scontrol requeue`
    (a stand-in here that lists the checkpoints it sees), and the run stops. Before, Lightning
    requeued in the middle of step 4 with no last.ckpt and an hpc checkpoint of step 4, and
    training went on."""
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
                       "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    run, log = tmp_path / "run", tmp_path / "scontrol.log"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\nls {run}/checkpoints >> {log}\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    signal_self_at_step(monkeypatch, 4, signal.SIGUSR1)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    with pytest.raises(SIGTERMException):
        train(compose([*LONG, "train.max_steps=8", "checkpoint.every_n_steps=1000"], run))
    assert log.read_text().split() == ["requeue", "4242", "last.ckpt"]  # requeued once, last.ckpt there
    steps = {p.name: torch.load(p, weights_only=False)["global_step"] for p in run.rglob("*.ckpt")}
    assert steps == {"last.ckpt": 5, "hpc_ckpt_1.ckpt": 5}


def test_a_requeue_signal_on_another_rank_hands_over_after_the_agreed_save(monkeypatch, submitit_requeue):
    """Two ranks (the other simulated inside the all-reduce): submitit's SIGUSR2 reaches only the
    other rank; at the next agreement both stop, save, and this rank hands over to its submitit
    handler too (on rank 0 it is the one that requeues)."""
    from scalelong.training import callbacks

    def all_reduce(votes, *args, **kwargs):  # the other rank asks for the stop, from the requeue signal
        votes += torch.tensor([1, int(votes[1]), 1])

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    trainer, saves = two_rank_trainer()
    checkpoint = callbacks.PeriodicCheckpoint("ckpts", every_n_steps=0, stop_check_seconds=1.0)
    submitit_requeue.at_requeue = lambda: list(saves)
    checkpoint.on_train_start(trainer, None)
    assert signal.getsignal(signal.SIGUSR2) == checkpoint._request_requeue
    trainer.global_step = 1
    with pytest.raises(SystemExit):
        checkpoint.on_train_batch_end(trainer, None, None, None, 0)
    assert submitit_requeue.requeued == [[(1, "last.ckpt")]]  # requeued once, after the save
    assert signal.getsignal(signal.SIGUSR2).__name__ == "checkpoint_and_try_requeue"


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    original = DiffusionModule.training_step
    poisoned = {2, 3}

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if int(batch["step"]) in poisoned else loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    weights = {}

    def snapshot(self, *args, **kwargs):
        weights[self.global_step] = [p.detach().clone() for p in self.net.parameters()]

    monkeypatch.setattr(DiffusionModule, "on_train_batch_start", snapshot, raising=False)
    run = train(compose([*LONG, "train.max_steps=6"], tmp_path))
    assert run["module"].nonfinite_total == 2 and run["metrics"]["train/nonfinite_skipped"] == 2
    # Steps 2 and 3 left the weights as they were; the others changed them.
    for step, changed in [(2, False), (3, False), (4, True)]:
        same = all(torch.equal(a, b) for a, b in zip(weights[step], weights[step + 1]))
        assert same != changed, step


def test_too_many_nonfinite_steps_stop_the_run_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if int(batch["step"]) >= 4 else loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    cfg = compose([*LONG, "train.max_steps=50", "checkpoint.every_n_steps=2", "train.max_nonfinite_in_row=3"],
                  tmp_path)
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a non-finite loss"):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6  # saved at step 6: steps 5 and 6 were skipped, weights still good
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_diverged_run_is_one_line_from_the_command_line(tmp_path):
    # lr 1e30 blows the weights up within a few steps; the guard stops the run with status 3.
    proc = run_warm([ROOT / "train.py", *LONG, "train.max_steps=200", "optim.lr=1e30", "train.max_nonfinite_in_row=2",
                     f"hydra.run.dir={tmp_path / 'run'}"], timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "error: 2 steps in a row had a non-finite loss or gradient" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_diverged_job_of_a_sweep_leaves_the_next_jobs_to_run(tmp_path):
    # A sweep (-m) whose first job diverges: its one line, then the second job trains to the end.
    proc = run_warm([ROOT / "train.py", "-m", *LONG, "train.max_steps=6", "optim.lr=1e30,1e-3",
                     "train.max_nonfinite_in_row=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=240,
                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "error: 2 steps in a row had a non-finite loss or gradient" in proc.stderr, proc.stderr[-2000:]
    finished = sorted(p.parent.name for p in (tmp_path / "sweep").rglob("metrics.json"))
    assert len(finished) == 1 and "optim.lr=0.001" in finished[0], (finished, proc.stderr[-2000:])
    assert proc.returncode != 0  # the sweep says that one of its jobs failed


def test_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = train(compose([*LONG, "train.max_steps=2"], tmp_path))
    before = run["checkpoint"].read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match="cannot write the checkpoint .*No space left on device.*previous one is intact"):
        run["trainer"].save_checkpoint(run["checkpoint"])
    assert run["checkpoint"].read_bytes() == before
    assert not list(run["checkpoint"].parent.glob(".*.tmp"))


def test_misconfigured_wandb_never_stops_training(tmp_path, monkeypatch):
    # Online mode without an API key: W&B refuses at once; the run goes on with the CSV logger.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no stored login
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="W&B logger disabled"):
        run = train(compose(["experiment=smoke", "logger=wandb", "train.max_steps=2"], tmp_path / "run"))
    assert run["trainer"].global_step == 2
    assert list((tmp_path / "run").glob("csv/version_0/metrics.csv"))
