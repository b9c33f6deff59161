"""The W&B dashboard (scalelong-dashboard, scripts/dashboard.py) of a two-strategy toy sweep, checked
through wandb-workspaces' own objects. No W&B server is reachable here: the login (``wandb.Api``),
the save of the report and the upload of the report's figures are the calls replaced."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

wr = pytest.importorskip("wandb_workspaces.reports.v2")

from scalelong.analysis import dashboard as dash  # noqa: E402
from scalelong.cli.dashboard import main  # noqa: E402

SECTIONS = ["Runs", "train/", "features/", "skips/", "grads/", "loss/", "robustness/", "scaling/", "eval/"]
IDS = {"none": "aaaa00000001", "constant": "bbbb00000002"}


def make_run(sweep: Path, name: str, scaling: dict, fid: list[tuple[int, float]]) -> Path:
    """A run folder as training leaves it: config.yaml, CSV metrics, fid_history.json, wandb_id.txt."""
    run = sweep / name
    run.mkdir(parents=True)
    config = {"model": {"_target_": "scalelong.models.UViT", "depth": 4}, "scaling": scaling,
              "dataset": {"name": "digits"}, "optim": {"lr": 2e-4}, "run_dir": str(run),
              "logger": {"wandb": {"project": "scalelong", "entity": None, "group": None}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "wandb_id.txt").write_text(IDS[scaling["name"]] + "\n")
    rows = []
    for step in range(0, 101, 10):
        row = {"step": step, "train/loss": 0.5, "grads/total": 1.0, "loss/rolling_std": 0.01,
               "robustness/t0.5": 0.2, "skips/lsc1_before": 3.0, "skips/lsc1_after": 2.0}
        row.update({f"features/{b}": 10.0 for b in ("in_00", "mid", "out_00")})
        row.update({f"features/{b}_std": 0.1 for b in ("in_00", "mid", "out_00")})
        row.update({f"scaling/lsc{i}": 1.0 for i in (1, 2, 10)})
        fids = dict(fid)
        if step in fids:
            row.update({"eval/fid": fids[step], "eval/kid": fids[step] / 100})
        rows.append(row)
    path = run / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    (run / "fid_history.json").write_text(json.dumps([{"step": s, "fid": v, "kid": v / 100} for s, v in fid]))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    folder = tmp_path / "toy_sweep"
    folder.mkdir()
    (folder / "multirun.yaml").write_text("{}\n")  # Hydra's sweep marker: the runs' group is "toy_sweep"
    make_run(folder, "0_scaling=none", {"name": "none"}, [(20, 50.0), (40, 30.0), (60, 20.0), (80, 15.0), (100, 12.0)])
    make_run(folder, "1_scaling=constant", {"name": "constant", "kappa": 0.5},
             [(20, 40.0), (40, 20.0), (60, 12.0), (80, 10.0), (100, 9.0)])
    return folder


def sections(report) -> dict[str, list]:
    """Blocks under each H1 heading."""
    out: dict[str, list] = {}
    current = None
    for block in report.blocks:
        if isinstance(block, wr.H1):
            current = block.text
            out[current] = []
        elif current is not None:
            out[current].append(block)
    return out


def grid(blocks: list):
    (panel_grid,) = [b for b in blocks if isinstance(b, wr.PanelGrid)]
    return panel_grid


class FakeApi:
    """Stands in for ``wandb.Api()`` of a logged-in user (constructing the real one checks the login
    over the network)."""

    default_entity = "me"

    def __init__(self, *args, **kwargs):
        pass


@pytest.fixture
def online(monkeypatch):
    """The network calls replaced: the login, the report's save and the figures' upload."""
    import wandb

    saved, uploads = [], []
    monkeypatch.setattr(wandb, "Api", FakeApi)

    def save(self, draft=False, clone=False):
        self.id = "Vmlldzo1"
        saved.append(self)
        return self

    monkeypatch.setattr(wr.Report, "save", save)
    monkeypatch.setattr(dash, "log_report_run", lambda report, **kw: uploads.append((report, kw)))
    return saved, uploads


def test_a_section_per_family_a_line_per_run_coloured_by_strategy(sweep):
    files = sweep / "report" / "wandb" / "run-20260101_000000-f00" / "files"  # an online W&B run's own files
    files.mkdir(parents=True)
    (files / "config.yaml").write_text("_wandb:\n  value: {}\n")
    runs, without = dash.local_runs([sweep])
    assert without == [] and [(r.name, r.group) for r in runs] == [("0_scaling=none", "toy_sweep"),
                                                                   ("1_scaling=constant", "toy_sweep")]
    report = dash.build_report(runs, entity="me", project="scalelong")
    assert (report.entity, report.project, report.title) == ("me", "scalelong", "ScaleLong: toy_sweep")
    parts = sections(report)
    assert list(parts) == SECTIONS
    plots = {name: [(p.y, p.x) for p in grid(blocks).panels] for name, blocks in parts.items() if name != "Runs"}
    step = "trainer/global_step"
    assert plots["features/"] == [(["features/in_00"], step), (["features/mid"], step), (["features/out_00"], step)]
    assert plots["scaling/"] == [([f"scaling/lsc{i}"], step) for i in (1, 2, 10)]  # natural order
    assert plots["skips/"] == [(["skips/lsc1_after"], step), (["skips/lsc1_before"], step)]
    assert plots["eval/"] == [(["eval/fid"], step), (["eval/kid"], step)]
    assert grid(parts["eval/"]).panels[0].title == "FID against step"
    assert [p.log_y for p in grid(parts["grads/"]).panels] == [True]
    for name, blocks in parts.items():
        runset = grid(blocks).runsets[0]
        # every section shows this sweep's runs, one line each (no grouping), coloured by strategy
        assert runset.filters == "Metric(\"Group\") == 'toy_sweep'", name
        assert runset.groupby == []
        assert {k: s.color for k, s in runset.run_settings.items()} == {IDS["none"]: "#1f77b4",
                                                                          IDS["constant"]: "#ff7f0e"}


def test_the_run_table_and_parallel_coordinates_show_the_swept_parameters(sweep):
    runs, _ = dash.local_runs([sweep])
    runs_grid = grid(sections(dash.build_report(runs, entity="me", project="scalelong"))["Runs"])
    params = ["config:scaling.value.name", "config:scaling.value.kappa", "config:model.value.depth",
              "config:optim.value.lr"]
    assert runs_grid.runsets[0].pinned_columns == [
        "run:displayName", *params, "summary:result/fid_best", "summary:result/fid_best_step",
        "summary:result/kid_best", "summary:result/nonfinite_skipped", "summary:train/loss"]
    parallel, comparer = runs_grid.panels
    assert isinstance(comparer, wr.RunComparer)
    # the library addresses the same nested config columns as the run table
    assert [c._to_model().accessor for c in parallel.columns] == [*params, "summary:result/fid_best"]


def test_the_fid_section_gives_the_steps_to_the_target_fid(sweep):
    runs, _ = dash.local_runs([sweep])

    def table(target):
        blocks = sections(dash.build_report(runs, entity="me", project="scalelong", target_fid=target))["eval/"]
        (markdown,) = [b for b in blocks if isinstance(b, wr.MarkdownBlock)]
        return markdown.text

    # default target: the best FID of `none` (12); none reaches it at step 100, constant at 60
    text = table(None)
    assert "| 0_scaling=none | none | uvit depth 4, digits | 12 | 12 (100) | 100 | 1.00x |" in text
    assert "| 1_scaling=constant | constant κ=0.5 | uvit depth 4, digits | 12 | 9 (100) | 60 | 1.67x |" in text
    text = table(20.0)  # none at 60, constant at 40
    assert "| 1_scaling=constant | constant κ=0.5 | uvit depth 4, digits | 20 | 9 (100) | 40 | 1.50x |" in text


def test_a_dry_run_writes_the_definition_and_sends_nothing(sweep, tmp_path, capsys, monkeypatch):
    import wandb

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not talk to W&B")

    monkeypatch.setattr(wandb, "Api", no_network)
    out = tmp_path / "dash" / "dashboard.json"
    assert main([str(sweep), "--dry-run", "--out", str(out), "--families", "features/,eval"]) == 0
    definition = json.loads(out.read_text())
    assert definition["type"] == "Report" and definition["project"] == "scalelong"
    assert [b["text"] for b in definition["blocks"] if b["type"] == "H1"] == ["Runs", "features/", "eval/"]
    features = definition["blocks"][definition["blocks"].index({"type": "H1", "text": "features/"}) + 2]
    assert [p["y"] for p in features["panels"]] == [["features/in_00"], ["features/mid"], ["features/out_00"]]
    assert features["runsets"][0]["filters"] == "Metric(\"Group\") == 'toy_sweep'"
    printed = capsys.readouterr().out
    assert "section features/: 3 LinePlot; runs where Metric(\"Group\") == 'toy_sweep'" in printed
    assert "2 runs coloured by strategy (#1f77b4, #ff7f0e)" in printed
    assert printed.rstrip().endswith("dry run: nothing sent to W&B")


def test_online_the_report_is_saved_to_the_users_entity(sweep, online, capsys):
    saved, uploads = online
    assert main([str(sweep)]) == 0
    (report,) = saved
    assert (report.entity, report.project, report.id) == ("me", "scalelong", "Vmlldzo1")
    assert list(sections(report)) == SECTIONS
    assert grid(sections(report)["Runs"]).runsets[0].entity == "me"
    assert uploads == []  # no local report asked for: nothing to upload
    assert "W&B report: me/scalelong, report Vmlldzo1" in capsys.readouterr().out


def test_with_report_the_local_reports_table_and_figures_are_report_blocks(sweep, online):
    saved, uploads = online
    assert main([str(sweep), "--with-report"]) == 0
    local = dash.read_stability_report(sweep / "report")
    names = sorted(path.name for path, _ in local.figures)
    assert names == sorted(p.name for p in (sweep / "report").glob("*.png")) and "fid.png" in names
    blocks = sections(saved[0])["Stability report"]
    markdown, media = blocks
    # the same summary table as report.md, verbatim
    assert local.table.startswith("| run |") and markdown.text.endswith(local.table)
    assert sorted(p.media_keys[0] for p in media.panels) == sorted(f"report/{Path(n).stem}" for n in names)
    ((uploaded, where),) = uploads
    assert where == {"project": "scalelong", "entity": "me"}
    assert media.runsets[0].filters == f"Metric(\"ID\") == '{uploaded.run_id}'"


def test_the_report_command_puts_its_report_into_wandb(sweep, online):
    from scalelong.cli.report import main as report_main

    saved, uploads = online
    assert report_main([str(sweep), "--wandb-report"]) == 0
    assert (sweep / "report" / "report.md").is_file()
    assert "Stability report" in sections(saved[0]) and len(uploads) == 1


def test_the_report_run_carries_the_figures_and_the_table(sweep, tmp_path, monkeypatch):
    """The upload itself, offline: W&B's reader finds the images and the table in the run."""
    from test_wandb_logging import read_offline_run

    from scalelong.analysis.report import write_report

    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    write_report([sweep], tmp_path / "report")
    local = dash.read_stability_report(tmp_path / "report")
    dash.log_report_run(local, project="scalelong", entity=None, mode="offline")
    run = read_offline_run(tmp_path / "report")
    assert (run["id"], run["job_type"]) == (local.run_id, "report")
    images = {k.split(".")[0] for k, v in run["summary"].items() if k.endswith("._type") and v == "image-file"}
    assert images == {f"report/{path.stem}" for path, _ in local.figures}
    assert run["summary"]["report/fid.caption"] == dict((p.stem, c) for p, c in local.figures)["fid"]
    # the summary table, cell for cell
    header, rows = dash.markdown_rows(local.table)
    assert run["summary"]["report/summary._type"] == "table-file" and len(rows) == 2 and header[0] == "run"
    (offline,) = (tmp_path / "report" / "wandb").glob("offline-run-*")
    table = json.loads((offline / "files" / run["summary"]["report/summary.path"]).read_text())
    assert (table["columns"], table["data"]) == (header, rows)


def test_runs_read_from_the_wandb_api(sweep, online, monkeypatch):
    import wandb

    saved, _ = online

    class Run:
        def __init__(self, run_id, name, scaling, fid):
            self.id, self.name, self.group = run_id, name, "toy_sweep"
            self.config = {"scaling": scaling, "model": {"_target_": "scalelong.models.UViT", "depth": 4},
                           "dataset": {"name": "digits"}}
            self.summary = {"_step": 9, "train/loss": 0.5, "eval/fid": fid[-1][1], "result/fid_best": fid[-1][1]}
            self.fid = fid

        def scan_history(self, keys):
            return [{"trainer/global_step": s, "eval/fid": f} for s, f in self.fid]

    class Api(FakeApi):
        asked = []

        def runs(self, path, filters):
            self.asked.append((path, filters))
            return [Run("r1", "a", {"name": "none"}, [(10, 5.0)]), Run("r2", "b", {"name": "sqrt2"}, [(10, 4.0)])]

    monkeypatch.setattr(wandb, "Api", Api)
    assert main(["--group", "toy_sweep"]) == 0
    assert Api.asked == [("me/scalelong", {"group": "toy_sweep"})]
    runset = grid(sections(saved[0])["eval/"]).runsets[0]
    assert {k: s.color for k, s in runset.run_settings.items()} == {"r1": "#1f77b4", "r2": "#ff7f0e"}
    assert "summary:result/fid_best" in runset.pinned_columns


@pytest.mark.parametrize("argv, message", [
    (["--group", "other", "--dry-run"], "no runs of group 'other' in {sweep}; their groups: toy_sweep"),
    (["--families", "features,gradz", "--dry-run"], "unknown metric family 'gradz'; known: train, features"),
    ([], "not logged in to W&B: run `wandb login` once (or set WANDB_API_KEY), or write the dashboard's "
         "definition offline with --dry-run --out FILE"),
])
def test_bad_input_is_one_line_and_status_2(sweep, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no stored login
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: " + message.format(sweep=sweep))


def test_no_wandb_runs_and_no_source_are_one_line_errors(tmp_path, capsys):
    csv_only = tmp_path / "csv_run"
    csv_only.mkdir()
    (csv_only / "config.yaml").write_text("scaling: {name: none}\n")
    for argv, message in (([str(csv_only), "--dry-run"], "no W&B runs in"), (["--dry-run"], "--dry-run works from local"),
                          ([], "give the sweep folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1


def test_the_script_is_the_command():
    from conftest import load_script

    assert load_script("dashboard").main is main
