"""FID and KID of a diffusion model's samples against reference statistics, over any number of ranks.

    extractor = load_inception("clean", device=module.device)
    ref = load_reference(default_reference_path("cifar10", "clean", "train", 32))
    result = evaluate_module(module, ref, extractor, num=50_000, sampler="euler_maruyama", steps=1000)

Each rank draws its share of the samples (see ``scalelong.metrics.sampling``), turns them into
features and float64 sums, and the sums are added over ranks; rank 0 computes FID and KID and
every rank gets the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scalelong.errors import DataError
from scalelong.metrics.distributed import broadcast_object, rank_and_world
from scalelong.metrics.features import FeatureStats, feature_device, iter_features, to_rgb_uint8
from scalelong.metrics.frechet import frechet_distance, kernel_inception_distance
from scalelong.metrics.reference import ReferenceStats, check_compatible
from scalelong.metrics.sampling import Contexts, generate_shard

OnChunk = Callable[[Tensor, Tensor], None]


def sample_feature_stats(module: Any, extractor: Callable[[Tensor], Tensor], num: int, sampler: str, steps: int,
                         seed: int = 0, chunk_size: int = 250, kid_max: int = 5000, feature_batch: int = 50,
                         workers: int = 1, on_chunk: OnChunk | None = None, verbose: bool = False,
                         generate_kwargs: Mapping[str, Any] | None = None,
                         contexts: Contexts | None = None) -> FeatureStats:
    """All-reduced ``FeatureStats`` of ``num`` samples shared over the ranks.

    ``on_chunk(indices, images)`` sees each chunk of this rank (for example to save it);
    ``contexts`` conditions a text-to-image model (see ``generate_shard``).
    """
    rank, world = rank_and_world()
    stats = FeatureStats(extractor.dim, feature_device(extractor), kid_max)
    t0, done = time.perf_counter(), 0
    for indices, images in generate_shard(module, num, sampler, steps, seed, chunk_size, rank, world, generate_kwargs,
                                          contexts):
        if on_chunk is not None:
            on_chunk(indices, images)
        offset = 0
        for feats in iter_features(images, extractor, feature_batch, workers):
            stats.update(feats, indices[offset:offset + len(feats)])
            offset += len(feats)
        done += len(images)
        if verbose and rank == 0:
            rate = done / (time.perf_counter() - t0)
            where = f" on rank 0 (about {min(done * world, num)}/{num} on all ranks)" if world > 1 else f"/{num}"
            print(f"samples with features: {done}{where}, {rate:.1f}/s", flush=True)
    stats.all_reduce()
    if stats.count != num:
        raise RuntimeError(f"expected {num} samples over all ranks, got {stats.count}")
    return stats


def compare(stats: FeatureStats, ref: ReferenceStats, kid_subsets: int = 100, kid_subset_size: int = 1000,
            kid_seed: int = 0) -> dict[str, Any]:
    """FID (and KID where both sides kept features) of ``stats`` against ``ref``; rank 0 computes."""
    rank, _ = rank_and_world()
    result = None
    if rank == 0:
        result = {"fid": frechet_distance(stats.mean(), stats.cov(), ref.mu, ref.sigma), "kid": None,
                  "kid_std": None, "kid_subset_size": None, "num": stats.count, "num_ref": ref.num}
        feats = stats.kid_features() if stats.kid_max else None
        if feats is not None and len(feats) >= 2 and ref.kid_feats is not None and len(ref.kid_feats) >= 2:
            kid = kernel_inception_distance(feats, ref.kid_feats, kid_subsets, kid_subset_size, kid_seed)
            result.update(kid=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size,
                          kid_num=len(feats), kid_num_ref=len(ref.kid_feats))
    return broadcast_object(result)


def evaluate_module(module: Any, ref: ReferenceStats, extractor: Callable[[Tensor], Tensor], num: int,
                    sampler: str, steps: int, seed: int = 0, chunk_size: int = 250, kid_max: int = 5000,
                    feature_batch: int = 50, workers: int = 1, on_chunk: OnChunk | None = None,
                    verbose: bool = False, generate_kwargs: Mapping[str, Any] | None = None,
                    contexts: Contexts | None = None) -> dict[str, Any]:
    """FID/KID of ``num`` EMA samples; the dict also says how they were made and with which weights."""
    warnings = check_compatible(ref, getattr(extractor, "mode", None), getattr(extractor, "sha1", None),
                                extractor.dim)
    t0 = time.perf_counter()
    stats = sample_feature_stats(module, extractor, num, sampler, steps, seed, chunk_size, kid_max, feature_batch,
                                 workers, on_chunk, verbose, generate_kwargs, contexts)
    result = compare(stats, ref)
    _, world = rank_and_world()
    result.update(sampler=sampler, steps=int(steps), seed=int(seed), chunk_size=int(chunk_size), world_size=world,
                  guidance_scale=(generate_kwargs or {}).get("guidance_scale"),
                  mode=getattr(extractor, "mode", None), inception_sha1=getattr(extractor, "sha1", None),
                  ref=None if ref.path is None else str(ref.path), ref_sha1=ref.sha1, warnings=warnings,
                  seconds=round(time.perf_counter() - t0, 1))
    return result


def quick_kid_fid(module: Any, dataset: Any, num: int = 200, sampler: str | None = None, steps: int | None = None,
                  mode: str = "clean", extractor: Callable[[Tensor], Tensor] | None = None, seed: int = 0,
                  verbose: bool = True) -> dict[str, Any]:
    """KID and FID of ``num`` EMA samples against ``num`` random images of ``dataset``, printed.

    A CPU-sized check for the end of the quickstart (one process). Inception reads 4-6 images/s
    on 2 CPU cores, so the default 200 + 200 images cost 45-100 s, plus the sampling (about
    40 s for the quickstart's tiny UNet: 200 samples x 200 Euler-Maruyama steps at about 1,000
    network evaluations/s). At this count KID is the
    meaningful number; FID is strongly biased upwards and only comparable at the same count.
    ``dataset``: an ``InMemoryImages`` or uint8 images (N, C, H, W). ``sampler``/``steps``
    default to the run's ``sample`` settings.
    """
    from scalelong.metrics.inception import load_inception

    images = dataset.images if hasattr(dataset, "images") else dataset
    images = to_rgb_uint8(images)
    if num < 2:
        raise DataError(f"quick_kid_fid needs num >= 2, got {num}")
    if len(images) < num:
        raise DataError(f"the data set has {len(images)} images, fewer than num={num}; pass a smaller num")
    sample_cfg = (getattr(module, "config", None) or {}).get("sample", {})
    sampler = sampler or sample_cfg.get("sampler", "euler_maruyama")
    steps = int(steps or sample_cfg.get("steps", 200))
    device = getattr(module, "device", torch.device("cpu"))
    t0 = time.perf_counter()
    if extractor is None:
        extractor = load_inception(mode, device=device)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
    ref_stats = FeatureStats(extractor.dim, feature_device(extractor), kid_max=num)
    for feats in iter_features(images[pick], extractor, 50, progress=verbose):
        ref_stats.update(feats)
    t1 = time.perf_counter()
    ref = ReferenceStats(ref_stats.mean(), ref_stats.cov(), ref_stats.count, ref_stats.kid_features(),
                         {"mode": getattr(extractor, "mode", None), "weights_sha1": getattr(extractor, "sha1", None)})
    result = evaluate_module(module, ref, extractor, num, sampler, steps, seed, chunk_size=min(num, 50),
                             kid_max=num, verbose=verbose)
    result.update(ref_seconds=round(t1 - t0, 1), total_seconds=round(time.perf_counter() - t0, 1))
    if verbose:
        spread = f" +- {result['kid_std']:.5f}" if result["kid_std"] else ""
        print(f"KID {result['kid']:.5f}{spread} and FID {result['fid']:.2f} on {num} samples "
              f"({sampler}, {steps} steps) vs {num} data set images, {mode} Inception (sha1 "
              f"{str(result['inception_sha1'])[:12]}); {result['total_seconds']:.0f} s. At this count "
              "trust KID; FID is biased upwards and comparable only at the same count.", flush=True)
    return result


def nan_to_none(x: Any) -> Any:
    """JSON-friendly: NaN/inf floats become None."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
