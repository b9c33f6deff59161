"""The report (scripts/report.py, scalelong-report) on small synthetic run folders: numbers, speed-ups, plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    """The report's functions and the command's ``main`` (``scripts/report.py`` runs it)."""
    from types import SimpleNamespace

    from scalelong.analysis.report import write_report
    from scalelong.analysis.runs import read_metrics
    from scalelong.cli.report import main

    return SimpleNamespace(main=main, read_metrics=read_metrics, write_report=write_report)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def make_run(root: Path, name: str, scaling: dict, depth: int, feature: float, fid=None, resumed_at=None,
             nonfinite=None) -> Path:
    """A run of 100 steps whose measured values are ``feature`` from step 50 on (2x before)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"backbone": "uvit", "preset": "uvit_tiny", "options": {"depth": depth}},
              "scaling": scaling, "dataset": {"name": "digits"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    n = depth // 2
    blocks = [f"in_{k:02d}" for k in range(n)] + ["mid"] + [f"out_{k:02d}" for k in range(n)]
    rows = []
    for step in range(0, 101, 10):
        value = feature if step >= 50 else 2 * feature
        row = {"step": step, "epoch": 0, "grads/total": value / 10, "loss/rolling_std": value / 100,
               "train/loss": 0.5, "robustness/t0.5": value / 20}
        row.update({f"features/{b}": value for b in blocks})
        row.update({f"features/{b}_std": 0.1 for b in blocks})
        row.update({f"skips/lsc{i}_after": value for i in range(1, n + 1)})
        row.update({f"scaling/lsc{i}": 0.5 ** (i - 1) for i in range(1, n + 1)})
        if nonfinite is not None:
            row["train/nonfinite_skipped"] = nonfinite if step == 100 else 0
        rows.append(row)
    if scaling["name"] != "learnable":
        rows.insert(0, {"step": 0, **{f"theory/sum_kappa2_lsc{i}": float(n - i + 1) for i in range(1, n + 1)}})
    if resumed_at is None:
        write_csv(run / "csv" / "version_0" / "metrics.csv", rows)
    else:
        # The first attempt logged wrong values (999) past the checkpoint; the resumed version
        # starts again at ``resumed_at`` and must replace them.
        stale = [dict(r, **{"features/mid": 999.0}) if r["step"] >= resumed_at else r for r in rows]
        write_csv(run / "csv" / "version_0" / "metrics.csv", [r for r in stale if r["step"] <= 80])
        write_csv(run / "csv" / "version_1" / "metrics.csv", [r for r in rows if r["step"] >= resumed_at])
    if fid is not None:
        (run / "fid_history.json").write_text(json.dumps([{"step": s, "fid": f, "num": 1000} for s, f in fid]))
    return run


@pytest.fixture
def multirun(tmp_path):
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    make_run(root, "0_scaling=none", {"name": "none"}, 12, 10.0,
             fid=[(20, 50.0), (40, 30.0), (60, 20.0), (80, 15.0), (100, 12.0)])
    make_run(root, "2_scaling=constant", {"name": "constant", "kappa": 0.5}, 12, 4.0,
             fid=[(20, 40.0), (40, 20.0), (60, 12.0), (80, 10.0), (100, 9.0)], resumed_at=60)
    make_run(root, "4_scaling=learnable", {"name": "learnable", "kappa": 0.5, "gate": None}, 12, 5.0,
             fid=[(20, 45.0), (40, 25.0), (60, 18.0), (80, 14.0), (100, 13.0)], nonfinite=3)
    make_run(root, "10_scaling=sqrt2", {"name": "sqrt2"}, 12, 7.0,
             fid=[(20, 45.0), (40, 25.0), (60, 16.0), (80, 12.0), (100, 11.0)])
    make_run(root, "1_scaling=none", {"name": "none"}, 16, 12.0)  # a deeper model, no FID
    return root


def table_rows(text: str) -> dict[str, list[str]]:
    """Summary table rows by run id (first cell)."""
    section = text.split("## Summary", 1)[1].split("##", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| #")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_report_on_a_multirun_folder(report, multirun):
    assert report.main([str(multirun)]) == 0
    out = multirun / "report"
    text = (out / "report.md").read_text()
    rows = table_rows(text)
    head = [c.strip() for c in text.split("## Summary", 1)[1].split("\n")[2].strip("|").split("|")]
    col = {name: i for i, name in enumerate(head)}

    assert set(rows) == {"#0", "#1", "#2", "#4", "#10"}
    assert rows["#0"][col["model"]] == "U-ViT 13 blocks, digits"
    assert rows["#1"][col["model"]] == "U-ViT 17 blocks, digits"
    assert rows["#2"][col["strategy"]] == "constant κ=0.5" and rows["#4"][col["strategy"]] == "learnable"
    # The last half of training (steps 50..100) only: the 2x values before step 50 are left out.
    assert rows["#0"][col["feature norm (mean of blocks)"]] == "10.00 ± 0"
    assert rows["#0"][col["grad norm"]] == "1.00 ± 0"
    assert rows["#0"][col["robustness t=0.5"]] == "0.5000 ± 0"
    # The resumed run's second version replaces the first one's stale values from step 60 on.
    assert rows["#2"][col["feature norm (mid)"]] == "4.00 ± 0"
    assert rows["#2"][col["steps"]] == "100"
    # FID: target = best FID of `none` (12.0, step 100); constant reaches it at 60, sqrt2 at 80.
    assert "Target FID" in text and "12.00" in text
    assert rows["#0"][col["best FID (step)"]] == "12.00 (100)"
    assert rows["#2"][col["steps to target FID"]] == "60" and rows["#2"][col["speed-up vs none"]] == "1.67x"
    assert rows["#10"][col["speed-up vs none"]] == "1.25x" and rows["#0"][col["speed-up vs none"]] == "1.00x"
    assert rows["#4"][col["steps to target FID"]] == "not reached"
    assert rows["#1"][col["best FID (step)"]] == "–"
    assert rows["#4"][col["non-finite skipped"]] == "3" and rows["#0"][col["non-finite skipped"]] == "–"
    # Rows grouped by model, strategies in the paper's order; job 10 sorts after job 2.
    assert list(rows) == ["#0", "#10", "#2", "#4", "#1"]
    # Theory table: N - i + 1 for none.
    assert "| U-ViT 13 blocks, digits | none | 6.00 | 5.00 | 4.00 | 3.00 | 2.00 | 1.00 |" in text

    for name in ("features.png", "loss.png", "grads.png", "robustness.png", "lsc.png", "fid.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"![{name}]({name})" in text
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_report_without_fid_or_stability_metrics(report, tmp_path):
    """Plain runs (only train/loss and train/grad_norm) still give a table and the plots they can."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "unet", "preset": "tiny"},
                                                     "scaling": {"name": "none"}, "dataset": {"name": "digits"}}))
    write_csv(run / "csv" / "version_0" / "metrics.csv",
              [{"step": s, "train/loss": 1.0 / (s + 1), "train/grad_norm": 2.0} for s in range(0, 40, 10)])
    out = tmp_path / "rep"
    path = report.write_report([run], out)
    text = path.read_text()
    assert "| run | model | strategy | steps |" in text and "UNet tiny, digits" in text
    assert "FID" not in text.split("## Summary", 1)[1].split("\n")[2]  # no FID columns without FID data
    assert (out / "loss.png").is_file() and (out / "grads.png").is_file()
    assert not (out / "features.png").exists() and not (out / "fid.png").exists()


def test_read_metrics_joins_versions_and_orders_them_numerically(report, tmp_path):
    run = tmp_path / "run"
    for version, steps in ((0, range(0, 6)), (1, range(4, 8)), (10, range(7, 9))):
        write_csv(run / "csv" / f"version_{version}" / "metrics.csv",
                  [{"step": s, "train/loss": 100 * version + s} for s in steps])
    steps, values = report.read_metrics(run)["train/loss"]
    assert steps.tolist() == list(range(9))
    assert values.tolist() == [0, 1, 2, 3, 104, 105, 106, 1007, 1008]


def test_missing_folder_is_a_one_line_error(report, tmp_path, capsys):
    for args, message in (([str(tmp_path)], f"no run folders (with config.yaml) in {tmp_path}"),
                          ([str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'} is neither a run folder nor a folder of runs")):
        with pytest.raises(SystemExit) as info:
            report.main(args)
        assert info.value.code == 2  # as every other one-line error
        assert capsys.readouterr().err == f"error: {message}\n"
