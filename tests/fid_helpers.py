"""Test stand-ins for FID: a fast fake feature extractor and the worker of the two-process tests.

Importable by spawned processes (the tests folder is on their sys.path) and by Hydra's
``_target_`` (``fid_helpers.LinearFeatures``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class LinearFeatures(torch.nn.Module):
    """A fixed random linear map of the (resized) pixels: stands in for Inception in fast tests.

    Same interface as ``scalelong.metrics.inception.InceptionFeatures``: ``resize`` (numpy HWC
    uint8 -> float32 HWC, here clean-fid's PIL bicubic to ``size``), ``dim``, ``mode``, ``sha1``,
    and a call on float (B, 3, size, size) in [0, 255].
    """

    def __init__(self, dim: int = 8, size: int = 8, seed: int = 0, mode: str = "clean"):
        super().__init__()
        from cleanfid.resize import make_resizer

        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * size * size, dim, generator=g) / (3 * size * size) ** 0.5)
        self.dim, self.size, self.mode, self.sha1 = dim, size, mode, f"linear-{dim}-{size}-{seed}"
        self.resize = make_resizer("PIL", False, "bicubic", (size, size))

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, self.size, self.size), x.shape
        return (x.to(self.weight.device).flatten(1) / 255.0) @ self.weight


class IndexedGenerator:
    """Stands in for ``DiffusionModule.generate`` in the two-process test (no Lightning import there):
    a chunk's images are a pure function of its seed, as the real ``generate``'s are."""

    num_classes = 0

    def generate(self, n, sampler, steps, seed, use_ema=True, labels=None, batch_size=None, precision=None):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)


def two_process_worker(rank: int, world: int, init_file: str, work: str) -> None:
    """One rank of the gloo tests: reduced feature statistics and sharded sampling."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from scalelong.metrics.features import FeatureStats, feature_stats
    from scalelong.metrics.sampling import generate_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        work_dir = Path(work)
        data = torch.load(work_dir / "inputs.pt", weights_only=False)

        # 1. statistics of an uneven split of fixed features, with global indices for KID
        feats, cut = data["feats"], data["cut"]
        lo, hi = (0, cut) if rank == 0 else (cut, len(feats))
        stats = FeatureStats(feats.shape[1], "cpu", kid_max=data["kid_max"])
        stats.update(feats[lo:hi], torch.arange(lo, hi))
        stats.all_reduce()

        # 2. sampling: exact total, disjoint shares, and features of the union via the fake extractor
        indices, images = [], []
        for idx, img in generate_shard(IndexedGenerator(), data["num"], "euler_maruyama", 2, seed=3, chunk_size=2):
            indices.append(idx)
            images.append(img)
        indices, images = torch.cat(indices), torch.cat(images)
        sample_stats = feature_stats(images, LinearFeatures(), batch_size=3, kid_max=data["num"], indices=indices)
        torch.save({"mean": stats.mean(), "cov": stats.cov(), "count": stats.count, "kid": stats.kid_features(),
                    "indices": indices, "images": images, "sample_mean": sample_stats.mean(),
                    "sample_cov": sample_stats.cov(), "sample_count": sample_stats.count,
                    "sample_kid": sample_stats.kid_features()}, work_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)
