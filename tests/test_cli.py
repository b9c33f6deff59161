"""The command line: bad input gives one readable line, a non-zero exit and no run folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_in_one_process


# Commands that stop before training run one after the other in one fresh process per group
# (conftest.run_in_one_process): what each would cost on its own is the interpreter's imports.
BAD_SCALING = [
    (["scaling.name=lernable"], "valid strategies: none, sqrt2, constant, learnable, learnable_nonshared"),
    (["scaling=constant", "scaling.kappa=0"], "kappa must lie in (0, 1], got 0"),
    (["scaling=constant", "scaling.kappa=1.5"], "kappa must lie in (0, 1], got 1.5"),
    (["train.lr_decay=exponential"], "train.lr_decay='exponential' is not a schedule; give null (constant after "
                                     "the warm-up, the paper's), cosine or linear"),
    (["train.min_snr_gamma=0"], "train.min_snr_gamma=0: give a positive number (5 in the min-SNR paper) to weight "
                                "the loss by min(SNR, gamma) / SNR, or null for the plain loss"),
    # sizes the config's resolvers cannot work with: the key, the problem, what to set instead
    (["model=uvit", "dataset.image_size=7"], "model.patch_size: an image of 7x7 does not cut into 4x4 patches; "
                                             "set model.patch_size"),
    (["dataset.image_size=0"], "diffusion.snr_shift: image sizes must be positive, got 0 and 16; "
                               "set diffusion.snr_shift"),
    # the 16x16 preset on the quickstart's 8x8 digits: 2 x 2 patches of 4 and the time token
    (["model=uvit_tiny", "scaling=learnable"], "the token gate needs at least 16 tokens (got 5); use smaller patches "
                                               "(model.patch_size) for more tokens, or scaling.gate=channel"),
]


@pytest.fixture(scope="module")
def bad_scaling_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_scaling")
    runs = [work / f"run{k}" for k in range(len(BAD_SCALING))]
    procs = run_in_one_process([[str(ROOT / "train.py"), f"hydra.run.dir={run}", *overrides]
                                for run, (overrides, _) in zip(runs, BAD_SCALING)], cwd=work)
    return list(zip(procs, runs))


@pytest.mark.parametrize("case", range(len(BAD_SCALING)))
def test_bad_scaling_is_one_line_and_leaves_no_run_folder(bad_scaling_runs, case):
    proc, run_dir = bad_scaling_runs[case]
    expected = BAD_SCALING[case][1]
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def one_error_line(proc) -> str:
    """The ``error:`` line of a run that stopped at once: the only one, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("args, expected", [
    (["scaling=lernable"], "error: unknown scaling=lernable; valid choices: constant, learnable, learnable_nonshared, "
                           "learnable_scalar, mp_cat, none, sqrt2; did you mean scaling=learnable?"),
    (["dataset=cifar"], "error: unknown dataset=cifar; valid choices: celeba64, cifar10, digits, imagenet64, mscoco; "
                        "did you mean dataset=cifar10?"),
    (["model=vit"], "did you mean model=uvit?"),
    (["-m", "scaling=none,lernable"], "error: unknown scaling=lernable;"),
])
def test_an_unknown_group_option_is_one_line_with_the_choices(tmp_path, args, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    line = one_error_line(proc)
    assert expected in line
    assert [line.strip() for line in proc.stderr.splitlines() if line.strip()] == [line]  # nothing else
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_hydras_full_message_stays_available(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "scaling=lernable"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Could not find 'scaling/lernable'" in proc.stderr


MISSING_DATA = [
    ("cifar10", "nowhere", "could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    ("celeba64", "", "no folder given for CelebA: set dataset.data_dir="),
    ("imagenet64", "nowhere", "ImageNet 64x64 is not prepared"),
    ("mscoco", "nowhere", "MS-COCO 256 features not found"),
]


@pytest.fixture(scope="module")
def missing_data_runs(tmp_path_factory):
    # W&B offline, as by default; no network here, and where there is one, a proxy that refuses
    # stands in for it (CIFAR10's download).
    env = {**os.environ, "WANDB_MODE": "offline", "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    work = tmp_path_factory.mktemp("missing_data")
    cases = [work / f"case{k}" for k in range(len(MISSING_DATA))]
    commands = []
    for case, (dataset, data_dir, _) in zip(cases, MISSING_DATA):
        case.mkdir()
        folder = str(case / data_dir) if data_dir else ""
        commands.append([str(ROOT / "train.py"), f"dataset={dataset}", f"dataset.data_dir={folder}",
                         f"hydra.run.dir={case / 'run'}"])
    return list(zip(run_in_one_process(commands, cwd=work, env=env), cases))


@pytest.mark.parametrize("case", range(len(MISSING_DATA)), ids=[d for d, _, _ in MISSING_DATA])
def test_missing_data_stops_before_any_logger_or_run_folder(missing_data_runs, case):
    """Offline CIFAR10, or a data set that is not there: one line, exit 2, no run folder and no W&B
    run, before Lightning is even imported."""
    proc, folder = missing_data_runs[case]
    assert MISSING_DATA[case][2] in one_error_line(proc)
    assert not (folder / "run").exists() and not list(folder.parent.rglob("wandb"))


def test_precision_follows_the_accelerator_unless_set():
    from conftest import compose

    assert compose(["trainer=ddp", "trainer.accelerator=cpu"])["trainer"]["precision"] == "32-true"
    assert compose(["trainer=gpu"])["trainer"]["precision"] == "bf16-mixed"
    assert compose(["trainer=ddp", "gpu_precision=16-mixed"])["trainer"]["precision"] == "16-mixed"
    assert compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed"])["trainer"][
        "precision"] == "bf16-mixed"


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={blocker / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot create the run folder {blocker / 'run'}: {blocker} is a file, not a folder; "
        "choose another place with hydra.run.dir=..."]


def test_a_runs_first_screen_holds_no_third_party_noise(tmp_path):
    """What a run prints is what it does: no advert for Lightning's cloud logger, no deprecation
    that Lightning 2.6 raises inside torch 2.14, no W&B warning about an `anonymous` setting
    Lightning passes (all three were in the quickstart's first screen)."""
    from warm_python import run_warm

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "false"}
    out = run_warm([ROOT / "train.py", "experiment=smoke", "logger=wandb", "train.max_steps=2",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout + out.stderr
    assert "accelerator: cpu" in printed and "wandb: Run data is saved locally" in printed  # what it does stays
    for noise in ("litlogger", "LeafSpec", "anonymous"):
        assert noise not in printed, noise
