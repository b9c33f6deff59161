"""The in-training FID callback: history file, logged metrics, best checkpoint chosen from the file.

A fixed random linear map stands in for Inception (``fid_helpers.LinearFeatures``) so a run of a
few steps stays fast; the real network is tested in test_fid_inception.py.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose
from fid_helpers import LinearFeatures

from scalelong.utils.errors import DataError
from scalelong.cli.train import train
from scalelong.training.fid_callback import FIDCallback, best_entry, read_history


def fid_config(run_dir, ref, **over):
    cfg = compose(["experiment=smoke", "logger=csv", "train.max_steps=4"], run_dir)
    cfg["callbacks"] = {"fid": {"_target_": "scalelong.training.fid_callback.FIDCallback", "every_n_steps": 2,
                                "num_samples": 6, "sampler": "euler_ode", "steps": 2, "ref": str(ref),
                                "chunk_size": 4, "kid_max": 6, "verbose": False,
                                "feature_extractor": {"_target_": "fid_helpers.LinearFeatures"}, **over}}
    return cfg


def test_fid_every_k_steps_history_logs_and_best_checkpoint(tmp_path, ref_path):
    run = tmp_path / "run"
    result = train(fid_config(run, ref_path))
    history = json.loads((run / "fid_history.json").read_text())
    assert [e["step"] for e in history] == [2, 4]
    for e in history:
        assert {"step", "fid", "kid", "num", "sampler", "steps"} <= set(e)
        assert e["num"] == 6 and e["sampler"] == "euler_ode" and e["steps"] == 2 and e["fid"] >= 0
        assert e["inception_sha1"] == LinearFeatures().sha1 and e["ref"] == str(ref_path)
    best = best_entry(history)
    ckpt = torch.load(run / "checkpoints" / "best_fid.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == best["step"]
    assert result["metrics"]["eval/fid"] == pytest.approx(history[-1]["fid"], rel=1e-6)
    logged = {}
    for path in run.glob("csv/version_*/metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("eval/fid"):
                    logged[int(row["step"])] = float(row["eval/fid"])
    assert sorted(logged) == [2, 4] and logged[4] == pytest.approx(history[-1]["fid"], rel=1e-6)
    assert not list(run.glob(".*.tmp"))


def test_the_best_checkpoint_is_decided_from_the_history_file(tmp_path, ref_path):
    run = tmp_path / "run"
    run.mkdir()
    # An earlier (resumed-from) evaluation that nothing can beat: no new evaluation is the best.
    (run / "fid_history.json").write_text(json.dumps([{"step": 1, "fid": 0.0, "kid": 0.0, "num": 6,
                                                       "sampler": "euler_ode", "steps": 2}]))
    train(fid_config(run, ref_path, every_n_steps=4))
    history = read_history(run / "fid_history.json")
    assert [e["step"] for e in history] == [1, 4]
    assert not (run / "checkpoints" / "best_fid.ckpt").exists()


def test_missing_reference_stops_before_training_with_the_fix(tmp_path):
    cfg = fid_config(tmp_path / "run", tmp_path / "missing.npz")
    with pytest.raises(DataError, match="make_fid_stats.py dataset=digits"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_reference_computes_missing_statistics(tmp_path):
    ref = tmp_path / "stats" / "digits_clean_train_16.npz"
    run = tmp_path / "run"
    train(fid_config(run, ref, build_reference=True, every_n_steps=4))
    assert ref.is_file() and ref.with_suffix(".json").is_file()
    assert read_history(run / "fid_history.json")[0]["ref"] == str(ref)


def test_bad_sampler_is_a_config_error():
    from scalelong.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="valid"):
        FIDCallback(sampler="nope")


def test_fid_config_group_composes():
    cfg = compose(["callbacks=fid"])["callbacks"]["fid"]
    assert cfg["_target_"] == "scalelong.training.fid_callback.FIDCallback"
    assert (cfg["every_n_steps"], cfg["num_samples"], cfg["sampler"], cfg["steps"]) == (50000, 10000, "dpm_solver", 50)


# Under two-process DDP (two gloo ranks share the samples, log once, write one history and save the
# best together): test_distributed.py::test_two_process_ddp_matches_one_process, whose two-rank
# run carries this callback.
