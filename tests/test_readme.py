"""Every ``python train.py ...`` command of the README, as a user types it, at toy size.

Each command keeps its own overrides; appended after them (so they win) come only what makes it
small: 2 training steps, a tiny model of the same class, tiny sample grids, generated files in
the data set's real format, the CPU instead of a GPU. The quick evaluation stays on (8 samples,
real Inception). All commands but one run one after the other in a single driver process
(forked from warm_python's pre-imported interpreter). The GPU DDP lines (``trainer=ddp
dataset=cifar10`` and the DDP sweep) run there last, with trainer.devices=1: Lightning's DDP
strategy with a world of one, its code path and gloo process group included. A 2-rank launch
costs a second interpreter's imports; two ranks of a sweep's jobs are test_distributed.py's.
The CPU DDP line runs on its own as two gloo processes. Commands that need a cluster (SLURM
through submitit) are composed, not launched. A README line that stops working fails here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, load_script
from warm_python import run_warm
from PIL import Image
from test_extension import MODULE  # the README's example strategy, as the extension test writes it
from test_sweeps import check_optuna_search_over_kappa

from scalelong.utils.io import grid_image

README = ROOT / "README.md"
TOY = ["train.max_steps=2", "train.batch_size=4", "sample.every_n_steps=0", "sample.num=2", "sample.steps=2",
       "checkpoint.every_n_steps=0", "checkpoint.keep_every_n_steps=null", "trainer.log_every_n_steps=1"]
SHRINK = {"scalelong.models.UViT": ["model.depth=2", "model.embed_dim=16", "model.num_heads=2"],
          "scalelong.models.UNet": ["model.base_channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                                    "model.attn_resolutions=[]", "model.num_heads=1"]}


def readme_commands() -> list[str]:
    """The ``python train.py`` commands of the README: code-block lines and inline spans."""
    text = README.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        found += [line.split(" #", 1)[0].strip() for line in block.splitlines()
                  if line.strip().startswith("python train.py")]
    found += [" ".join(span.split()) for span in re.findall(r"`(python train\.py[^`]*)`", text)]
    return list(dict.fromkeys(found))


def test_the_readme_shows_the_commands_this_test_knows_about():
    commands = readme_commands()
    assert len(commands) >= 15 and "python train.py" in commands
    assert any("trainer=ddp" in c and "trainer.accelerator=cpu" in c for c in commands)  # the CPU DDP line
    assert any(c.startswith("python train.py -m") for c in commands)


def _data_overrides(name: str, root: Path) -> list[str]:
    """Generated files of a data set in its real format (made once per session)."""
    folder = root / name
    if name == "cifar10":
        if not folder.exists():
            from test_data_cifar10 import write_folder
            write_folder(folder)
        return [f"dataset.data_dir={folder}", "dataset.download=false"]
    if name == "celeba64":
        if not folder.exists():
            from test_data_celeba import write_celeba

            from scalelong.data.celeba import prepare_celeba64
            write_celeba(folder)
            prepare_celeba64(folder, progress=False)
        return [f"dataset.data_dir={folder}"]
    if name == "imagenet64":
        if not folder.exists():
            from test_data_imagenet import write_batches

            from scalelong.data.imagenet import prepare_imagenet64_npz
            prepare_imagenet64_npz(write_batches(folder / "npz"), folder, progress=False)
        return [f"dataset.data_dir={folder}"]
    if name == "mscoco":
        if not folder.exists():
            from test_data_coco import write_features
            write_features(folder)
        return [f"dataset.data_dir={folder}"]
    return []


def hydra_sweep(overrides: list[str]) -> tuple[str | None, dict[str, str], int | None, dict]:
    """What the composed ``hydra`` node says about sweeping: its mode (an experiment can make
    a plain command a sweep), the swept axes and values, and Optuna's number of trials; and the
    rest of the composition, resolved (``compose(overrides)``'s result, from the same pass)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[*overrides, "run_dir=."], return_hydra_config=True)
        params, mode, trials = cfg.hydra.sweeper.get("params"), cfg.hydra.get("mode"), cfg.hydra.sweeper.get("n_trials")
        axes = OmegaConf.to_container(params) if params else {}
        with open_dict(cfg):
            del cfg["hydra"]
        run = OmegaConf.to_container(cfg, resolve=True)
    return mode.name if mode is not None else None, axes, trials, run


def toy_command(command: str, work: Path, ext: Path, run: Path) -> tuple[list[str], str]:
    """(argv after ``python``, how it is run: "run", "ddp" (two processes), "ddp1" (DDP with a world
    of one, in-process) or "compose") for a README command."""
    args = command.split()[2:]
    args = [a for a in args if a != "..."]
    args = [a.replace("<run>", run.name).replace("file:///abs/path/my_conf", f"file://{ext / 'my_conf'}")
            for a in args]
    multirun = "-m" in args
    overrides = [a for i, a in enumerate(args) if a != "-m" and not a.startswith("--")
                 and not (i > 0 and args[i - 1] == "--cfg")]
    # What the command composes to decides what makes it small (sweeps: their first choice;
    # the strategy and Hydra's own settings do not matter for that).
    first = [re.sub(r"=([^=\[]*?),.*$", r"=\1", o) if "," in o and "[" not in o else o for o in overrides
             if not o.startswith(("hydra.", "scaling"))]
    mode_of_hydra, axes, trials, composed = hydra_sweep(first)
    # A sweep its experiment defines (the study, the paper comparison): the first choice of each
    # axis the command does not set (their own tests run them over several choices).
    chosen = []
    for key, values in ({} if trials else axes).items():
        if not any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides):
            choice = str(values).split(",")[0].strip()
            if choice.startswith("glob("):
                choice = sorted(p.stem for p in (ROOT / "conf" / key).glob("*.yaml"))[0]
            chosen.append(f"{key}={choice}")
    cfg = compose(first + chosen, work) if chosen else composed  # the chosen cell's model decides the shrinking
    extra = list(TOY) + SHRINK.get(cfg["model"]["_target_"], [])
    extra += _data_overrides(cfg["dataset"]["name"], work / "data")
    if cfg.get("quick_eval"):  # kept on where the README shows it: the quickstart, alone and under DDP
        shown = command == "python train.py" or "trainer.accelerator=cpu" in command
        extra.append("quick_eval.num=8" if shown else "quick_eval=null")
    if (cfg.get("callbacks") or {}).get("fid"):
        extra.append(f"callbacks.fid.ref={work / 'fid_stats' / (cfg['dataset']['name'] + '.npz')}")
    extra += ["hydra.sweeper.n_trials=2"] if trials else chosen
    mode = "run"
    if cfg["trainer"]["accelerator"] != "cpu":
        extra.append("trainer.accelerator=cpu")
    if cfg["trainer"].get("strategy") == "ddp" or cfg["trainer"]["devices"] not in (1, "1"):
        if "trainer.accelerator=cpu" in command:  # the CPU DDP line: 2 ranks, as typed
            extra.append("trainer.devices=2")
            mode = "ddp"
        else:  # a GPU node's DDP line (or sweep): the DDP strategy on one CPU process
            extra.append("trainer.devices=1")
            mode = "ddp1"
    if any(a.startswith("cluster=") for a in args):
        mode = "compose"  # submitit would submit the jobs to SLURM
    if command == "python train.py":  # the default run folder, which resume=outputs/runs/<run> continues
        pass
    elif "resume=" not in command:  # a run of its own (a resumed run continues in its folder)
        sweeps = multirun or mode_of_hydra == "MULTIRUN"
        key = "hydra.sweep.dir" if sweeps else "hydra.run.dir"
        extra.append(f"{key}={work / 'runs' / re.sub(r'[^A-Za-z0-9]+', '_', command)[:80]}")
    else:
        extra.append("train.max_steps=3")
    flags = [a for i, a in enumerate(args) if a.startswith("--") or (i > 0 and args[i - 1] == "--cfg")]
    plain = [a for a in args if a not in flags]
    if mode == "compose":  # Hydra takes --cfg instead of -m, and one value per key
        single = [re.sub(r"=([^=\[]*?),.*$", r"=\1", a) for a in plain if a != "-m"]
        return ["train.py", *single, *extra, "--cfg", "job"], mode
    return ["train.py", *plain, *extra, *flags], mode


def logged_steps(run: Path) -> list[int]:
    steps = []
    for path in run.glob("csv/version_*/metrics.csv"):
        with open(path) as f:
            steps += [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    return steps


DRIVER = textwrap.dedent('''
    import glob, json, sys, time
    from scalelong.cli import train as cli_train
    results, path = [], sys.argv[1]
    for argv in json.load(open(path)):
        runs = sorted(glob.glob("outputs/runs/*_digits_unet_none"))
        argv = [a.replace("outputs/runs/RUN", runs[0] if runs else "outputs/runs/RUN") for a in argv]
        sys.argv = argv
        t0 = time.perf_counter()
        try:
            code = cli_train.main() or 0
        except SystemExit as exit_:
            code = exit_.code or 0
        results.append({"argv": argv, "code": code})
        print(f"README COMMAND {code} {time.perf_counter() - t0:.1f}s", " ".join(argv[1:])[:90], flush=True)
    json.dump(results, open(path + ".out", "w"))
''')


@pytest.mark.slow
def test_every_train_command_of_the_readme_runs(tmp_path):
    work = tmp_path
    ext = tmp_path / "ext"
    (ext / "my_conf" / "scaling").mkdir(parents=True)
    (ext / "my_ext.py").write_text(textwrap.dedent(MODULE))
    (ext / "my_conf" / "scaling" / "half.yaml").write_text("_target_: my_ext.HalfScaling\nname: half\nfactor: 0.5\n")
    env = {**os.environ, "PYTHONPATH": f"{ext}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    commands = readme_commands()
    assert commands.index("python train.py") < next(i for i, c in enumerate(commands) if "resume=" in c)
    run = "RUN"  # `resume=outputs/runs/<run>`: the folder the quickstart line made, known once it ran
    plans = [(command, *toy_command(command, work, ext, Path(run))) for command in commands]
    # In README order; the DDP runs with a world of one last (their gloo process group stays up).
    in_process = [[str(ROOT / argv[0]), *argv[1:]] for _, argv, mode in plans if mode not in ("ddp", "ddp1")]
    in_process += [[str(ROOT / argv[0]), *argv[1:]] for _, argv, mode in plans if mode == "ddp1"]
    assert len(in_process) == len(plans) - 1  # all but the CPU DDP line
    (work / "commands.json").write_text(json.dumps(in_process))
    (work / "driver.py").write_text(DRIVER)
    driver = run_warm([work / "driver.py", work / "commands.json"], cwd=work, env=env, timeout=900)
    print("\n".join(line for line in driver.stdout.splitlines() if line.startswith("README COMMAND")))
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads((work / "commands.json.out").read_text())
    failed = [" ".join(r["argv"][1:]) for r in results if r["code"] != 0]
    assert not failed, f"README commands that failed: {failed}\n{driver.stderr[-3000:]}"
    # The quickstart line made one folder named after what it trains, with its checkpoint and the
    # KID/FID at the end; the resume line continued in that folder and made no new one.
    runs = list((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_digits_unet_none"), runs
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file() and (runs[0] / "config.yaml").is_file()
    quick = json.loads((runs[0] / "quick_eval.json").read_text())
    assert quick["num"] == 8 and (quick["drawn_size"], quick["size"]) == (8, 16)  # drawn at 8x8, scored at 16x16
    # ... and the samples' legibility beside the real digits', printed and saved, per sample too.
    assert re.search(r"Legibility: \d of 8 samples read as a digit .* \(real digits 0\.\d\d, ", driver.stdout)
    readable = quick["legibility"]
    assert readable["num"] == 8 and sum(readable["class_counts"]) == 8 and len(readable["per_sample"]["class"]) == 8
    assert readable["real_digits"]["mean_confidence"] > 0.85 and readable["real_digits"]["num"] == 297
    assert torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    # The Optuna search over kappa: its trials and results (test_sweeps.py's checks, on this run).
    optuna = next((argv for command, argv, mode in plans if command == "python train.py hparams_search=kappa"), None)
    assert optuna is not None, "the README's Optuna line is gone: test_sweeps.py's search needs a launch of its own"
    check_optuna_search_over_kappa(Path(next(a.split("=", 1)[1] for a in optuna
                                             if a.startswith("hydra.sweep.dir="))))

    for command, argv, mode in plans:
        if mode != "ddp":
            continue
        proc = run_warm([ROOT / argv[0], *argv[1:]], cwd=work, env=env, timeout=600)
        print("DDP", command, flush=True)
        assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{command}:\n{proc.stderr[-3000:]}"
    # The DDP sweep ran each job once, in its own folder, and left no other run folders.
    sweep_argv = next(argv for command, argv, mode in plans if mode == "ddp1" and "-m" in argv)
    sweep = Path(next(a.split("=", 1)[1] for a in sweep_argv if a.startswith("hydra.sweep.dir=")))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    for job, scaling in zip(jobs, ["none", "constant"]):
        assert f"name: {scaling}" in (job / "config.yaml").read_text()
        assert sorted(logged_steps(job)) == [0, 1]  # two steps, logged once each: one run per job
    assert len(list((work / "outputs" / "runs").iterdir())) == 1  # still only the quickstart's folder
    # The GPU node's DDP line ran under the DDP strategy (a world of one here) to its last step.
    for command, argv, mode in plans:
        if mode == "ddp1" and "-m" not in argv:
            folder = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
            assert "_target_: pytorch_lightning.strategies.DDPStrategy" in (folder / "config.yaml").read_text(), command
            assert json.loads((folder / "metrics.json").read_text())["step"] == 2, command
    # The CPU DDP quickstart ran with its KID/FID at the end, on both ranks, written once.
    ddp_quickstart = next(argv for command, argv, mode in plans if "trainer.accelerator=cpu" in command)
    folder = Path(next(a.split("=", 1)[1] for a in ddp_quickstart if a.startswith("hydra.run.dir=")))
    quick = json.loads((folder / "quick_eval.json").read_text())
    assert quick["num"] == 8 and quick["world_size"] == 2 and quick["kid"] is not None
    # every sample's reading came back from its rank (a softmax's largest value is at least 0.1)
    assert min(quick["legibility"]["per_sample"]["confidence"]) >= 0.1
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["eval/legibility"] == pytest.approx(quick["legibility"]["mean_confidence"])
    # Its final.png is the grid of all 8 scored samples (both ranks' shares), and no other grid
    # was sampled.
    assert [p.name for p in (folder / "samples").iterdir()] == ["final.png"]
    with Image.open(folder / "samples" / "final.png") as final:
        assert final.size == grid_image(torch.zeros(8, 1, 16, 16, dtype=torch.uint8)).size
    # sample.py on its checkpoint: the samples as the network drew them (8x8), their grid as the
    # run's final.png shows them (16x16, quick_eval.size)
    out = work / "sampled" / "s"
    assert load_script("sample").main([str(folder / "checkpoints" / "last.ckpt"), "--num", "4", "--steps", "2",
                                       "--device", "cpu", "--out", str(out)]) == 0
    assert np.load(out.with_suffix(".npz"))["samples"].shape == (4, 8, 8, 1)
    with Image.open(out.with_suffix(".png")) as grid:
        assert grid.size == grid_image(torch.zeros(4, 1, 16, 16, dtype=torch.uint8)).size
