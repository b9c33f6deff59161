"""Reading runs from their local files only (``config.yaml``, the CSV metrics, ``fid_history.json``):
``Run`` holds one run's configuration and logged series, named and grouped from its own config."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scalelong.utils.errors import ConfigError

Series = tuple[np.ndarray, np.ndarray]  # (steps int64, values float64), sorted by step


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those with a config.yaml) among ``paths`` and the folders below them."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            runs.append(p)
        elif p.is_dir():
            # Hydra names jobs "<num>_<overrides>": order by the job number, then by name.
            # not Hydra's or W&B's own config.yaml files, nor a report's
            subs = {c.parent for c in p.rglob("config.yaml")
                    if not {".hydra", "wandb", "report"} & set(c.relative_to(p).parts[:-1])}
            runs.extend(sorted(subs, key=lambda d: [_job_order(Path(part)) for part in d.relative_to(p).parts]))
        else:
            raise ConfigError(f"{p} is neither a run folder nor a folder of runs")
    if not runs:
        raise ConfigError(f"no run folders (with config.yaml) in {', '.join(map(str, paths))}")
    return runs


def _job_order(path: Path) -> tuple[float, str]:
    m = re.match(r"(\d+)", path.name)
    return (int(m.group(1)) if m else math.inf, path.name)


def read_metrics(run_dir: Path) -> dict[str, Series]:
    """Every metric of ``run_dir/csv/version_*/metrics.csv`` as (steps, values), versions joined.

    A later version (a resumed run) supersedes the earlier ones from its first step on; a step
    logged twice keeps its last value.
    """
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    data: dict[str, list[tuple[int, float]]] = {}
    for path in versions:
        rows = _read_csv(path)
        if not rows:
            continue
        first = min(step for step, _ in rows)
        data = {k: [(s, v) for s, v in pts if s < first] for k, pts in data.items()}
        for step, row in rows:
            for key, value in row.items():
                data.setdefault(key, []).append((step, value))
    out = {}
    for key, pts in data.items():
        last = dict(pts)  # later entries of a step win
        steps = np.array(sorted(last), dtype=np.int64)
        out[key] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    return out


def _read_csv(path: Path) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            try:
                step = int(float(raw.pop("step")))
            except (KeyError, TypeError, ValueError):
                continue
            raw.pop("epoch", None)
            row = {}
            for k, v in raw.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
            rows.append((step, row))
    return rows


def read_fid(run_dir: Path) -> list[tuple[int, float]]:
    """(step, fid) pairs from ``fid_history.json`` (a list of {step, fid, ...}), by step."""
    path = run_dir / "fid_history.json"
    if not path.is_file():
        path = next(iter(sorted(run_dir.rglob("fid_history.json"))), None)
        if path is None:
            return []
    entries = json.loads(path.read_text())
    if isinstance(entries, dict):
        entries = entries.get("history", [])
    pts = [(int(e["step"]), float(e["fid"])) for e in entries if e.get("fid") is not None and "step" in e]
    return sorted(pts)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Series]
    fid: list[tuple[int, float]] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        """``#<job number>`` for a Hydra multirun job folder, else the folder name."""
        m = re.match(r"(\d+)_", self.path.name)
        return f"#{m.group(1)}" if m else self.path.name

    @property
    def strategy(self) -> str:
        return str((self.config.get("scaling") or {}).get("name", "?"))

    @property
    def kappa(self) -> float | None:
        k = (self.config.get("scaling") or {}).get("kappa")
        return float(k) if k is not None and self.strategy == "constant" else None

    @property
    def strategy_label(self) -> str:
        return f"constant κ={self.kappa:g}" if self.kappa is not None else self.strategy

    @property
    def paper_name(self) -> str:
        """The strategy class's ``paper_name`` (read from its ``_target_``), else its name."""
        return strategy_paper_name(self.config.get("scaling") or {})

    @property
    def backbone(self) -> str:
        """``uvit``, ``unet`` or another backbone's class name, from the model's ``_target_``."""
        model = self.config.get("model") or {}
        if "backbone" in model:  # runs written before the configs named classes
            return str(model["backbone"])
        name = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
        return {"UViT": "uvit", "UNet": "unet"}.get(name, name)

    @property
    def block_names(self) -> list[str]:
        """Measured blocks in execution order (in_*, mid, out_*), from the feature metrics."""
        names = [k.split("/", 1)[1] for k in self.metrics if k.startswith("features/") and not k.endswith("_std")]
        rank = {"in": 0, "mid": 1, "out": 2}
        return sorted(names, key=lambda n: (rank.get(n.split("_")[0], 3), n))

    @property
    def num_blocks(self) -> int | None:
        """U-ViT blocks (in + mid + out): from model.options.depth, else the preset, else the metrics."""
        if self.backbone != "uvit":
            return len(self.block_names) or None
        model = self.config.get("model") or {}
        depth = model.get("depth", (model.get("options") or {}).get("depth"))
        if depth is None:
            return len(self.block_names) or None
        return int(depth) // 2 * 2 + 1  # depth // 2 in blocks, one mid block, depth // 2 out blocks

    @property
    def group(self) -> str:
        """What runs are compared within: backbone, depth and data set."""
        blocks = self.num_blocks if self.backbone == "uvit" else None  # the UNet's size: its preset
        size = f"{blocks} blocks" if blocks else preset_name(self.config)
        name = {"uvit": "U-ViT", "unet": "UNet"}.get(self.backbone, self.backbone)
        data = (self.config.get("dataset") or {}).get("name", "?")
        return f"{name} {size}, {data}"

    @property
    def last_step(self) -> int:
        ends = [int(s[-1]) for s, _ in self.metrics.values() if len(s)]
        ends += [s for s, _ in self.fid]
        return max(ends) if ends else 0

    def series(self, key: str) -> Series | None:
        s = self.metrics.get(key)
        return s if s is not None and len(s[0]) else None

    def feature_mean(self) -> Series | None:
        """Mean over blocks of the feature norm, at the steps where every block was measured."""
        keys = [f"features/{n}" for n in self.block_names]
        if not keys:
            return None
        steps = self.metrics[keys[0]][0]
        for k in keys[1:]:
            steps = np.intersect1d(steps, self.metrics[k][0])
        vals = [self.metrics[k][1][np.isin(self.metrics[k][0], steps)] for k in keys]
        return steps, np.mean(vals, axis=0)

    def lsc_series(self, prefix: str, suffix: str = "") -> dict[int, Series]:
        """LSC index -> series for keys ``{prefix}{i}{suffix}`` (e.g. ``scaling/lsc``)."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
        out = {}
        for key, s in self.metrics.items():
            m = pattern.match(key)
            if m and len(s[0]):
                out[int(m.group(1))] = s
        return dict(sorted(out.items()))


def strategy_paper_name(scaling: dict[str, Any]) -> str:
    """The paper's name of a run's strategy (its class's ``paper_name``), else the strategy's name."""
    name = str(scaling.get("name", "?"))
    target = scaling.get("_target_")
    if target:
        try:
            from hydra.utils import get_class

            return getattr(get_class(str(target)), "paper_name", "") or name
        except Exception:  # a strategy of a package not installed here: its name will do
            return name
    from scalelong.scaling import STRATEGIES  # runs written before configs named classes

    return getattr(STRATEGIES.get(name), "paper_name", "") or name


def preset_name(config: dict[str, Any]) -> str:
    """What a run's network is called: its preset where the config says, else a short description."""
    model = config.get("model") or {}
    if model.get("preset"):
        return str(model["preset"])
    channels = model.get("base_channels")
    return f"{channels} base channels" if channels else str(model.get("_target_", "?")).rsplit(".", 1)[-1]


def ordered(runs: Sequence[Run]) -> list[Run]:
    """Runs by model group (first appearance), then strategy (``none`` first, then as they came)."""
    groups = list(dict.fromkeys(r.group for r in runs))
    labels = strategy_order(runs)
    return sorted(runs, key=lambda r: (groups.index(r.group), labels.index(r.strategy_label), _job_order(r.path)))


def strategy_order(runs: Sequence[Run]) -> list[str]:
    """Strategy labels: the built-in ones in the order they are registered (the paper's: none, sqrt2,
    constant, learnable, ...), then any other in the order the runs name them (sweep order)."""
    from scalelong.scaling import STRATEGIES

    builtin = list(STRATEGIES)
    seen = list(dict.fromkeys(r.strategy_label for r in sorted(runs, key=lambda r: _job_order(r.path))))

    def rank(label: str) -> tuple[int, int]:
        name = label.split(" ")[0]
        return (builtin.index(name) if name in builtin else len(builtin), seen.index(label))

    return sorted(seen, key=rank)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = []
    for d in find_runs(paths):
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
        runs.append(Run(d, config, read_metrics(d), read_fid(d)))
    return runs
