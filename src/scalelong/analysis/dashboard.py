"""The W&B dashboard of a sweep: a W&B report, built with W&B's own library (``wandb-workspaces``),
that compares the runs of one group. One section per metric family with a line per run coloured
by strategy (the local report's colours), FID against step with the steps each run needs to reach
a target FID, the run table and a parallel-coordinates panel over the swept parameters, and
optionally the local stability report's table and figures.

Runs are read from local run folders (config.yaml, the CSV metrics, fid_history.json,
wandb_id.txt: no network, so the definition can be written offline) or from the W&B API.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from scalelong.training.loggers import RESULT_PREFIX, STEP_KEY, backbone_name, flat_config, sweep_group
from scalelong.utils.errors import ConfigError

# metric family (the prefix before "/") -> what its section shows
FAMILIES = {
    "train": "training loss, learning rate, gradient norm and skipped steps",
    "features": "hidden-feature norm of every block (per-sample Frobenius norm, batch mean)",
    "skips": "norm of each long skip before and after scaling (LSC 1 = outermost)",
    "grads": "gradient norm of the whole network and of each block, before clipping (log scale)",
    "loss": "rolling mean and standard deviation of the training loss",
    "robustness": "||f(x_t + d) - f(x_t)|| / ||d|| on a fixed probe batch at time t",
    "scaling": "the LSC coefficients (mean over the batch for learnable gates)",
    "eval": "FID and KID during training",
}
# matplotlib's tab10, in the local report's strategy order: both show a strategy in one colour
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
TABLE_PARAMS = ("scaling.name", "scaling.kappa", "model.depth", "optim.lr")  # columns of every run table
NOT_PARAMS = ("run_dir", "resume", "ckpt_path", "logger.", "_wandb")  # differ between runs, never swept
REPORT_MEDIA_PREFIX = "report/"  # keys of the stability report's figures in its W&B run


# --- the runs ------------------------------------------------------------------------------------


@dataclasses.dataclass
class DashboardRun:
    """A W&B run of the dashboard: its id, name, group, nested config, logged metric keys and
    (step, FID) pairs."""

    run_id: str
    name: str
    group: str | None
    config: dict[str, Any]
    metric_keys: set[str]
    fid: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def strategy(self) -> str:
        return str((self.config.get("scaling") or {}).get("name", "?"))

    @property
    def label(self) -> str:
        """The strategy as the local report names it (``constant κ=0.7`` for each kappa)."""
        kappa = (self.config.get("scaling") or {}).get("kappa")
        return f"constant κ={float(kappa):g}" if self.strategy == "constant" and kappa is not None else self.strategy

    @property
    def model_group(self) -> str:
        """What runs are compared within for steps to a target FID: backbone, depth, data set."""
        model = self.config.get("model") or {}
        data = (self.config.get("dataset") or {}).get("name", "?")
        depth = model.get("depth")
        return f"{backbone_name(model)}{f' depth {depth}' if depth is not None else ''}, {data}"

    def wandb_setting(self, key: str) -> Any:
        return ((self.config.get("logger") or {}).get("wandb") or {}).get(key)


def local_runs(paths: Sequence[str | Path], group: str | None = None) -> tuple[list[DashboardRun], list[Path]]:
    """The W&B runs among the run folders under ``paths`` (those with a ``wandb_id.txt``), with the
    group the logger gave them; only ``group``'s when given. Returns (runs, folders without W&B)."""
    from scalelong.analysis.runs import find_runs, read_fid

    runs, without = [], []
    for folder in find_runs(paths):
        if folder.name == "files" and folder.parent.parent.name == "wandb":
            continue  # the files of a W&B run (they hold a config.yaml of W&B's own), not a run folder
        id_file = folder / "wandb_id.txt"
        if not id_file.is_file():
            without.append(folder)
            continue
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        explicit = ((config.get("logger") or {}).get("wandb") or {}).get("group")
        runs.append(DashboardRun(id_file.read_text().strip(), folder.name, explicit or sweep_group(folder), config,
                                 _csv_keys(folder), read_fid(folder)))
    where = ", ".join(map(str, paths))
    if not runs:
        raise ConfigError(f"no W&B runs in {where}: their folders have no wandb_id.txt (trained with logger=csv?); "
                          "train with logger=wandb (the default)")
    if group is not None:
        groups = sorted({str(r.group) for r in runs})
        runs = [r for r in runs if r.group == group]
        if not runs:
            raise ConfigError(f"no runs of group {group!r} in {where}; their groups: {', '.join(groups)} "
                              "(a sweep's group is its folder's name)")
    return runs, without


def _csv_keys(run_dir: Path) -> set[str]:
    """The metric names of a run's CSV logs (the same names its W&B run has)."""
    keys: set[str] = set()
    for path in run_dir.glob("csv/version_*/metrics.csv"):
        with open(path, newline="") as f:
            keys.update(next(csv.reader(f), []))
    return keys - {"step", "epoch"}


def api_runs(api: Any, entity: str | None, project: str, group: str) -> list[DashboardRun]:
    """The runs of ``group`` in W&B's ``entity/project`` (needs the network)."""
    where = f"{entity}/{project}" if entity else project
    try:
        found = list(api.runs(where, filters={"group": group}))
        runs = []
        for r in found:
            keys = {k for k in r.summary.keys() if not k.startswith("_")}
            fid = []
            if "eval/fid" in keys:
                rows = r.scan_history(keys=[STEP_KEY, "eval/fid"])
                fid = sorted((int(row[STEP_KEY]), float(row["eval/fid"])) for row in rows
                             if row.get("eval/fid") is not None)
            runs.append(DashboardRun(r.id, r.name, r.group, dict(r.config), keys, fid))
    except Exception as err:  # the API's errors are many and long: one line
        raise ConfigError(f"cannot read the runs of {where} from W&B ({type(err).__name__}: {_first_line(err)}); "
                          "check --entity, --project and the network") from None
    if not runs:
        raise ConfigError(f"no runs in group {group!r} of {where}: upload offline runs first "
                          "(wandb sync <sweep>/*/wandb/offline-run-*) and check --group (a sweep's group is its "
                          "folder's name)")
    return runs


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


# --- what the dashboard shows ------------------------------------------------------------------


def check_families(names: Iterable[str] | None) -> list[str]:
    """The metric families asked for (all by default), each known; ``features/`` is ``features``."""
    if names is None:
        return list(FAMILIES)
    chosen = [n.strip().rstrip("/") for n in names if n.strip()]
    for name in chosen:
        if name not in FAMILIES:
            raise ConfigError(f"unknown metric family {name!r}; known: {', '.join(FAMILIES)} "
                              "(e.g. --families features,eval)")
    return list(dict.fromkeys(chosen))


def family_keys(runs: Sequence[DashboardRun], family: str) -> list[str]:
    """The metrics of a family logged by any run, in natural order (lsc2 before lsc10); the batch
    spread ``<key>_std`` of a logged ``<key>`` is left out, as in the local report's plots."""
    keys = {k for r in runs for k in r.metric_keys if k.startswith(f"{family}/")}
    keys = {k for k in keys if not (k.endswith("_std") and k[:-len("_std")] in keys)}
    if family == "eval":
        keys = {k for k in keys if not k.startswith("eval/quick_")}  # one value at the end: in the summary
    return sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])


def strategy_colours(runs: Sequence[DashboardRun]) -> dict[str, str]:
    """A colour per strategy label: the built-in strategies in their registered (the paper's)
    order, then the others as the runs name them, as the local report orders them."""
    from scalelong.scaling import STRATEGIES

    builtin = list(STRATEGIES)
    seen = list(dict.fromkeys(r.label for r in runs))
    order = sorted(seen, key=lambda label: (builtin.index(label.split(" ")[0]) if label.split(" ")[0] in builtin
                                            else len(builtin), seen.index(label)))
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(order)}


def swept_params(runs: Sequence[DashboardRun]) -> list[str]:
    """Config columns of the run table: scaling.name, scaling.kappa, model.depth and optim.lr where
    logged, then every other key whose value differs between the runs."""
    flat = [flat_config(r.config) for r in runs]
    present = [k for k in TABLE_PARAMS if any(k in f for f in flat)]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if k not in present and not k.startswith(NOT_PARAMS)
                 and not k.rsplit(".", 1)[-1].startswith("_")  # _target_: the class behind a name
                 and len({repr(f.get(k)) for f in flat}) > 1]
    return present + differing


def config_column(key: str) -> str:
    """A run-table column of a nested config key, as W&B stores it (``scaling.name`` ->
    ``config:scaling.value.name``; the library's ``wr.Config`` columns use the same form)."""
    first, _, rest = key.partition(".")
    return f"config:{first}.value" + (f".{rest}" if rest else "")


def summary_keys(runs: Sequence[DashboardRun]) -> list[str]:
    """Summary columns of the run table: the results the runs measured, then the last training loss.
    (Local CSV logs do not hold the ``result/*`` values, which exist in W&B only: they are chosen
    from what the runs measured and were configured to measure.)"""
    logged = {k for r in runs for k in r.metric_keys}
    fid = any(r.fid for r in runs) or "eval/fid" in logged
    quick = any(r.config.get("quick_eval") for r in runs)
    shown = {
        f"{RESULT_PREFIX}fid_best": fid,
        f"{RESULT_PREFIX}fid_best_step": fid,
        f"{RESULT_PREFIX}steps_to_target_fid": any(r.wandb_setting("target_fid") is not None for r in runs),
        f"{RESULT_PREFIX}kid_best": "eval/kid" in logged,
        f"{RESULT_PREFIX}quick_fid": quick,
        f"{RESULT_PREFIX}quick_kid": quick,
        f"{RESULT_PREFIX}nonfinite_skipped": True,
        "train/loss": "train/loss" in logged,
    }
    return [k for k, show in shown.items() if show or k in logged]


def runs_filter(runs: Sequence[DashboardRun]):
    """W&B's filter for the runs: their group when they all share one, else their ids."""
    from wandb_workspaces.expr import And, Metric

    groups = {r.group for r in runs}
    if len(groups) == 1 and None not in groups:
        return And(Metric("Group") == next(iter(groups)))
    return And(Metric("ID").isin([r.run_id for r in runs]))


def make_runset(runs: Sequence[DashboardRun], entity: str, project: str, name: str = "runs"):
    """The runs as a W&B run set: filtered, oldest first, coloured by strategy, with the run table's
    columns (swept parameters, then results)."""
    import wandb_workspaces.reports.v2 as wr

    colours = strategy_colours(runs)
    return wr.Runset(
        entity=entity, project=project, name=name, filters=runs_filter(runs),
        order=[wr.OrderBy("CreatedTimestamp", ascending=True)],
        run_settings={r.run_id: wr.RunSettings(color=colours[r.label]) for r in runs},
        pinned_columns=["run:displayName", *map(config_column, swept_params(runs)),
                        *(f"summary:{k}" for k in summary_keys(runs))])


def fid_targets(runs: Sequence[DashboardRun], target: float | None) -> dict[str, float]:
    """Per model group, the FID to reach: ``target``, else the best FID of that group's ``none`` run
    (the local report's rule)."""
    out = {}
    for group in dict.fromkeys(r.model_group for r in runs):
        if target is not None:
            out[group] = float(target)
            continue
        best = [min(f for _, f in r.fid) for r in runs if r.model_group == group and r.strategy == "none" and r.fid]
        if best:
            out[group] = best[0]
    return out


def steps_to_target_table(runs: Sequence[DashboardRun], target: float | None) -> str | None:
    """Markdown: per run, the best FID and its step, the first step at the target FID and the
    speed-up over the ``none`` run of its model group; None when no run measured FID."""
    if not any(r.fid for r in runs):
        return None
    targets = fid_targets(runs, target)

    def reach(run: DashboardRun) -> int | None:
        goal = targets.get(run.model_group)
        return None if goal is None else next((s for s, f in run.fid if f <= goal + 1e-12), None)

    baseline = {}
    for r in runs:
        if r.strategy == "none" and r.fid and r.model_group not in baseline:
            baseline[r.model_group] = reach(r)
    lines = ["| run | strategy | model | target FID | best FID (step) | steps to target | speed-up vs none |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        goal, steps, base = targets.get(r.model_group), reach(r), baseline.get(r.model_group)
        best = min(r.fid, key=lambda p: (p[1], p[0])) if r.fid else None
        lines.append("| " + " | ".join([
            r.name, r.label, r.model_group, "–" if goal is None else f"{goal:.4g}",
            "–" if best is None else f"{best[1]:.4g} ({best[0]})",
            "–" if goal is None or not r.fid else (str(steps) if steps is not None else "not reached"),
            f"{base / steps:.2f}x" if steps and base else "–"]) + " |")
    return "\n".join(lines)


def build_report(runs: Sequence[DashboardRun], *, entity: str, project: str, families: Sequence[str] | None = None,
                 title: str | None = None, target_fid: float | None = None, extra_blocks: Sequence[Any] = ()):
    """The dashboard as a ``wandb_workspaces.reports.v2.Report`` (nothing is sent): the run table and
    parallel coordinates, then a section per metric family that any run logged."""
    import wandb_workspaces.reports.v2 as wr

    families = check_families(families)
    groups = sorted({r.group for r in runs if r.group})
    title = title or f"ScaleLong: {', '.join(groups) if groups else f'{len(runs)} runs'}"
    colours = strategy_colours(runs)
    params = swept_params(runs)
    results = summary_keys(runs)
    goal = f"{RESULT_PREFIX}fid_best" if f"{RESULT_PREFIX}fid_best" in results else "train/loss"
    legend = ", ".join(f"{label} {colour}" for label, colour in colours.items())
    blocks: list[Any] = [
        wr.MarkdownBlock(text=(
            f"{len(runs)} runs ({'group ' + ', '.join(f'`{g}`' for g in groups) if groups else 'ungrouped'}), "
            f"a line per run coloured by strategy: {legend}. x axis: `{STEP_KEY}` (the training step). "
            f"Results of each run are summary values `{RESULT_PREFIX}*`.")),
        wr.H1(text="Runs"),
        wr.PanelGrid(runsets=[make_runset(runs, entity, project)], panels=[
            wr.ParallelCoordinatesPlot(
                title="swept parameters and result",
                columns=[*(wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in params),
                         wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(goal))],
                layout=wr.Layout(w=16, h=8)),
            wr.RunComparer(diff_only="split", layout=wr.Layout(w=8, h=8))]),
    ]
    for family in families:
        keys = family_keys(runs, family)
        if not keys:
            continue
        if family == "eval" and "eval/fid" in keys:
            keys.remove("eval/fid")
            keys.insert(0, "eval/fid")
        panels = [wr.LinePlot(title="FID against step" if key == "eval/fid" else key, x=STEP_KEY, y=[key],
                              title_x="step", log_y=True if family == "grads" else None,
                              max_runs_to_show=max(10, len(runs)), layout=wr.Layout(w=8, h=6))
                  for key in keys]
        blocks += [wr.H1(text=f"{family}/"), wr.P(text=FAMILIES[family]),
                   wr.PanelGrid(runsets=[make_runset(runs, entity, project)], panels=panels)]
        table = steps_to_target_table(runs, target_fid) if family == "eval" else None
        if table:
            source = "given" if target_fid is not None else "the best FID of the `none` run of the same model"
            blocks += [wr.H2(text="Steps to the target FID"), wr.MarkdownBlock(text=f"Target: {source}.\n\n{table}")]
    blocks += list(extra_blocks)
    return wr.Report(entity=entity, project=project, title=title[:128], width="fluid", blocks=blocks,
                     description=f"{len(runs)} runs compared by strategy; made by scalelong-dashboard")


# --- the local stability report in W&B ----------------------------------------------------------


@dataclasses.dataclass
class StabilityReport:
    """What the local report (report.md) says: its summary table and its figures with their captions.
    ``run_id`` is the W&B run that carries the figures, so that report blocks can show them."""

    directory: Path
    table: str
    figures: list[tuple[Path, str]]
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])


def read_stability_report(directory: str | Path) -> StabilityReport:
    """The summary table (the ``## Summary`` section) and the figures of ``directory/report.md``."""
    directory = Path(directory)
    path = directory / "report.md"
    if not path.is_file():
        raise ConfigError(f"no report at {path}; write it first with scalelong-report (or pass --with-report)")
    lines = path.read_text().splitlines()
    table: list[str] = []
    figures: list[tuple[Path, str]] = []
    section = None
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if section == "Summary":
            table.append(line)
        for name, target in re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", line):
            caption = next((lines[j].strip().rstrip(":") for j in range(i - 1, -1, -1) if lines[j].strip()), name)
            if (directory / target).is_file():
                figures.append((directory / target, caption))
    return StabilityReport(directory, "\n".join(table).strip(), figures)


def stability_blocks(report: StabilityReport, entity: str, project: str) -> list[Any]:
    """The local report as report blocks: its summary table as Markdown and its figures as media of
    the run ``report.run_id`` (``log_report_run`` uploads them)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.expr import And, Metric

    blocks: list[Any] = [wr.H1(text="Stability report"),
                         wr.MarkdownBlock(text=f"The local report's summary (`{report.directory / 'report.md'}`):"
                                               f"\n\n{report.table}")]
    if report.figures:
        runset = wr.Runset(entity=entity, project=project, name="stability report",
                           filters=And(Metric("ID") == report.run_id))
        panels = [wr.MediaBrowser(title=caption, media_keys=[f"{REPORT_MEDIA_PREFIX}{path.stem}"], num_columns=1,
                                  layout=wr.Layout(w=24, h=12)) for path, caption in report.figures]
        blocks.append(wr.PanelGrid(runsets=[runset], panels=panels, hide_run_sets=True))
    return blocks


def markdown_rows(table: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a Markdown table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.strip().startswith("|")]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]  # the |---| line
    return (rows[0], rows[1:]) if rows else ([], [])


def log_report_run(report: StabilityReport, *, project: str, entity: str | None, mode: str = "online") -> None:
    """A W&B run (job type ``report``, id ``report.run_id``) with the report's figures as images
    (``report/<name>``) and its summary table (``report/summary``), written into its folder."""
    import wandb

    try:
        run = wandb.init(project=project, entity=entity or None, id=report.run_id, name="stability report",
                         job_type="report", dir=str(report.directory), mode=mode, reinit="create_new",
                         settings=wandb.Settings(init_timeout=30))
        header, rows = markdown_rows(report.table)
        data: dict[str, Any] = {f"{REPORT_MEDIA_PREFIX}{path.stem}": wandb.Image(str(path), caption=caption)
                                for path, caption in report.figures}
        if header:
            data[f"{REPORT_MEDIA_PREFIX}summary"] = wandb.Table(columns=header, data=rows)
        run.log(data)
        run.finish()
    except Exception as err:
        raise ConfigError(f"cannot log the report's figures to W&B ({type(err).__name__}: {_first_line(err)}); "
                          "check the network, or leave out the report") from None


# --- offline definition and publishing ---------------------------------------------------------


def definition(obj: Any) -> Any:
    """A report (or any of its parts) as plain JSON data: each object's type and its set fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not f.name.startswith("_") and not _unset(value):
                out[f.name] = definition(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): definition(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [definition(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _unset(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, list, dict)):
        return len(value) == 0
    return isinstance(value, tuple) and all(v is None for v in value)


def describe(report: Any) -> list[str]:
    """What the report holds, a line per section: its panels by type, its filters and colours."""
    import wandb_workspaces.reports.v2 as wr

    where = f"{report.entity or '<your default entity>'}/{report.project}"
    lines = [f'W&B report "{report.title}" in {where}']
    section = "(top)"
    for block in report.blocks:
        if isinstance(block, wr.H1):
            section = block.text
        elif isinstance(block, wr.PanelGrid):
            counts: dict[str, int] = {}
            for panel in block.panels:
                counts[type(panel).__name__] = counts.get(type(panel).__name__, 0) + 1
            kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
            runset = block.runsets[0]
            lines.append(f"  section {section}: {kinds}; runs where {runset.filters}")
            if runset.pinned_columns and section == "Runs":
                lines.append(f"    run table: {', '.join(runset.pinned_columns)}")
                colours = sorted({s.color for s in runset.run_settings.values()})
                lines.append(f"    {len(runset.run_settings)} runs coloured by strategy ({', '.join(colours)})")
        elif isinstance(block, wr.MarkdownBlock) and section != "(top)":
            lines.append(f"  section {section}: a Markdown table")
    return lines


def connect_api() -> Any:
    """W&B's API, logged in; a ConfigError (one line) without a login or a reachable server."""
    import wandb

    try:
        return wandb.Api(timeout=30)
    except wandb.errors.UsageError:
        raise ConfigError("not logged in to W&B: run `wandb login` once (or set WANDB_API_KEY), or write the "
                          "dashboard's definition offline with --dry-run --out FILE") from None
    except Exception as err:
        raise ConfigError(f"cannot reach W&B ({type(err).__name__}: {_first_line(err)}); check the network (or "
                          "WANDB_BASE_URL), or write the definition offline with --dry-run --out FILE") from None


def publish(report: Any, stability: StabilityReport | None = None) -> str:
    """Upload the stability report's figures (when given), save the report in W&B; its URL."""
    if stability is not None and stability.figures:
        log_report_run(stability, project=report.project, entity=report.entity)
    try:
        report.save()
    except Exception as err:
        raise ConfigError(f"W&B did not save the report ({type(err).__name__}: {_first_line(err)}); check "
                          "--entity and --project, and that the runs are synced (wandb sync)") from None
    try:
        return str(report.url)
    except Exception:  # the URL needs one more request; the report is saved anyway
        return f"{report.entity}/{report.project}, report {report.id}"
