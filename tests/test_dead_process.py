"""When a process of a run dies: the rank that is left ends with a few lines (which rank stopped and
how, the last checkpoint's step, the command that resumes) and exit status 4; a silent rank costs
the collective timeout of trainer=ddp's strategy, not half an hour; torchrun's restarts resume by
themselves and end with the weights of an uninterrupted run; what a killed process was writing
(a checkpoint, metrics.csv) stays readable, and W&B continues under the run's id.

The processes die for real: ``fault_helpers.StopAtStep`` sends the signal to its own process at a
given step and rank. The two-process runs are a handful of launches (each costs a cold interpreter
for rank 1 and a gloo rendezvous), the torchrun one most (four cold workers and the agent)."""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose
from warm_python import run_warm

from scalelong.analysis.runs import read_metrics
from scalelong.utils.errors import EXIT_RANK_LOST

TINY = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "experiment=smoke", "logger=csv",
        "train.batch_size=16", "train.max_steps=6", "checkpoint.every_n_steps=2", "model.base_channels=8"]


def stop_at(step: int, rank: int, sig: str = "SIGKILL") -> list[str]:
    return ["+callbacks.stop._target_=fault_helpers.StopAtStep", f"+callbacks.stop.step={step}",
            f"+callbacks.stop.rank={rank}", f"+callbacks.stop.signal={sig}"]


def env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def train_cli(cwd: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_warm([ROOT / "train.py", *overrides], cwd=cwd, timeout=timeout, env=env())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def the_report(stderr: str) -> list[str]:
    """The lines from ``error:`` on (what the user reads last)."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    return lines[start:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("whole")
    proc = train_cli(work, *TINY, f"hydra.run.dir={work / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


@pytest.mark.slow
def test_killing_rank_1_ends_rank_0_with_a_short_report(tmp_path):
    run = tmp_path / "run"
    proc = train_cli(tmp_path, *TINY, *stop_at(3, rank=1), f"hydra.run.dir={run}")
    assert proc.returncode == EXIT_RANK_LOST, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "GLHF" not in proc.stderr
    report = the_report(proc.stderr)
    assert len(report) == 3, report
    assert re.fullmatch(r"error: rank 1 \(pid \d+\) was killed by SIGKILL; rank 0 stops too \(exit status 4\)\.",
                        report[0]), report[0]
    assert report[1] == f"The last checkpoint is at step 2: {run / 'checkpoints' / 'last.ckpt'}"
    # The command that resumes: the user's own overrides, and resume= this run folder.
    command = shlex.split(report[2].removeprefix("Resume: "))
    assert command == ["python", str(ROOT / "train.py"), *TINY, *stop_at(3, rank=1), f"resume={run}"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_killing_rank_0_ends_rank_1_with_a_short_report(tmp_path):
    run = tmp_path / "run"
    proc = train_cli(tmp_path, *TINY, *stop_at(3, rank=0), f"hydra.run.dir={run}")
    assert proc.returncode == -signal.SIGKILL  # rank 0 itself; rank 1's report follows on the same stderr
    assert "Traceback" not in proc.stderr
    report = the_report(proc.stderr)
    assert len(report) == 3, report
    assert report[0].startswith("error: rank 0 stopped (its process is gone")
    assert report[0].endswith("rank 1 stops too (exit status 4).")
    assert report[1] == f"The last checkpoint is at step 2: {run / 'checkpoints' / 'last.ckpt'}"
    assert report[2].startswith("Resume: python ") and report[2].endswith(f"resume={run}")


def test_a_failed_collective_on_rank_1_waits_to_see_rank_0_gone(monkeypatch):
    """The race behind a report that went missing (seen once in a full suite): a SIGKILLed rank 0's
    sockets close, so rank 1's collective fails, a moment before the kernel gives rank 1 a new
    parent. Rank 1 must still report "rank 0 stopped", not stay quiet as if rank 0 were there to
    report; and when rank 0 is really still there, it stays quiet after the grace period."""
    from scalelong.utils import distributed

    watch = distributed.RankWatch.__new__(distributed.RankWatch)  # no threads, no hooks: the decision only
    watch._parent = 12345
    gone_at = time.monotonic() + 0.3
    monkeypatch.setattr(watch, "_parent_is_gone", lambda: time.monotonic() >= gone_at)
    assert watch._what_stopped() == distributed.RANK_0_GONE
    monkeypatch.setattr(watch, "_parent_is_gone", lambda: False)  # rank 0 alive: it reports for the run
    monkeypatch.setattr(watch, "PARENT_GRACE_S", 0.1)
    assert watch._what_stopped() is None


@pytest.mark.slow
def test_a_silent_rank_costs_the_strategy_timeout_not_half_an_hour(tmp_path):
    """trainer.strategy.timeout reaches the process group (2 minutes here; Lightning's default is
    30). Then rank 1 stops (SIGSTOP) without closing its sockets: rank 0 waits in the gradient
    all-reduce until the timeout, reports, and ends rank 1 too. The probe shortens the timeout to
    10 s once training runs, so that the test does not wait 2 minutes (and a cold rank 1 may take
    longer than 10 s to join at the start)."""
    run, probe = tmp_path / "run", tmp_path / "timeout.txt"
    started = time.monotonic()
    proc = train_cli(tmp_path, *TINY, *stop_at(3, rank=1, sig="SIGSTOP"), "trainer.strategy.timeout.minutes=2",
                     "+callbacks.probe._target_=fault_helpers.TimeoutProbe", f"+callbacks.probe.path={probe}",
                     "+callbacks.probe.then_s=10", f"hydra.run.dir={run}", timeout=300)
    elapsed = time.monotonic() - started
    assert float(probe.read_text()) == 120.0
    assert proc.returncode == EXIT_RANK_LOST, proc.stderr[-3000:]
    report = the_report(proc.stderr)
    assert re.fullmatch(r"error: rank 1 \(pid \d+\) did not answer within the collective timeout \(its process "
                        r"was still there, stuck\); rank 0 stops too \(exit status 4\)\.", report[0]), report[0]
    assert report[1] == f"The last checkpoint is at step 2: {run / 'checkpoints' / 'last.ckpt'}"
    pid = int(re.search(r"pid (\d+)", report[0]).group(1))
    assert not Path(f"/proc/{pid}").exists()  # ended, not left stopped
    assert elapsed < 240  # the test's own bound: 30 minutes would have ended it by its timeout


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    """torchrun --max-restarts=1 restarts both ranks after rank 1 dies at step 3; they resume from
    the step-2 checkpoint in the same folder, and the run ends with the weights, bit for bit, and
    the logged losses of the uninterrupted run. metrics.csv of the killed attempt and the resumed
    one read back as one series."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         str(ROOT / "train.py"), *TINY, *stop_at(3, rank=1), f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr  # torchrun saw rank 1 die, and restarted it
    ours, whole = weights(run), weights(uninterrupted)
    assert ours.keys() == whole.keys()
    for key in whole:
        assert torch.equal(ours[key], whole[key]), key
    assert sorted(p.parent.name for p in run.glob("csv/version_*/metrics.csv")) == ["version_0", "version_1"]
    losses, expected = read_metrics(run)["train/loss"], read_metrics(uninterrupted)["train/loss"]
    assert losses[0].tolist() == expected[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert losses[1].tolist() == expected[1].tolist()


def test_under_torchrun_the_run_folder_must_be_given(tmp_path):
    """Each rank and each restart would name its own folder after the time it started."""
    from scalelong.cli import check_launcher

    elastic = {"TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
               "GROUP_WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY], cwd=tmp_path, capture_output=True,
                          text=True, env={**env(), **elastic}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: under torchrun every rank and every restart must use the same run folder, and the default one is "
        "named after the time each process starts: add hydra.run.dir=outputs/runs/<name> (or resume=<run folder>), "
        "so that a restarted run resumes there"]
    assert not (tmp_path / "outputs").exists()
    old = dict(os.environ)
    try:
        os.environ.update(elastic)
        check_launcher([*TINY, "hydra.run.dir=outputs/runs/a"])  # given: fine
        os.environ["GROUP_WORLD_SIZE"] = "2"  # several nodes: each counts its own restarts
        with pytest.raises(SystemExit) as stop:
            check_launcher([*TINY, "hydra.run.dir=outputs/runs/a"])
        assert stop.value.code == 2
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_the_ddp_strategy_has_a_timeout_of_minutes_and_nccl_stops_on_errors(monkeypatch):
    from hydra.utils import instantiate

    from scalelong.utils.distributed import set_nccl_error_handling

    strategy = instantiate(compose(["trainer=ddp"])["trainer"]["strategy"])
    assert type(strategy).__name__ == "DDPStrategy" and strategy._timeout == timedelta(minutes=5)
    longer = instantiate(compose(["trainer=ddp", "trainer.strategy.timeout.minutes=15"])["trainer"]["strategy"])
    assert longer._timeout == timedelta(minutes=15)
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.delenv(name, raising=False)
    set_nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "1")  # the user's choice, under the old name, stays
    set_nccl_error_handling()
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ


def test_how_a_rank_ended_reads_as_words():
    from scalelong.utils.distributed import describe_exit, is_lost_peer_error

    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(None).startswith("did not answer within the collective timeout")
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:29056: Connection reset by peer.")
    assert is_lost_peer_error(gloo)
    assert not is_lost_peer_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def _killed_while_writing(write, kill_after_bytes: int) -> None:
    """Run ``write()`` in a forked child that SIGKILLs itself in the middle of writing: once
    ``kill_after_bytes`` went into the files that ``scalelong.utils.io.atomic_write`` opens (where
    every checkpoint and metrics.csv is written), the rest of that write is cut off."""
    pid = os.fork()
    if pid == 0:
        try:
            written = [0]
            real_fdopen = os.fdopen

            class DiesWhileWriting:
                def __init__(self, f):
                    self._f = f

                def __getattr__(self, name):
                    return getattr(self._f, name)

                def write(self, data):
                    room = kill_after_bytes - written[0]
                    if len(data) >= room:
                        self._f.write(data[:room])
                        self._f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    written[0] += len(data)
                    return self._f.write(data)

            os.fdopen = lambda *args, **kwargs: DiesWhileWriting(real_fdopen(*args, **kwargs))
            write()
        finally:
            os._exit(0)  # only when the kill did not come: the assertion below fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_metrics_csv_survives_a_kill_while_it_is_rewritten(tmp_path):
    """A new metric makes Lightning rewrite metrics.csv under a wider header; a kill in the middle
    of that rewrite leaves the previous file, every row readable."""
    from scalelong.training.loggers import csv_logger

    logger = csv_logger(save_dir=tmp_path)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.save()
    path = Path(logger.experiment.metrics_file_path)
    before = path.read_text()

    def rewrite_with_a_new_column():
        logger.log_metrics({"train/loss": 0.25, "eval/fid": 40.0}, step=3)
        logger.save()

    _killed_while_writing(rewrite_with_a_new_column, kill_after_bytes=20)
    assert path.read_text() == before
    with open(path, newline="") as f:
        assert [float(row["train/loss"]) for row in csv.DictReader(f)] == [1.0, 0.5, 1 / 3]
    rewrite_with_a_new_column()  # and without a kill, the new column and the old rows
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"] and rows[3]["eval/fid"] == "40.0"


def test_a_checkpoint_survives_a_kill_while_it_is_saved(tmp_path):
    from scalelong.training.checkpoint_io import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, path)
    _killed_while_writing(lambda: io_.save_checkpoint({"global_step": 4, "w": torch.zeros(1000)}, path),
                          kill_after_bytes=1500)
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 2 and torch.equal(kept["w"], torch.ones(1000))
    # what the killed save leaves is a temporary file beside it, never a truncated last.ckpt
    assert all(p.name == "last.ckpt" or p.name.startswith(".last.ckpt.") for p in tmp_path.iterdir())


def test_wandb_continues_under_the_run_id_after_a_kill(tmp_path):
    """One process, W&B offline: killed at step 3 (SIGKILL), run again with resume=: the second W&B
    run has the first one's id (wandb_id.txt), so `wandb sync` appends to the same run."""
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    common = ["experiment=smoke", "logger=wandb", "train.max_steps=6", "checkpoint.every_n_steps=2",
              "model.base_channels=8", "+logger.csv.flush_logs_every_n_steps=1"]
    wandb_env = {**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    killed = run_warm([ROOT / "train.py", *common, *stop_at(3, rank=0), f"hydra.run.dir={run}"], cwd=tmp_path,
                      env=wandb_env, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_id = (run / "wandb_id.txt").read_text().strip()
    resumed = run_warm([ROOT / "train.py", *common, f"resume={run}"], cwd=tmp_path, env=wandb_env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    # offline-run-<start second>-<run id>; W&B adds "-1" when both runs start in the same second
    named = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    assert len(offline_runs) == 2 and all(named.fullmatch(name) for name in offline_runs), offline_runs
    # metrics.csv: the killed run's rows up to the kill, the resumed run's from step 2 on, read as one
    steps = read_metrics(run)["train/loss"][0].tolist()
    assert steps == [0, 1, 2, 3, 4, 5]
