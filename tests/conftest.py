"""Shared test helpers: compose the real Hydra configs, shrunk for the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from warm_python import run_warm

from scalelong.config import compose as compose_config
from scalelong.config import to_plain

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run on as many workers as there are cores (pytest -n auto): one thread each, in this
    # process and in the ones it starts, instead of every worker claiming every core.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str], run_dir: Path | str | None = None) -> dict:
    """The resolved run config for ``overrides``, as ``python train.py`` would see it."""
    return to_plain(compose_config(overrides, run_dir or "."))


def load_script(name: str):
    """``scripts/<name>.py`` as a module. It is registered in ``sys.modules`` (report.py's
    dataclasses look their module up there), and ``scripts/`` is importable while it loads
    (benchmark_gate.py imports benchmark.py)."""
    spec = importlib.util.spec_from_file_location(f"scalelong_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


ONE_PROCESS_DRIVER = textwrap.dedent('''
    import json, os, runpy, sys, traceback
    for command in json.load(open(sys.argv[1])):
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        for fd, path in ((1, command["out"]), (2, command["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = list(command["argv"])
        code = 0
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        with open(command["code"], "w") as f:
            f.write(str(code))
''')


def run_in_one_process(commands: list[list[str]], cwd: Path, env: dict[str, str] | None = None,
                       timeout: float = 600, warm: bool = False) -> list[subprocess.CompletedProcess]:
    """``python <script> <args>`` for each of ``commands`` (``[script, *args]``), one after the
    other in one Python process: one interpreter's imports (torch, Lightning, Hydra: about 6
    CPU-seconds) instead of one per command, or none with ``warm`` (a process forked from
    warm_python's pre-imported interpreter). Each command gets its own stdout and stderr (file
    descriptors 1 and 2, so logging and the processes it starts write there too) and its exit
    status, as a ``subprocess.CompletedProcess``. For commands whose test is not about a fresh
    process (what is imported, the first run of a process)."""
    work = Path(tempfile.mkdtemp(prefix="scalelong-one-process-"))
    spec = [{"argv": [str(a) for a in argv], "out": str(work / f"{k}.out"), "err": str(work / f"{k}.err"),
             "code": str(work / f"{k}.code")} for k, argv in enumerate(commands)]
    (work / "commands.json").write_text(json.dumps(spec))
    if warm:
        (work / "driver.py").write_text(ONE_PROCESS_DRIVER)
        driver = run_warm([work / "driver.py", work / "commands.json"], cwd=cwd, env=env, timeout=timeout)
    else:
        driver = subprocess.run([sys.executable, "-c", ONE_PROCESS_DRIVER, str(work / "commands.json")], cwd=cwd,
                                env=env, capture_output=True, text=True, timeout=timeout)
    try:
        done = []
        for argv, c in zip(commands, spec):
            if not Path(c["code"]).is_file():  # the driver itself died before this command finished
                raise AssertionError(f"the driver process stopped ({driver.returncode}) before {argv}:\n"
                                     f"{driver.stderr[-3000:]}")
            done.append(subprocess.CompletedProcess([sys.executable, *argv], int(Path(c["code"]).read_text()),
                                                    Path(c["out"]).read_text(), Path(c["err"]).read_text()))
        return done
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory):
    """Reference statistics of 64 digits in a fixed random linear map's features (fid_helpers),
    for the FID callback's tests without Inception."""
    from fid_helpers import LinearFeatures

    from scalelong.data import load_digits_images
    from scalelong.metrics.reference import compute_reference, save_reference

    path = tmp_path_factory.mktemp("ref") / "digits_clean_train_16.npz"
    ref = compute_reference(load_digits_images(16).images[:64], LinearFeatures(), {"dataset": "digits"}, kid_max=64)
    save_reference(path, ref)
    return path


@pytest.fixture
def quick_compile(monkeypatch):
    """``nn.Module.compile`` (what model.compile=true calls) through TorchDynamo and AOTAutograd
    but not Inductor, whose C++ compilation of every kernel costs 20-30 CPU-seconds per model on
    a fresh machine (nothing in its cache), and which GPUs replace by Triton kernels anyway."""
    import torch.nn as nn

    real = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: real(self, backend="aot_eager", **kw))


@pytest.fixture
def compose_cfg():
    return compose


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first, longest-running jobs at the front: pytest-xdist hands each
    worker a contiguous share of this order and the idle one steals from the other's tail, so a
    long test collected last would run alone at the end while the other core waits."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
