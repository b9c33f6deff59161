"""Loggers of a run: W&B offline by default, into the run folder, never stopping training.

A W&B run is labelled so that W&B compares a sweep without hand-built panels: the jobs of a sweep
share a group (the sweep folder's name), tags name the data set, backbone and strategy, the
nested configuration shows as dotted columns (``scaling.name``, ``model.depth``, ``optim.lr``)
and the run ends with its results as summary values (``result/*``). The dashboard command
applies the same rules to local run folders (``scalelong.analysis.dashboard``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalelong.utils.io import write_text

RESULT_PREFIX = "result/"  # summary values written when a run ends (not logged during it)
STEP_KEY = "trainer/global_step"  # Lightning's step in W&B (W&B's own _step counts log calls)


def wandb_logger(project: str = "scalelong", entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, offline: bool = True, target_fid: float | None = None, *,
                 save_dir: str | Path, name: str | None = None, run_config: dict[str, Any] | None = None):
    """A ``WandbLogger`` for the run folder ``save_dir``, or None (with a warning) when W&B fails.

    One W&B run per run folder (its id kept in ``wandb_id.txt``), so a resumed run continues the
    same W&B run. Offline unless ``offline`` is false; ``WANDB_MODE`` wins over both. ``group``
    defaults to the sweep's (``sweep_group``); ``tags`` get the data set, backbone and strategy.
    ``target_fid`` is read when the run ends (``finish_wandb_run``), not here.
    """
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_only

    run_dir = Path(save_dir)
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    if not id_file.is_file() and rank_zero_only.rank == 0:
        write_text(id_file, run_id + "\n")
    mode = os.environ.get("WANDB_MODE") or ("offline" if offline else "online")
    try:
        import wandb

        logger = WandbLogger(
            project=project, entity=entity, group=group or sweep_group(run_dir),
            tags=run_tags(run_config or {}, tags), name=name or run_dir.name, id=run_id, resume="allow",
            save_dir=str(run_dir), mode=mode, config=run_config, job_type="train",
            # Online runs give up on an unreachable server after 30 s instead of the default 90 s.
            settings=wandb.Settings(init_timeout=30),
        )
        # Lightning passes anonymous=None, which W&B 0.31 answers with a warning that it has no effect.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        if rank_zero_only.rank == 0:
            logger.experiment  # start the W&B run now, where a failure can still be caught
        return logger
    except Exception as err:  # a logging problem must never stop training
        warnings.warn(f"W&B logger disabled ({type(err).__name__}: {err}); metrics still go to the CSV logger")
        return None


def csv_logger(*, save_dir: str | Path, name: str = "csv", **kwargs):
    """Lightning's ``CSVLogger`` (``<save_dir>/<name>/version_K/metrics.csv``) whose metrics.csv is
    replaced atomically at each flush, so a process killed while it writes leaves the previous,
    readable file (Lightning's own truncates it to rewrite the header when a new metric appears).
    A resumed run writes the next version; ``scalelong.analysis.report.read_metrics`` joins them."""
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter
    from pytorch_lightning.utilities import rank_zero_only

    class AtomicExperimentWriter(ExperimentWriter):
        def save(self) -> None:
            if not self.metrics:
                return
            new_keys = self._record_new_keys()
            path = Path(self.metrics_file_path)
            kept = path.read_text() if path.is_file() else ""
            if kept and new_keys:  # a new column: the rows so far under the new header
                with open(path, newline="") as f:
                    self.metrics = [*csv.DictReader(f), *self.metrics]
                kept = ""
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
            if not kept:
                writer.writeheader()
            writer.writerows(self.metrics)
            write_text(path, kept + out.getvalue())
            self.metrics = []

    class AtomicCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None and rank_zero_only.rank == 0:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
            return super().experiment

    return AtomicCSVLogger(save_dir=str(save_dir), name=name, **kwargs)


# --- how runs are labelled -------------------------------------------------------------------


def sweep_group(run_dir: str | Path) -> str | None:
    """The W&B group of a run folder: the sweep folder's name for a job of a Hydra sweep, else None.

    A job is recognised from Hydra's own files: ``multirun.yaml`` in its parent (the basic
    launcher writes it into the sweep folder) or ``mode: MULTIRUN`` in its ``.hydra/hydra.yaml``
    (other sweepers, such as Optuna). A single run is not grouped; ``logger.wandb.group`` groups
    runs explicitly and wins over this rule.
    """
    run_dir = Path(run_dir).absolute()
    if (run_dir.parent / "multirun.yaml").is_file() or _hydra_mode(run_dir) == "MULTIRUN":
        return run_dir.parent.name
    return None


def _hydra_mode(run_dir: Path) -> str | None:
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        mode = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("mode")
    except Exception:  # an unreadable Hydra file only loses the grouping
        return None
    return str(mode).rsplit(".", 1)[-1] if mode is not None else None


def backbone_name(model: Mapping[str, Any]) -> str:
    """``uvit``, ``unet`` or another backbone's class name, from the model's ``_target_``."""
    if "backbone" in model:  # runs written before the configs named classes
        return str(model["backbone"])
    name = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
    return {"UViT": "uvit", "UNet": "unet"}.get(name, name)


def run_tags(config: Mapping[str, Any], extra: list[str] | None = None) -> list[str]:
    """The user's tags, then ``dataset:<name>``, ``backbone:<name>`` and ``scaling:<strategy>``."""
    tags = list(extra or [])
    labels = (("dataset", (config.get("dataset") or {}).get("name")),
              ("backbone", backbone_name(config["model"]) if config.get("model") else None),
              ("scaling", (config.get("scaling") or {}).get("name")))
    for key, value in labels:
        tag = f"{key}:{value}"[:64]  # W&B's limit for a tag
        if value is not None and tag not in tags:
            tags.append(tag)
    return tags


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested configuration as W&B shows it: one dotted column per leaf (``scaling.kappa``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- the end of a run ------------------------------------------------------------------------


def fid_histories(config: Mapping[str, Any], run_dir: Path) -> list[tuple[Path, str, str]]:
    """(history file, FID name, KID name) of each FID callback of a run, the names being the last
    part of its logged keys (``eval/fid`` -> ``fid``); the default callback's if none is configured."""
    found = []
    for spec in (config.get("callbacks") or {}).values():
        if isinstance(spec, Mapping) and str(spec.get("_target_", "")).endswith("FIDCallback"):
            found.append((Path(spec.get("dirpath") or run_dir) / spec.get("history_file", "fid_history.json"),
                          str(spec.get("fid_key", "eval/fid")).rsplit("/", 1)[-1],
                          str(spec.get("kid_key", "eval/kid")).rsplit("/", 1)[-1]))
    return found or [(run_dir / "fid_history.json", "fid", "kid")]


def run_summary(histories: list[tuple[list[Mapping[str, Any]], str, str]], metrics: Mapping[str, float],
                step: int, target_fid: float | None = None) -> dict[str, Any]:
    """The ``result/*`` summary values of a run: its steps and skipped steps; from each FID history
    (the entries of a ``fid_history.json``, with the names of its FID and KID) the final and best
    values, and with ``target_fid`` the first step that reached it; the quick evaluation's KID/FID."""
    out: dict[str, Any] = {
        f"{RESULT_PREFIX}steps": int(step),
        f"{RESULT_PREFIX}nonfinite_skipped": int(metrics.get("train/nonfinite_skipped", 0)),
        f"{RESULT_PREFIX}overflow_skipped": int(metrics.get("train/overflow_skipped", 0)),
    }
    for history, fid_name, kid_name in histories:
        for field, name in (("fid", fid_name), ("kid", kid_name)):
            entries = sorted((e for e in history if _finite(e.get(field))), key=lambda e: int(e["step"]))
            if not entries:
                continue
            best = min(entries, key=lambda e: (float(e[field]), int(e["step"])))
            out.update({f"{RESULT_PREFIX}{name}_final": float(entries[-1][field]),
                        f"{RESULT_PREFIX}{name}_best": float(best[field]),
                        f"{RESULT_PREFIX}{name}_best_step": int(best["step"])})
            if field == "fid" and target_fid is not None:
                reached = next((int(e["step"]) for e in entries if float(e["fid"]) <= float(target_fid)), None)
                out[f"{RESULT_PREFIX}target_{name}"] = float(target_fid)
                out[f"{RESULT_PREFIX}target_{name}_reached"] = reached is not None
                if reached is not None:
                    out[f"{RESULT_PREFIX}steps_to_target_{name}"] = reached
    for name in ("fid", "kid"):
        if _finite(metrics.get(f"eval/quick_{name}")):
            out[f"{RESULT_PREFIX}quick_{name}"] = float(metrics[f"eval/quick_{name}"])
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finish_wandb_run(logger, config: Mapping[str, Any], run_dir: Path, metrics: Mapping[str, float],
                     step: int) -> None:
    """Write the run's results into its W&B summary (``run_summary``) and end the W&B run, so
    that the next job of a sweep in this process starts its own. A W&B problem only warns."""
    try:
        from scalelong.training.fid_callback import read_history

        histories = [(read_history(path), fid, kid) for path, fid, kid in fid_histories(config, Path(run_dir))]
        target = ((config.get("logger") or {}).get("wandb") or {}).get("target_fid")
        logger.experiment.summary.update(run_summary(histories, metrics, step, target))
    except Exception as err:  # a logging problem must never stop training
        warnings.warn(f"W&B summary not written ({type(err).__name__}: {err}); the run's files have the results")
    try:
        logger.experiment.finish()
    except Exception as err:
        warnings.warn(f"W&B run not finished cleanly ({type(err).__name__}: {err})")
