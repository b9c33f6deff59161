"""What a run logs to W&B, read back from its offline run with W&B's own reader of the run's
``.wandb`` transaction log (``wandb leet inspect --json``, wandb-core's inspector): the group of a
sweep's jobs, tags, the config's dotted columns, and the ``result/*`` summary at the end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose
from fid_helpers import LinearFeatures

from scalelong.cli.train import train
from scalelong.training.loggers import flat_config, run_summary, sweep_group


def read_offline_run(run_dir: Path) -> dict:
    """The W&B run under ``run_dir/wandb/offline-run-*``: its attributes, config and final summary,
    folded from the records W&B's inspector prints (a summary record updates some keys)."""
    (offline,) = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run, config, summary, exit_code = {}, {}, {}, None
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if record["type"] == "run":
            run = record["run"]
            config.update((run.get("config") or {}).get("update") or {})
        elif record["type"] == "config":
            config.update(record["config"].get("update") or {})
        elif record["type"] == "summary":
            summary.update(record["summary"].get("update") or {})
        elif record["type"] == "exit":
            exit_code = record["exit"].get("exit_code", 0)
    return {"id": run.get("run_id"), "name": run.get("display_name"), "group": run.get("run_group"),
            "job_type": run.get("job_type"), "tags": run.get("tags", []), "config": config, "summary": summary,
            "exit_code": exit_code}


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory):
    from scalelong.data import load_digits_images
    from scalelong.metrics.reference import compute_reference, save_reference

    path = tmp_path_factory.mktemp("ref") / "digits_clean_train_16.npz"
    save_reference(path, compute_reference(load_digits_images(16).images[:64], LinearFeatures(),
                                           {"dataset": "digits"}, kid_max=64))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ref_path):
    """Two jobs of a sweep, as Hydra's basic launcher lays them out (multirun.yaml in the sweep
    folder, a folder per job), trained in this process with W&B offline: ``none`` for 2 steps, and
    ``constant`` (kappa 0.5) for 4 steps with FID every 2 steps (a fake feature extractor) and a
    target FID that any FID reaches."""
    root = tmp_path_factory.mktemp("wandb")
    folder = root / "kappa_study"
    folder.mkdir()
    (folder / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    fid = {"fid": {"_target_": "scalelong.training.fid_callback.FIDCallback", "every_n_steps": 2, "num_samples": 6,
                   "sampler": "euler_ode", "steps": 2, "ref": str(ref_path), "chunk_size": 4, "kid_max": 6,
                   "verbose": False, "feature_extractor": {"_target_": "fid_helpers.LinearFeatures"}}}
    jobs = {"0_none": (["scaling=none", "train.max_steps=2"], {}),
            "1_constant": (["scaling=constant", "scaling.kappa=0.5", "train.max_steps=4",
                            "logger.wandb.target_fid=1e9"], fid)}
    configs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / var.lower()))
        for name, (overrides, callbacks) in jobs.items():
            configs[name] = compose(["experiment=smoke", "model=uvit", "model.depth=4", "logger=wandb",
                                     *overrides], folder / name)
            configs[name]["callbacks"] = callbacks
            train(configs[name])
    return folder, configs


def test_the_jobs_of_a_sweep_share_its_group_with_tags_and_config_columns(sweep):
    folder, configs = sweep
    for name, strategy in (("0_none", "none"), ("1_constant", "constant")):
        run = read_offline_run(folder / name)
        assert run["id"] == (folder / name / "wandb_id.txt").read_text().strip()
        assert (run["name"], run["group"], run["job_type"], run["exit_code"]) == (name, "kappa_study", "train", 0)
        assert run["tags"] == ["dataset:digits", "backbone:uvit", f"scaling:{strategy}"]
        # W&B shows the nested config as dotted columns: the swept parameters are plain columns.
        columns = flat_config({k: v for k, v in run["config"].items() if k != "_wandb"})
        assert columns["scaling.name"] == strategy
        assert columns["model.depth"] == configs[name]["model"]["depth"] == 4
        assert columns["optim.lr"] == configs[name]["optim"]["lr"] == pytest.approx(3e-3)
        assert columns.get("scaling.kappa") == (0.5 if strategy == "constant" else None)


def test_each_run_ends_with_its_results_as_summary_values(sweep):
    folder, _ = sweep
    run = read_offline_run(folder / "0_none")
    results = {k: v for k, v in run["summary"].items() if k.startswith("result/")}
    # no FID measured: steps and skipped steps only
    assert results == {"result/steps": 2, "result/nonfinite_skipped": 0, "result/overflow_skipped": 0}
    metrics = json.loads((folder / "0_none" / "metrics.json").read_text())
    assert run["summary"]["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-6)


def test_fid_results_and_the_steps_to_a_target_reach_the_summary(sweep):
    folder, _ = sweep
    history = json.loads((folder / "1_constant" / "fid_history.json").read_text())
    assert [e["step"] for e in history] == [2, 4]
    best = min(history, key=lambda e: (e["fid"], e["step"]))
    best_kid = min(history, key=lambda e: (e["kid"], e["step"]))
    s = read_offline_run(folder / "1_constant")["summary"]
    assert s["result/fid_final"] == pytest.approx(history[-1]["fid"], rel=1e-9)
    assert s["result/kid_final"] == pytest.approx(history[-1]["kid"], rel=1e-9)
    assert (s["result/fid_best"], s["result/fid_best_step"]) == (pytest.approx(best["fid"], rel=1e-9), best["step"])
    assert (s["result/kid_best"], s["result/kid_best_step"]) == (pytest.approx(best_kid["kid"], rel=1e-9),
                                                                 best_kid["step"])
    # any FID is below 1e9: the first evaluation reaches it
    assert (s["result/target_fid"], s["result/target_fid_reached"], s["result/steps_to_target_fid"]) == (1e9, True, 2)
    assert (s["result/steps"], s["result/nonfinite_skipped"]) == (4, 0)
    assert s["eval/fid"] == pytest.approx(history[-1]["fid"], rel=1e-6)  # logged during the run too


def test_the_dashboard_compares_the_offline_sweep(sweep, tmp_path, capsys):
    """The dashboard's definition, written offline from the same folders, names these W&B runs."""
    pytest.importorskip("wandb_workspaces")
    from scalelong.cli.dashboard import main

    folder, _ = sweep
    out = tmp_path / "dashboard.json"
    assert main([str(folder), "--dry-run", "--out", str(out)]) == 0
    blocks = json.loads(out.read_text())["blocks"]
    runset = blocks[2]["runsets"][0]
    assert runset["filters"] == "Metric(\"Group\") == 'kappa_study'"
    ids = [(folder / n / "wandb_id.txt").read_text().strip() for n in ("0_none", "1_constant")]
    assert {k: v["color"] for k, v in runset["run_settings"].items()} == {ids[0]: "#1f77b4", ids[1]: "#ff7f0e"}
    assert {"config:model.value.depth", "summary:result/fid_best"} <= set(runset["pinned_columns"])
    fid_plot = blocks[[b.get("text") for b in blocks].index("eval/") + 2]["panels"][0]
    assert (fid_plot["title"], fid_plot["y"], fid_plot["x"]) == ("FID against step", ["eval/fid"],
                                                                 "trainer/global_step")
    assert "dry run: nothing sent to W&B" in capsys.readouterr().out


def test_run_summary_names_each_measure_and_says_when_a_target_is_missed():
    history = [{"step": 10, "fid": 30.0, "kid": 0.3}, {"step": 20, "fid": float("nan"), "kid": None},
               {"step": 30, "fid": 20.0, "kid": 0.1}, {"step": 40, "fid": 25.0, "kid": 0.2}]
    out = run_summary([(history, "fd_digits", "kd_digits")], {"train/nonfinite_skipped": 3.0,
                                                               "eval/quick_fid": 80.5, "eval/quick_kid": math.nan},
                      40, target_fid=10.0)
    assert out == {"result/steps": 40, "result/nonfinite_skipped": 3, "result/overflow_skipped": 0,
                   "result/fd_digits_final": 25.0, "result/fd_digits_best": 20.0, "result/fd_digits_best_step": 30,
                   "result/kd_digits_final": 0.2, "result/kd_digits_best": 0.1, "result/kd_digits_best_step": 30,
                   "result/target_fd_digits": 10.0, "result/target_fd_digits_reached": False,
                   "result/quick_fid": 80.5}


def test_a_run_is_grouped_only_as_a_job_of_a_sweep(tmp_path):
    basic = tmp_path / "2026-01-01_00-00-00" / "0_none"
    basic.mkdir(parents=True)
    (basic.parent / "multirun.yaml").write_text("{}\n")
    assert sweep_group(basic) == "2026-01-01_00-00-00"
    optuna = tmp_path / "opt" / "3_scaling.kappa=0.7"  # no multirun.yaml; the job's own hydra.yaml says it
    (optuna / ".hydra").mkdir(parents=True)
    (optuna / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n  job:\n    num: 3\n")
    assert sweep_group(optuna) == "opt"
    single = tmp_path / "runs" / "2026-01-01_digits_unet_none"
    (single / ".hydra").mkdir(parents=True)
    (single / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: RUN\n")
    assert sweep_group(single) is None
