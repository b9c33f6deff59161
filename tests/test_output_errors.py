"""Never lose a run: a full disk or an unwritable folder is one line naming the file, the reason and
the fix; the previous file stays intact and no temporary file is left behind.

A full disk is the kernel's own: the ``full_disk`` fixture points the file descriptor that
``scalelong.utils.io.atomic_write`` writes to at ``/dev/full``, where every write(2) fails with ENOSPC,
so the error comes through whatever writes the file (Python, numpy, PIL, torch.save) as it
would on a real full disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, compose, load_script
from warm_python import run_warm
from PIL import Image

from scalelong.utils.errors import DataError, OutputError
from scalelong.utils.io import atomic_write, write_text
from scalelong.training.checkpoint_io import AtomicCheckpointIO

NO_SPACE = "(No space left on device)"
FREE_SPACE = "Free some space or choose another output folder"


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


# --- the full disk ------------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk()``: from now on every file atomic_write writes lands on /dev/full (ENOSPC);
    ``full_disk("a.png", ...)``: only the files of those names."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    names: list[set[str] | None] = []
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        if names and sys._getframe(1).f_globals.get("__name__") == "scalelong.utils.io":
            temporary = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))  # ".<name>.<random>.tmp"
            if names[-1] is None or temporary[1:].rsplit(".", 2)[0] in names[-1]:
                full = os.open("/dev/full", os.O_WRONLY)
                os.dup2(full, fd)
                os.close(full)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    return lambda *only: names.append(set(only) or None)


def error_line(capsys) -> str:
    """The one ``error:`` line on stderr (progress bars may come before it), with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    return lines[-1]


def run_script(capsys, name: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        load_script(name).main(argv)
    assert exit_.value.code == 2
    return error_line(capsys)


# --- atomic_write -------------------------------------------------------------------------------


def fail_with(monkeypatch, target, err: OSError):
    def failing(*args, **kwargs):
        raise err

    monkeypatch.setattr(*target, failing)


@pytest.mark.parametrize("stage", ["folder", "temporary file", "write", "write, raised by the caller", "fsync",
                                   "rename"])
def test_a_failed_write_is_one_output_error_and_keeps_the_previous_file(tmp_path, monkeypatch, full_disk, stage):
    target = tmp_path / "out" / "fid.json"
    target.parent.mkdir()
    target.write_text("previous")
    cause = OSError(errno.ENOSPC, "No space left on device")
    if stage == "folder":
        fail_with(monkeypatch, (Path, "mkdir"), cause)
    elif stage == "temporary file":  # no inode left for it
        fail_with(monkeypatch, (tempfile, "mkstemp"), cause)
    elif stage == "write":
        full_disk()
    elif stage == "fsync":  # delayed allocation, NFS, quotas: the error shows up at the sync
        fail_with(monkeypatch, (os, "fsync"), cause)
    elif stage == "rename":
        fail_with(monkeypatch, (os, "replace"), cause)
    with pytest.raises(OutputError) as info:
        with atomic_write(target, "w") as f:
            f.write('{"fid": 1.0}' * 1000)
            f.flush()
            if stage == "write, raised by the caller":
                raise cause
    assert str(info.value) == (f"cannot write {target} (No space left on device); the previous file is intact. "
                               f"{FREE_SPACE}")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert target.read_text() == "previous"
    assert [p.name for p in target.parent.iterdir()] == ["fid.json"]  # no temporary file


def test_without_a_previous_file_nothing_is_left(tmp_path, full_disk):
    full_disk()
    with pytest.raises(OutputError, match=r"^cannot write .*config.yaml \(No space left on device\); no partial "
                                          r"file is left\. Free some space or choose another output folder$"):
        write_text(tmp_path / "config.yaml", "x: 1\n")
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_place_of_the_folder_is_named(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as info:
        write_text(blocker / "run" / "metrics.json", "{}")
    assert str(info.value) == (f"cannot write {blocker}/run/metrics.json ({blocker} is a file, not a folder); "
                               "no partial file is left. Choose another output folder")


def test_no_permission_names_the_folder_to_fix(tmp_path, monkeypatch):
    fail_with(monkeypatch, (tempfile, "mkstemp"), PermissionError(errno.EACCES, "Permission denied",
                                                                   str(tmp_path / ".report.md.abc123.tmp")))
    with pytest.raises(OutputError) as info:
        write_text(tmp_path / "report.md", "# report")
    assert str(info.value) == (f"cannot write {tmp_path}/report.md (Permission denied); no partial file is left. "
                               f"Make {tmp_path} writable or choose another output folder")


def test_no_permission_for_a_folder_to_make_names_the_one_that_exists(tmp_path, monkeypatch):
    fail_with(monkeypatch, (Path, "mkdir"), PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "a")))
    with pytest.raises(OutputError) as info:
        write_text(tmp_path / "a" / "b" / "report.md", "# report")
    assert str(info.value) == (f"cannot write {tmp_path}/a/b/report.md (Permission denied: {tmp_path}/a); no "
                               f"partial file is left. Make {tmp_path} writable or choose another output folder")


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), ValueError("a bug"), DataError("bad download"),
                                    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
                                    FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/in.jpg"),
                                    OSError("image file is truncated")],
                         ids=["interrupt", "bug", "config-error", "network", "another-file", "no-errno"])
def test_other_errors_pass_through_unchanged(tmp_path, raised):
    """Only the write's own OSError becomes an OutputError: a download that fails (cifar10.py
    makes that a DataError) or an input that cannot be read is not a full disk."""
    target = tmp_path / "data.bin"
    target.write_bytes(b"previous")
    with pytest.raises(type(raised)) as info:
        with atomic_write(target) as f:
            f.write(b"half of the new")
            raise raised
    assert info.value is raised
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_a_checkpoint_on_a_full_disk_keeps_its_own_message(tmp_path, full_disk):
    """torch.save turns the ENOSPC of its write into RuntimeError("unexpected pos ..."): still one line."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(10_000)}, path)
    full_disk()
    with pytest.raises(OutputError) as info:
        AtomicCheckpointIO().save_checkpoint({"global_step": 4, "w": torch.zeros(10_000)}, path)
    assert str(info.value) == (f"cannot write the checkpoint {path} (No space left on device); the previous one is "
                               "intact. Free some space or choose another run folder (hydra.run.dir=...)")
    assert info.value.__cause__.errno == errno.ENOSPC
    assert torch.load(path, weights_only=False)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_first_checkpoint_on_a_full_disk_does_not_claim_a_previous_one(tmp_path, full_disk):
    path = tmp_path / "checkpoints" / "last.ckpt"
    full_disk()
    with pytest.raises(OutputError) as info:
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(10_000)}, path)
    assert str(info.value) == (f"cannot write the checkpoint {path} (No space left on device); no partial "
                               "checkpoint is left. Free some space or choose another run folder (hydra.run.dir=...)")
    assert list(path.parent.iterdir()) == []


# --- train.py -----------------------------------------------------------------------------------


WRAPPER = """
    # train.py on a disk that fills up at the second checkpoint: from then on torch.save writes to
    # /dev/full, whose every write fails with ENOSPC, as a full disk's do.
    import os, runpy, sys
    import torch

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    wrapper = tmp_path / "full_disk_train.py"
    wrapper.write_text(textwrap.dedent(WRAPPER))
    run = tmp_path / "run"
    proc = run_warm([wrapper, ROOT / "train.py", "experiment=smoke", "logger=csv", "train.max_steps=4",
                     "checkpoint.every_n_steps=2", f"hydra.run.dir={run}"], cwd=tmp_path, timeout=180,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the checkpoint {last} (No space left on device); the previous one is intact. "
        "Free some space or choose another run folder (hydra.run.dir=...)")
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) == 1
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the step-2 checkpoint, whole
    assert (run / "config.yaml").is_file()  # the run folder is kept: it can be resumed elsewhere
    assert temporaries(run) == []


# --- an output folder without write permission --------------------------------------------------

NOBODY = 65534


def as_unprivileged_user():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def shared_tmp():
    """A folder every user can reach (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="scalelong-perm-"))
    folder.chmod(0o755)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("mode", [0o555, 0o700], ids=["read-only", "private"])
def test_an_unwritable_output_folder_is_one_line(shared_tmp, mode):
    """0o555: the user may look in but not write; 0o700 (root's): not even look in."""
    home = shared_tmp / "home"  # HOME, caches, cwd: writable by the unprivileged user
    home.mkdir()
    home.chmod(0o777)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / "cache"),
           "MPLCONFIGDIR": str(home / "mpl"), "WANDB_DIR": str(home), "WANDB_CONFIG_DIR": str(home),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    drop = as_unprivileged_user if os.geteuid() == 0 else None  # root ignores permission bits
    if drop is not None:
        probe = ("import hydra, omegaconf, scalelong.cli, scalelong.config; "
                 f"open({str(ROOT / 'train.py')!r}).close(); open({str(ROOT / 'conf' / 'train.yaml')!r}).close()")
        try:
            proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=home, env=env,
                                  preexec_fn=drop, timeout=120)
            why = proc.stderr.strip().splitlines()[-1] if proc.returncode else None
        except OSError as err:
            why = str(err)
        if why:
            pytest.skip(f"user {NOBODY} cannot run this checkout's Python ({why}); the test drops to it because "
                        "root ignores permission bits")
    locked = shared_tmp / "locked"
    locked.mkdir()
    locked.chmod(mode)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=csv",
                           f"hydra.run.dir={locked / 'run'}"],
                          capture_output=True, text=True, cwd=home, env=env, preexec_fn=drop, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot create the run folder {locked / 'run'}: {locked} is not writable; choose another place "
        "with hydra.run.dir=... or run from a writable folder"]
    locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_the_run_folder_check_names_an_unwritable_folder_even_as_root(tmp_path, monkeypatch, capsys):
    """Where the test above cannot drop privileges: the same check, told by os.access that the
    folder is not writable (what it says to a user without write permission)."""
    from scalelong import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(SystemExit) as exit_:
        cli.check_output_folder([f"hydra.run.dir={locked / 'run'}", "train.max_steps=3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot create the run folder {locked / 'run'}: {locked} is not writable; choose another place "
        "with hydra.run.dir=... or run from a writable folder")
    assert list(locked.iterdir()) == []
    cli.check_output_folder([f"hydra.run.dir={tmp_path / 'free' / 'run'}"])  # a writable place passes


# --- the scripts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from scalelong.cli.train import train

    run = train(compose(["experiment=smoke", "logger=none", "train.max_steps=2"],
                        tmp_path_factory.mktemp("ckpt") / "run"))
    return run["checkpoint"]


def test_sample_script_on_a_full_disk(tmp_path, capsys, full_disk, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.png").write_bytes(b"previous grid")
    full_disk()
    line = run_script(capsys, "sample", [str(checkpoint), "--num", "2", "--steps", "2", "--device", "cpu",
                                         "--out", str(out / "s")])
    # The samples are written first: their file is the one named, and the old grid stays.
    assert line == f"error: cannot write {out}/s.npz {NO_SPACE}; no partial file is left. {FREE_SPACE}"
    assert (out / "s.png").read_bytes() == b"previous grid" and [p.name for p in out.iterdir()] == ["s.png"]


@pytest.mark.parametrize("full", ["s.npz", "s.png"])
def test_sample_script_replaces_the_grid_and_the_samples_together_or_not_at_all(tmp_path, capsys, full_disk,
                                                                                 checkpoint, full):
    """Either file filling the disk leaves the previous pair as it was: no new grid beside old samples."""
    (tmp_path / "s.png").write_bytes(b"previous grid")
    (tmp_path / "s.npz").write_bytes(b"previous samples")
    full_disk(full)
    line = run_script(capsys, "sample", [str(checkpoint), "--num", "2", "--steps", "2", "--device", "cpu",
                                         "--out", str(tmp_path / "s")])
    assert line == f"error: cannot write {tmp_path}/{full} {NO_SPACE}; the previous file is intact. {FREE_SPACE}"
    assert (tmp_path / "s.png").read_bytes() == b"previous grid"
    assert (tmp_path / "s.npz").read_bytes() == b"previous samples"
    assert temporaries(tmp_path) == []


def test_sample_script_writes_the_grid_and_the_samples(tmp_path, capsys, checkpoint):
    assert load_script("sample").main([str(checkpoint), "--num", "2", "--steps", "2", "--device", "cpu",
                                       "--out", str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 0
    assert np.load(tmp_path / "s.npz")["samples"].shape[0] == 2


def write_run(folder: Path) -> Path:
    """A run folder as report.py reads it: config.yaml and a CSV log."""
    (folder / "csv" / "version_0").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "unet", "preset": "tiny"},
                                                        "scaling": {"name": "none"}, "dataset": {"name": "digits"}}))
    rows = "".join(f"{s},{1 / (s + 1)},2.0\n" for s in range(0, 40, 10))
    (folder / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss,train/grad_norm\n" + rows)
    return folder


def test_report_script_on_a_full_disk(tmp_path, capsys, full_disk):
    run = write_run(tmp_path / "run")
    full_disk()
    line = run_script(capsys, "report", [str(run)])
    # The first file it writes is the loss plot; the folder is made, nothing in it.
    assert line == f"error: cannot write {run}/report/loss.png {NO_SPACE}; no partial file is left. {FREE_SPACE}"
    assert list((run / "report").iterdir()) == []


def test_report_script_keeps_the_previous_report(tmp_path, capsys, full_disk):
    run = write_run(tmp_path / "run")
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("# the previous report\n")
    full_disk("report.md")
    line = run_script(capsys, "report", [str(run), "--out", str(out)])
    assert line == f"error: cannot write {out}/report.md {NO_SPACE}; the previous file is intact. {FREE_SPACE}"
    assert (out / "report.md").read_text() == "# the previous report\n"
    assert sorted(p.name for p in out.iterdir()) == ["grads.png", "loss.png", "report.md"]  # each whole


def test_report_script_into_a_file_in_the_way(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    blocker = tmp_path / "rep"
    blocker.write_text("a file")
    line = run_script(capsys, "report", [str(run), "--out", str(blocker)])
    assert line == (f"error: cannot write {blocker}/loss.png ({blocker} is a file, not a folder); no partial file "
                    "is left. Choose another output folder")


def test_prepare_celeba64_on_a_full_disk(tmp_path, capsys, full_disk):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    names = ["000001.jpg", "000002.jpg"]
    for k, name in enumerate(names):
        Image.fromarray(np.full((218, 178, 3), 60 * k, np.uint8)).save(folder / name)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("".join(f"{n} 0\n" for n in names))
    out = tmp_path / "celeba32_train.npy"
    out.write_bytes(b"previous array")
    full_disk()
    line = run_script(capsys, "prepare_celeba64", ["--data-dir", str(tmp_path), "--size", "32", "--workers", "0"])
    assert line == f"error: cannot write {out} {NO_SPACE}; the previous file is intact. {FREE_SPACE}"
    assert out.read_bytes() == b"previous array" and temporaries(tmp_path) == []


def write_imagenet_folder(train: Path) -> None:
    for k, wnid in enumerate(["n01000000", "n02000000"]):
        (train / wnid).mkdir(parents=True)
        Image.fromarray(np.full((80, 70, 3), 90 * k, np.uint8)).save(train / wnid / f"{wnid}_0.JPEG")


@pytest.mark.parametrize("fills", ["imagenet32_folder_images.npy", "imagenet32_folder_labels.npy"])
def test_prepare_imagenet64_folder_on_a_full_disk(tmp_path, capsys, full_disk, fills):
    write_imagenet_folder(tmp_path / "train")
    full_disk(fills)
    line = run_script(capsys, "prepare_imagenet64", ["--source", "folder", "--data-dir", str(tmp_path),
                                                     "--size", "32", "--workers", "0"])
    assert line == f"error: cannot write {tmp_path / fills} {NO_SPACE}; no partial file is left. {FREE_SPACE}"
    assert not (tmp_path / fills).exists() and temporaries(tmp_path) == []


def write_npz_batches(folder: Path) -> None:
    folder.mkdir()
    for b in range(1, 11):
        np.savez(folder / f"train_data_batch_{b}.npz", data=np.full((2, 3 * 32 * 32), b, np.uint8),
                 labels=[1, 2], mean=np.zeros(3 * 32 * 32))


def test_prepare_imagenet64_npz_labels_on_a_full_disk(tmp_path, capsys, full_disk):
    write_npz_batches(tmp_path / "npz")
    full_disk("imagenet32_npz_labels.npy")
    line = run_script(capsys, "prepare_imagenet64", ["--source", "npz", "--data-dir", str(tmp_path),
                                                     "--npz-dir", str(tmp_path / "npz"), "--size", "32"])
    out = tmp_path / "imagenet32_npz_labels.npy"
    assert line == f"error: cannot write {out} {NO_SPACE}; no partial file is left. {FREE_SPACE}"
    assert not out.exists() and temporaries(tmp_path) == []


def test_prepare_imagenet64_npz_images_on_a_full_disk(tmp_path, capsys, full_disk):
    write_npz_batches(tmp_path / "npz")
    full_disk("imagenet32_npz_images.npy")
    line = run_script(capsys, "prepare_imagenet64", ["--source", "npz", "--data-dir", str(tmp_path),
                                                     "--npz-dir", str(tmp_path / "npz"), "--size", "32"])
    out = tmp_path / "imagenet32_npz_images.npy"
    assert line == f"error: cannot write {out} {NO_SPACE}; no partial file is left. {FREE_SPACE}"


@pytest.fixture
def linear_inception(monkeypatch):
    """Inception replaced by fid_helpers.LinearFeatures (a fixed random linear map), for speed."""
    from fid_helpers import LinearFeatures

    from scalelong.metrics import inception

    def load(mode="clean", path=None, device="cpu", *args, **kwargs):
        extractor = LinearFeatures(mode=mode)
        extractor.weights = SimpleNamespace(path=Path("linear.pt"), source="test", describe=lambda: "linear features")
        return extractor

    monkeypatch.setattr(inception, "load_inception", load)


def test_make_fid_stats_on_a_full_disk(tmp_path, capsys, full_disk, linear_inception):
    out = tmp_path / "stats" / "digits.npz"
    full_disk()
    line = run_script(capsys, "make_fid_stats", ["dataset=digits", "num=16", "device=cpu", "kid_max=16",
                                                 f"out={out}"])
    assert line == f"error: cannot write {out} {NO_SPACE}; no partial file is left. {FREE_SPACE}"
    assert list(out.parent.iterdir()) == []


def test_evaluate_on_a_full_disk_keeps_the_previous_fid_json(tmp_path, capsys, full_disk, linear_inception,
                                                             checkpoint):
    from fid_helpers import LinearFeatures

    from scalelong.data import load_digits_images
    from scalelong.metrics.reference import compute_reference, save_reference

    ref = tmp_path / "ref.npz"
    save_reference(ref, compute_reference(load_digits_images(16).images[:32], LinearFeatures(), {"dataset": "digits"},
                                          kid_max=32))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "fid.json").write_text('{"fid": 12.5}\n')
    full_disk("fid.json")
    line = run_script(capsys, "evaluate", [str(checkpoint), "--num", "4", "--steps", "2", "--sampler", "euler_ode",
                                           "--device", "cpu", "--chunk-size", "4", "--kid-max", "4", "--workers", "1",
                                           "--feature-batch", "4", "--ref", str(ref), "--out", str(out)])
    assert line == f"error: cannot write {out}/fid.json {NO_SPACE}; the previous file is intact. {FREE_SPACE}"
    assert json.loads((out / "fid.json").read_text()) == {"fid": 12.5}
    assert sorted(p.name for p in out.iterdir()) == ["fid.json", "grid.png", "samples_rank000.npz"]  # each whole
