"""Reference statistics of a data set's features (``{dataset}_{mode}_{split}_{res}.npz``), saved
once with their metadata and sha1, and clean-fid's published files (``docs/design.md``,
"Reference statistics")."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from scalelong.utils.errors import ConfigError, DataError
from scalelong.utils.io import atomic_write, write_text
from scalelong.metrics.features import FeatureStats, feature_device, iter_features, progress_reporter
from scalelong.metrics.inception import cache_dir, check_mode, file_digest

# Data sets whose reference statistics clean-fid publishes: name -> (resolution, splits).
PUBLISHED = {"cifar10": (32, ("train", "test"))}
PUBLISHED_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    num: int
    kid_feats: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha1: str | None = None  # of the file it was loaded from

    @property
    def weights_sha1(self) -> str | None:
        return self.meta.get("weights_sha1")

    @property
    def mode(self) -> str | None:
        return self.meta.get("mode")


def reference_resolution(dataset_cfg: Mapping[str, Any]) -> int:
    """The pixel resolution FID compares at: ``fid.reference_res`` (latent data sets), else the image size."""
    return int((dataset_cfg.get("fid") or {}).get("reference_res") or dataset_cfg["image_size"])


def reference_filename(dataset: str, mode: str, split: str, res: int) -> str:
    return f"{dataset}_{mode}_{split}_{res}.npz".lower()


def default_reference_path(dataset: str, mode: str = "clean", split: str = "train", res: int = 32,
                           cache: str | os.PathLike | None = None) -> Path:
    root = Path(cache) if cache is not None else cache_dir()
    return root / "fid_stats" / reference_filename(dataset, mode, split, res)


def save_reference(path: str | os.PathLike, stats: ReferenceStats) -> str:
    """Write ``stats`` to ``path`` (.npz) and its sidecar .json atomically; returns the file's sha1."""
    path = Path(path)
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
              "num": np.asarray(stats.num), "meta": np.asarray(json.dumps(stats.meta, sort_keys=True))}
    if stats.kid_feats is not None:
        arrays["kid_feats"] = np.asarray(stats.kid_feats, np.float32)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    sha1 = file_digest(path)
    write_text(path.with_suffix(".json"), json.dumps({"file": path.name, "sha1": sha1, "num": int(stats.num),
                                                      **stats.meta}, indent=2, sort_keys=True) + "\n")
    stats.path, stats.sha1 = path, sha1
    return sha1


def load_reference(path: str | os.PathLike) -> ReferenceStats:
    """Read a file written by ``save_reference`` or one of clean-fid's published ``.npz`` files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics {path} do not exist; make them with "
                        "`python scripts/make_fid_stats.py dataset=NAME mode=MODE` or pass --ref PATH")
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            num = int(z["num"]) if "num" in z else 0
            kid = z["kid_feats"] if "kid_feats" in z else None
            meta = json.loads(str(z["meta"])) if "meta" in z else {"source": "clean-fid published"}
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is not a reference statistics file with mu and sigma "
                        f"({type(err).__name__}: {err})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DataError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return ReferenceStats(mu, sigma, num, kid, meta, path, file_digest(path))


def check_compatible(ref: ReferenceStats, mode: str, weights_sha1: str | None, dim: int) -> list[str]:
    """Raise when ``ref`` cannot be compared with features of ``mode``/``weights_sha1``; return warnings."""
    if len(ref.mu) != dim:
        raise ConfigError(f"reference statistics {ref.path} have {len(ref.mu)} features, the extractor gives {dim}")
    if ref.mode is not None and ref.mode != mode:
        raise ConfigError(f"reference statistics {ref.path} were made in mode {ref.mode!r}, this evaluation "
                          f"uses {mode!r}; make statistics for this mode or pass --mode {ref.mode}")
    warnings = []
    if ref.weights_sha1 is None:
        warnings.append(f"reference statistics {ref.path} do not record their Inception weights; "
                        f"compared with features of weights sha1 {weights_sha1}")
    elif weights_sha1 is not None and ref.weights_sha1 != weights_sha1:
        raise ConfigError(f"reference statistics {ref.path} were made with Inception weights sha1 "
                          f"{ref.weights_sha1}, this evaluation uses {weights_sha1}; FIDs across different "
                          "weights are not comparable: remake the statistics or configure the same weights")
    return warnings


def compute_reference(images: Tensor | ImageSource, extractor: Callable[[Tensor], Tensor],
                      meta: Mapping[str, Any] | None = None, batch_size: int = 50, kid_max: int = 5000,
                      workers: int = 1, progress: bool = False, order: Tensor | None = None,
                      kid_seed: int = 0) -> ReferenceStats:
    """Statistics of uint8 ``images`` (N, C, H, W), or of an ``ImageSource`` read in pieces;
    ``order`` picks (and orders) the images used; ``meta`` is stored with them.

    KID keeps the features of ``kid_max`` images chosen by a permutation seeded with ``kid_seed``
    (recorded in the metadata), never the first ones in the data set's order, which for a
    class-sorted folder would be a few classes only. Images are still read in order.
    """
    t0 = time.perf_counter()
    source = TensorImages(images) if isinstance(images, Tensor) else images
    order = torch.arange(len(source)) if order is None else torch.as_tensor(order)
    if len(order) < 2:
        raise DataError(f"reference statistics need at least 2 images, got {len(order)}")
    # kid_rank[k]: the position of the k-th image read in a random order; rows of rank < kid_max are kept.
    kid_rank = torch.empty(len(order), dtype=torch.long)
    kid_rank[torch.randperm(len(order), generator=torch.Generator().manual_seed(int(kid_seed)))] = \
        torch.arange(len(order))
    stats = FeatureStats(extractor.dim, feature_device(extractor), kid_max)
    update, close = progress_reporter(progress, len(order), "reference features")
    try:
        piece = batch_size * 8  # what one read holds in memory
        for lo in range(0, len(order), piece):
            done = lo
            for feats in iter_features(source.take(order[lo:lo + piece]), extractor, batch_size, workers):
                stats.update(feats, kid_rank[done:done + len(feats)])
                done += len(feats)
            update(min(lo + piece, len(order)))
    finally:
        close()
    weights = getattr(extractor, "weights", None)
    info = {"mode": getattr(extractor, "mode", None), "weights_sha1": getattr(extractor, "sha1", None),
            "weights_source": getattr(weights, "source", None),
            "weights_file": None if weights is None else Path(weights.path).name,
            "num": stats.count, "seconds": round(time.perf_counter() - t0, 1),
            "kid_rows": "seeded random subset" if kid_max else None, "kid_seed": int(kid_seed) if kid_max else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(meta or {})}
    return ReferenceStats(stats.mean(), stats.cov(), stats.count, stats.kid_features() if kid_max else None, info)


class ImageSource(Protocol):
    """Images read a piece at a time: ``take(indices)`` -> uint8 (n, C, H, W)."""

    def __len__(self) -> int: ...

    def take(self, indices: Tensor) -> Tensor: ...


class TensorImages:
    """An ``ImageSource`` over uint8 images in memory (or memory-mapped)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: Tensor) -> Tensor:
        return self.images[indices]


# Reference splits of data sets whose loader cannot check them: digits has one split and
# ignores ``split``; MS-COCO's reference is a COCO 2014 image folder, not the features' split.
KNOWN_SPLITS = {"digits": ["train"], "mscoco": ["val2014", "train2014"]}


def check_split(dataset_cfg: Mapping[str, Any], split: str) -> None:
    """Refuse a split the data set cannot have; loaders that read ``split`` check it themselves."""
    listed = dataset_cfg.get("splits") or KNOWN_SPLITS.get(str(dataset_cfg.get("name")))
    if listed is not None and split not in listed:
        raise ConfigError(f"data set {dataset_cfg.get('name')!r} has no split {split!r}; "
                          f"valid splits: {', '.join(listed)}")


def reference_images(dataset_cfg: Mapping[str, Any], split: str = "train") -> ImageSource:
    """The uint8 images of a data set's ``split`` as FID's reference sees them (an ``ImageSource``).

    Pixel data sets: the images training loads (the loader receives the split as
    ``cfg["split"]`` and rejects one it does not have; a config may list its splits in
    ``splits``). MS-COCO: the COCO 2014 images of ``coco_dir/<split>`` at ``fid.reference_res``,
    centre-cropped as U-ViT does and decoded on demand (``CocoImages``).
    """
    check_split(dataset_cfg, split)
    if dataset_cfg.get("name") == "mscoco":
        from scalelong.data.coco import CocoImages

        if not dataset_cfg.get("coco_dir"):
            raise DataError("set dataset.coco_dir to the folder that holds COCO 2014's val2014/ images (FID's "
                            "reference for MS-COCO)")
        return CocoImages(Path(str(dataset_cfg["coco_dir"])).expanduser() / split, reference_resolution(dataset_cfg))
    from scalelong.data import build_dataset

    return TensorImages(build_dataset({**dataset_cfg, "split": split}).images)


def published_reference(name: str, mode: str = "clean", split: str = "train",
                        res: int | None = None) -> Path:
    """clean-fid's published statistics file for ``name`` (downloaded into clean-fid's stats folder).

    Offline this fails with a ``DataError`` that says how to make the statistics locally instead.
    """
    check_mode(mode)
    if name not in PUBLISHED:
        raise ConfigError(f"clean-fid publishes no statistics for {name!r} here; known: {', '.join(PUBLISHED)}; "
                          f"compute them with scripts/make_fid_stats.py dataset={name}")
    pub_res, splits = PUBLISHED[name]
    res = int(res or pub_res)
    if split not in splits or res != pub_res:
        raise ConfigError(f"clean-fid publishes {name} statistics for splits {', '.join(splits)} at {pub_res} px, "
                          f"not split {split!r} at {res} px")
    import cleanfid
    from cleanfid.downloads_helper import check_download_url

    fname = reference_filename(name, mode, split, res)
    try:
        local = check_download_url(os.path.join(os.path.dirname(cleanfid.__file__), "stats"), PUBLISHED_URL + fname)
    except Exception as err:
        target = Path(os.path.dirname(cleanfid.__file__)) / "stats" / fname
        try:  # clean-fid leaves an empty file behind when the download fails
            if target.is_file() and target.stat().st_size == 0:
                target.unlink()
        except OSError:
            pass
        raise DataError(f"clean-fid's published statistics {fname} could not be downloaded "
                        f"({type(err).__name__}: {err}); without a network, compute them from the data set with "
                        f"`python scripts/make_fid_stats.py dataset={name} mode={mode} split={split}`, "
                        f"or copy {fname} to {target}") from None
    return Path(local)


def convert_published(name: str, mode: str = "clean", split: str = "train", res: int | None = None,
                      out: str | os.PathLike | None = None) -> Path:
    """Copy clean-fid's published statistics into this project's format (with metadata) and cache."""
    src = published_reference(name, mode, split, res)
    ref = load_reference(src)
    ref.meta = {"dataset": name, "split": split, "mode": mode, "res": int(res or PUBLISHED[name][0]),
                "weights_sha1": None, "weights_source": "clean-fid published (NVIDIA inception-2015-12-05.pt)",
                "source": f"{PUBLISHED_URL}{src.name}", "source_sha1": ref.sha1}
    ref.kid_feats = None
    path = Path(out) if out is not None else default_reference_path(name, mode, split, ref.meta["res"])
    save_reference(path, ref)
    return path


def make_reference_stats(dataset_cfg: Mapping[str, Any], extractor: Callable[[Tensor], Tensor],
                         split: str = "train", out: str | os.PathLike | None = None, num: int | None = None,
                         batch_size: int = 50, kid_max: int = 5000, workers: int = 1,
                         progress: bool = True) -> tuple[Path, ReferenceStats]:
    """Compute and save the statistics of a data set's split; returns (path, stats).

    ``num`` limits the count to the first ``num`` images of a fixed random permutation (seed 0);
    such a subset is saved as ``..._n{num}.npz`` unless ``out`` names the file.
    """
    source = reference_images(dataset_cfg, split)
    full = len(source)
    order = None
    if num is not None and num < full:
        order = torch.randperm(full, generator=torch.Generator().manual_seed(0))[:num]
    count = full if order is None else len(order)
    name = str(dataset_cfg["name"])
    res = int(source.take(torch.tensor([0])).shape[-1])
    mode = getattr(extractor, "mode", "clean")
    meta = {"dataset": name, "split": split, "res": res, "dataset_size": full}
    stats = compute_reference(source, extractor, meta, batch_size, kid_max, workers, progress, order)
    if out is None:
        path = default_reference_path(name, mode, split, res)
        if count < full:  # a subset never takes the name of the full statistics
            path = path.with_name(f"{path.stem}_n{count}.npz")
    else:
        path = Path(out)
    save_reference(path, stats)
    return path, stats
