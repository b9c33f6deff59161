"""The little of torch.distributed that evaluation needs, all of it a no-op in a single process;
and what a multi-process run does when one of its processes dies (``RankWatch``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_device(default: torch.device | str = "cpu") -> torch.device:
    """Where tensors must live to be all-reduced: the current CUDA device for NCCL, else ``default``."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(default)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place where possible); returns the summed tensor on t's device."""
    if not is_distributed():
        return t
    dev = reduce_device(t.device)
    work = t if t.device == dev else t.to(dev)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work if work is t else work.to(t.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (for example a download into a shared cache), then the others."""
    rank, _ = rank_and_world()
    if rank != 0:
        barrier()
    try:
        yield
    finally:
        if rank == 0:
            barrier()


# --- when a process of the run dies ------------------------------------------------------------

# torch reads the first of these that is set. 3 ("SkipCleanUp": the watchdog ends the process
# when a collective fails or times out, without aborting the communicators first, which can
# itself hang when a peer died mid-collective) is torch 2.14's default (ProcessGroupNCCL.hpp);
# it is set here so that a survivor stops whatever another torch's default is. 1 ("TearDown")
# aborts the communicators first.
NCCL_ERROR_HANDLING = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")

# What gloo, NCCL and the TCP store say when a peer is gone or silent (the error type is often a
# plain RuntimeError): a dead peer closes its sockets, a stuck one runs into the timeout.
_LOST_PEER_MESSAGES = ("connection reset by peer", "connection closed by peer", "broken pipe", "timed out",
                       "timeout", "connection refused", "communicator was aborted", "nccl error",
                       "socket closed", "end of file")


RANK_0_GONE = "rank 0 stopped (its process is gone; its exit status is known only to its own shell)"


def set_nccl_error_handling() -> None:
    """Before the process group starts: unless the user chose a mode, NCCL's watchdog ends a
    process whose collective failed or ran past the strategy's timeout."""
    if not any(name in os.environ for name in NCCL_ERROR_HANDLING):
        os.environ[NCCL_ERROR_HANDLING[0]] = "3"


def in_a_process_group() -> bool:
    """Whether this process belongs to a started process group of two or more ranks."""
    dist_module = sys.modules.get("torch.distributed")  # never imported for a run that did not start
    return bool(dist_module and dist_module.is_available() and dist_module.is_initialized()
                and dist_module.get_world_size() > 1)


def is_lost_peer_error(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank is gone or silent."""
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _LOST_PEER_MESSAGES)


def describe_exit(returncode: int | None) -> str:
    """How a process ended, from its ``Popen.returncode``."""
    if returncode is None:
        return "did not answer within the collective timeout (its process was still there, stuck)"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class RankWatch:
    """One short report, and one exit status, when another process of the run stops.

    Whichever rank is left says which rank stopped and how (where this process can know it),
    then ``ending()`` supplies the rest (the checkpoint, the command that resumes), and the
    process exits with ``exit_status``. Three paths lead here, and the first one reports:

    - a collective fails in the training loop (gloo at once, NCCL after the timeout):
      ``report_failed_collective``, from the command's exception handler;
    - rank 0 of a run that Lightning launched on one node holds its other ranks' ``Popen``
      objects; Lightning's observer thread SIGKILLs every process of the run, rank 0 included,
      up to 5 s after one of them exits with an error, printing nothing. Its last act is
      replaced by this report (which also ends the other ranks, as Lightning does);
    - the other ranks of such a run are rank 0's children: a thread notices when their parent
      is gone (rank 0 died), which NCCL may not report before the timeout.

    A rank whose parent (rank 0) is still there ends quietly: rank 0 reports for the run.
    """

    PARENT_GRACE_S = 1.0  # how long a failed collective waits to see whether rank 0 is gone

    def __init__(self, ending: Callable[[], str], exit_status: int):
        self.ending = ending
        self.exit_status = exit_status
        self._lock = threading.Lock()
        self.armed = True  # False once this rank ends for a reason of its own (its traceback)
        self._parent = None
        if _launched_by_lightning() and int(os.environ.get("LOCAL_RANK", "0")) > 0:
            self._parent = os.getppid()
            threading.Thread(target=self._watch_parent, name="scalelong-rank0-watch", daemon=True).start()
        _RankWatchHook.install(self)

    def lost_a_rank(self, err: BaseException) -> bool:
        """Whether ``err``, raised in this process, comes from another rank having stopped."""
        if not in_a_process_group():
            return False
        children = _lightning_children() or []
        return is_lost_peer_error(err) or any(p.poll() not in (None, 0) for p in children)

    def report_failed_collective(self) -> None:
        """From the main thread, after a collective failed: report and raise ``SystemExit``."""
        self._end(self._what_stopped(), hard=False)

    # --- what this process can know ---

    def _what_stopped(self) -> str | None:
        """A sentence naming the rank that stopped, or None when this rank should stay quiet."""
        if self._parent is not None:  # a rank Lightning started: rank 0 is its parent
            # A killed rank 0's sockets close (failing this collective) a moment before the kernel
            # hands this process to a new parent: wait for that moment before deciding.
            deadline = time.monotonic() + self.PARENT_GRACE_S
            while not self._parent_is_gone() and time.monotonic() < deadline:
                time.sleep(0.02)
            return RANK_0_GONE if self._parent_is_gone() else None  # rank 0 is there and reports for the run
        children = _lightning_children()
        if children is not None:  # rank 0 of a Lightning launch: its ranks' exit statuses
            return _which_children_stopped(children)
        return "another rank stopped or stopped answering (the launcher's log, torchrun's or srun's, names it)"

    def _parent_is_gone(self) -> bool:
        return os.getppid() != self._parent

    def _watch_parent(self) -> None:
        while not self._parent_is_gone():
            time.sleep(1.0)
        self._end(RANK_0_GONE, hard=True)

    def _end(self, what: str | None, hard: bool, children: list | None = None) -> None:
        if not self._lock.acquire(blocking=False):  # another path is reporting: let it finish
            if hard:
                return
            self._lock.acquire()
        _end_all(children if children is not None else (_lightning_children() or []))
        if what is not None:
            rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
            print(f"error: {what}; rank {rank} stops too (exit status {self.exit_status}).\n{self.ending()}",
                  file=sys.stderr, flush=True)
        if hard:  # from a thread, while the main thread may be blocked in a collective
            sys.stdout.flush()
            os._exit(self.exit_status)
        raise SystemExit(self.exit_status)


def _end_all(children: list) -> None:
    """SIGKILL the ranks this process started that still run (no rank of the launch is left waiting
    in a collective, or stopped), and collect their exit statuses."""
    for proc in children:
        if proc.poll() is None:
            proc.kill()
    for proc in children:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a process that will not go is left to the OS
            pass


def _launched_by_lightning() -> bool:
    """Whether Lightning's launcher started this run's ranks on this node (not torchrun, not SLURM)."""
    return not any(v in os.environ for v in ("TORCHELASTIC_RUN_ID", "SLURM_PROCID")) and "LOCAL_RANK" in os.environ


def _lightning_children() -> list | None:
    """Rank 0's ``Popen`` objects of the other ranks, from Lightning's observer thread (None elsewhere)."""
    for thread in threading.enumerate():
        if type(thread).__name__ == "_ChildProcessObserver":
            return getattr(thread, "_child_processes", None)
    return None


def _which_children_stopped(children: list) -> str:
    """The rank(s) that stopped first. A rank that ended with ``EXIT_RANK_LOST`` only followed another."""
    from scalelong.utils.errors import EXIT_RANK_LOST

    deadline = time.monotonic() + 1.0  # a killed child's status arrives a moment after its sockets close
    while time.monotonic() < deadline and all(p.poll() is None for p in children):
        time.sleep(0.05)
    node, per_node = int(os.environ.get("NODE_RANK", "0")), len(children) + 1
    ranks = [(node * per_node + i + 1, p) for i, p in enumerate(children)]
    first = [(r, p) for r, p in ranks if p.returncode not in (None, 0, EXIT_RANK_LOST)]
    if not first:  # none ended by itself: the silent ones ran into the timeout
        first = [(r, p) for r, p in ranks if p.returncode is None]
    if not first:
        return "another rank stopped"
    return "; ".join(f"rank {r} (pid {p.pid}) {describe_exit(p.returncode)}" for r, p in first)


class _RankWatchHook:
    """Replaces the last act of Lightning's observer (SIGKILL to every process of the run) with the
    watch's report; the observer still finds the stopped rank, within its 5 s polling period."""

    watch: RankWatch | None = None

    @classmethod
    def install(cls, watch: RankWatch) -> None:
        cls.watch = watch
        try:
            from lightning_fabric.strategies.launchers import subprocess_script
        except ImportError:
            return
        observer = getattr(subprocess_script, "_ChildProcessObserver", None)
        if observer is not None and hasattr(observer, "_terminate_all"):
            observer._terminate_all = cls._terminate_all
            # its one message ("Child process with PID ... terminated with code -9. Forcefully
            # terminating ...") would follow the report, which says the same
            logging.getLogger(subprocess_script.__name__).setLevel(logging.WARNING)

    @staticmethod
    def _terminate_all(observer) -> None:
        watch, children = _RankWatchHook.watch, observer._child_processes
        if watch is None or not watch.armed:  # rank 0 is ending with an error of its own: end the others
            _end_all(children)
            return
        watch._end(_which_children_stopped(children), hard=True, children=children)


# --- torchrun's restarts -------------------------------------------------------------------------


def elastic_restarts_allowed() -> int:
    """``--max-restarts`` of the torchrun that started this process (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) if "TORCHELASTIC_RUN_ID" in os.environ else 0


def restarts_share_a_store() -> bool:
    """Whether the ranks meet in torchrun's own key-value store, which lives as long as torchrun does."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def isolate_elastic_attempts() -> bool:
    """Give each of torchrun's restarts keys of its own in torchrun's store.

    torch (2.14 at least) lets the ranks of every restart meet in the same store of the elastic
    agent, without a prefix per restart (pytorch/pytorch#135712): a restarted rank 0 reads the
    addresses that the dead attempt's ranks published and gloo fails to connect
    ("connectFullMesh failed ... Connection refused"; seen on this CPU, 2026-12-04). Here the
    store the process group starts from is prefixed with the restart count, which all ranks of
    one torchrun (one node) agree on. Returns whether the prefix applies.
    """
    if not (restarts_share_a_store() and elastic_restarts_allowed() > 0):
        return False
    import importlib

    from torch.distributed import PrefixStore

    # the module: ``torch.distributed.rendezvous`` as an attribute is the function of that name
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = getattr(rendezvous, "_create_c10d_store", None)
    if create is None or getattr(create, "_scalelong_attempts", False):
        return create is not None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def create_for_this_attempt(*args, **kwargs):
        return PrefixStore(f"scalelong/attempt_{attempt}", create(*args, **kwargs))

    create_for_this_attempt._scalelong_attempts = True
    rendezvous._create_c10d_store = create_for_this_attempt
    return True
