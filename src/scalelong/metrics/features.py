"""Inception features of uint8 images (clean-fid's resize), and ``FeatureStats``: float64 sums of
features and their outer products, added over ranks, plus KID rows by global index
(``docs/design.md``, "Features and their statistics")."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from scalelong.utils.errors import DataError
from scalelong.utils.distributed import all_reduce_sum

Progress = bool | Callable[[int, int], None]


def to_rgb_uint8(images: Tensor) -> Tensor:
    """Check uint8 (N, C, H, W) with C in {1, 3}; repeat grey to 3 channels."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"FID needs uint8 images (N, C, H, W) in [0, 255], got {desc}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise DataError(f"FID needs images with 1 or 3 channels, got {images.shape[1]}")
    return images


def preprocess(images: Tensor, resize: Callable[[np.ndarray], np.ndarray], workers: int = 1) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, 3, H', W') through ``resize`` (numpy HWC -> float HWC)."""
    arr = to_rgb_uint8(images).permute(0, 2, 3, 1).cpu().numpy()

    def one(k: int) -> np.ndarray:
        return np.asarray(resize(np.ascontiguousarray(arr[k])), dtype=np.float32)

    if workers > 1 and len(arr) > 1:
        with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while resizing
            out = list(pool.map(one, range(len(arr))))
    else:
        out = [one(k) for k in range(len(arr))]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def progress_reporter(progress: Progress, total: int, desc: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    if callable(progress):
        return (lambda done: progress(done, total)), (lambda: None)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
        state = {"n": 0}

        def update(done: int) -> None:
            bar.update(done - state["n"])
            state["n"] = done

        return update, bar.close
    return (lambda done: None), (lambda: None)


def feature_device(extractor: object) -> torch.device:
    """Where an extractor's features come out (the CPU for one that does not say)."""
    try:
        return torch.device(extractor.device)
    except (AttributeError, TypeError, RuntimeError):
        return torch.device("cpu")


@torch.no_grad()
def iter_features(images: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 50,
                  workers: int = 1, progress: Progress = False, desc: str = "features") -> Iterable[Tensor]:
    """Yield the features (b, D) of successive batches of ``images``; extractor needs ``.resize``."""
    n = len(images)
    update, close = progress_reporter(progress, n, desc)
    try:
        for lo in range(0, n, batch_size):
            x = preprocess(images[lo:lo + batch_size], extractor.resize, workers)
            yield extractor(x)
            update(min(lo + batch_size, n))
    finally:
        close()


def extract_features(images: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 50,
                     workers: int = 1, progress: Progress = False) -> Tensor:
    """All features (N, D) of ``images`` as float32 on the extractor's output device."""
    return torch.cat(list(iter_features(images, extractor, batch_size, workers, progress)))


class FeatureStats:
    """Running float64 sums for the mean and covariance of features, reducible over ranks.

    ``update(feats, indices)``: ``indices`` are the samples' global indices (needed only for the
    KID rows; by default the next ``count`` positions of this process).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", kid_max: int = 0):
        self.dim = int(dim)
        self.device = torch.device(device)
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self.count = 0
        self.kid_max = int(kid_max)
        self.kid_rows = torch.zeros(self.kid_max, self.dim, dtype=torch.float32, device=self.device)
        self.kid_filled = torch.zeros(self.kid_max, dtype=torch.int32, device=self.device)
        self.reduced = False

    def update(self, feats: Tensor, indices: Tensor | None = None) -> None:
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features (n, {self.dim}), got {tuple(feats.shape)}")
        f = feats.to(self.device, torch.float64)
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)
        if self.kid_max:
            if indices is None:
                indices = torch.arange(self.count, self.count + len(f))
            indices = torch.as_tensor(indices, device=self.device).long()
            keep = indices < self.kid_max
            self.kid_rows[indices[keep]] = f[keep].float()
            self.kid_filled[indices[keep]] += 1
        self.count += len(f)

    def all_reduce(self) -> FeatureStats:
        """Sum every rank's share into every rank (a no-op without a process group)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for t in (self.sum, self.outer, count, self.kid_rows, self.kid_filled):
            t.copy_(all_reduce_sum(t))
        self.count = int(round(count.item()))
        if self.kid_max and int(self.kid_filled.max()) > 1:
            raise RuntimeError("two ranks produced the same global sample index; the shards overlap")
        self.reduced = True
        return self

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features were accumulated")
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divisor n - 1), as ``np.cov``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mu = self.sum / self.count
        c = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return ((c + c.T) / 2).cpu().numpy()

    def kid_features(self) -> np.ndarray:
        """The stored KID rows (the first ``min(count, kid_max)`` global indices), float32."""
        return self.kid_rows[self.kid_filled > 0].cpu().numpy()


def feature_stats(images: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 50,
                  kid_max: int = 0, workers: int = 1, progress: Progress = False,
                  indices: Tensor | None = None, reduce: bool = True) -> FeatureStats:
    """``FeatureStats`` of ``images`` (this rank's share when ``indices`` gives their global indices)."""
    stats = None
    offset = 0
    for feats in iter_features(images, extractor, batch_size, workers, progress):
        if stats is None:
            stats = FeatureStats(feats.shape[1], feats.device, kid_max)
        idx = None if indices is None else indices[offset:offset + len(feats)]
        stats.update(feats, idx)
        offset += len(feats)
    if stats is None:
        dim = getattr(extractor, "dim", None)
        if dim is None:
            raise DataError("no images to compute features of")
        stats = FeatureStats(dim, "cpu", kid_max)
    return stats.all_reduce() if reduce else stats


def throughput(images: Tensor, extractor: Callable[[Tensor], Tensor], batch_size: int = 50,
               workers: int = 1) -> dict[str, float]:
    """Images per second of resizing, of the network, and of both, on ``images``."""
    t0 = time.perf_counter()
    x = preprocess(images, extractor.resize, workers)
    t1 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(x), batch_size):
            out = extractor(x[lo:lo + batch_size])
        if out.is_cuda:
            torch.cuda.synchronize()
    t2 = time.perf_counter()
    n = len(images)
    return {"resize_per_s": n / (t1 - t0), "network_per_s": n / (t2 - t1), "total_per_s": n / (t2 - t0)}
