"""FID and KID of a model's samples, over any number of ranks: ``FIDEvaluator`` prepares what the
data set's protocol needs once (Inception, reference statistics, captions and latent decoder) and
evaluates; ``scripts/evaluate.py`` and the in-training ``FIDCallback`` both use it.

    evaluate = FIDEvaluator(DiffusionModel.from_checkpoint(path), mode="clean")
    result = evaluate(num=50_000, sampler="euler_maruyama", steps=1000)

Each rank draws its share of the samples, turns them into features and float64 sums, and the sums
are added over ranks; rank 0 computes FID and KID and every rank gets the same result. The network
samples in ``precision`` (bf16 autocast on CUDA by default, fp32 elsewhere: ``scalelong.precision``);
on CUDA the float32 parts, Inception included, use TF32.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathlib import Path

from scalelong.metrics.features import FeatureStats, feature_device, iter_features, to_rgb_uint8
from scalelong.metrics.frechet import frechet_distance, kernel_inception_distance
from scalelong.metrics import inception
from scalelong.metrics.inception import check_mode
from scalelong.metrics.reference import (ReferenceStats, check_compatible, default_reference_path, load_reference,
                                        make_reference_stats, reference_resolution, save_reference)
from scalelong.metrics.sampling import Contexts, generate_shard
from scalelong.precision import sampling_precision, tf32_on_cuda
from scalelong.utils.distributed import broadcast_object, rank_and_world, rank_zero_first
from scalelong.utils.errors import ConfigError, DataError

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
                  precision=(generate_kwargs or {}).get("precision"),
                  mode=getattr(extractor, "mode", None), inception_sha1=getattr(extractor, "sha1", None),
                  ref=None if ref.path is None else str(ref.path), ref_sha1=ref.sha1, warnings=warnings,
                  seconds=round(time.perf_counter() - t0, 1))
    return result


DECODER_HINT = ("U-ViT decoded with the original Stable Diffusion KL-f8 autoencoder: dataset.decoder="
                "CompVis/stable-diffusion-v1-4 dataset.decoder_subfolder=vae (or a local diffusers folder)")


class FIDEvaluator:
    """FID and KID of a ``DiffusionModel``'s EMA samples by its data set's protocol.

    Prepared once (on every rank; downloads and a missing reference computed by rank 0 first):
    the Inception network of ``mode`` (``extractor`` replaces it, e.g. in tests), the reference
    statistics (``ref``, else ``<cache>/fid_stats/{dataset}_{mode}_{split}_{res}.npz``; with
    ``build_reference`` they are computed from the data set when missing), and for latent and
    text-to-image models the autoencoder (``decoder``, default ``dataset.decoder``) and the
    captions that condition sample i (``contexts_dir``/``context_split``, default the data set's
    features and ``fid.context_split``). ``dataset`` is the data set's config (default: the
    model's run config). ``warnings`` lists what the result files should carry.
    """

    def __init__(self, model: Any, dataset: Mapping[str, Any] | None = None, *, mode: str = "clean",
                 ref: str | Path | None = None, split: str | None = None, inception_weights: str | None = None,
                 download: bool = True, extractor: Any = None, device: Any = None, build_reference: bool = False,
                 kid_max: int = 5000, feature_batch: int = 50, contexts_dir: str | Path | None = None,
                 context_split: str | None = None, decoder: str | None = None, decoder_subfolder: str | None = None,
                 seed: int = 0, verbose: bool = True):
        self.model = model
        self.dataset = dict(dataset if dataset is not None else model.config["dataset"])
        protocol = self.dataset.get("fid") or {}
        self.kid_max, self.feature_batch, self.verbose = int(kid_max), int(feature_batch), bool(verbose)
        self.contexts = self._prepare_conditions(contexts_dir, context_split, decoder, decoder_subfolder, seed)
        self.mode = getattr(extractor, "mode", None) or check_mode(mode)
        self.split = split or protocol.get("reference_split") or "train"
        self.ref_path = Path(ref) if ref else default_reference_path(self.dataset["name"], self.mode, self.split,
                                                                     reference_resolution(self.dataset))
        if not self.ref_path.is_file() and not build_reference:  # said before any download
            raise self._missing_reference()
        device = device if device is not None else model.device
        if extractor is None:
            with rank_zero_first():  # one download into the shared cache
                extractor = inception.load_inception(self.mode, inception_weights, device, download=download,
                                                     verbose=verbose)
        elif hasattr(extractor, "to"):
            extractor = extractor.to(device)
        self.extractor = extractor
        if not self.ref_path.is_file():
            self._build_reference()
        if not self.ref_path.is_file():
            raise self._missing_reference()
        self.ref = load_reference(self.ref_path)
        self.warnings = check_compatible(self.ref, self.mode, getattr(extractor, "sha1", None), extractor.dim)

    def _missing_reference(self) -> DataError:
        name, where = self.dataset["name"], " dataset.coco_dir=/path/to/coco" if self.dataset.get("coco_dir") else ""
        return DataError(f"FID reference statistics {self.ref_path} do not exist; make them with `python "
                         f"scripts/make_fid_stats.py dataset={name} mode={self.mode} split={self.split}{where}`, "
                         "give their path (--ref PATH to evaluate.py, callbacks.fid.ref=PATH in training), or "
                         "let training compute them (callbacks.fid.build_reference=true)")

    def _prepare_conditions(self, contexts_dir, context_split, decoder, decoder_subfolder, seed) -> Contexts | None:
        """Decoder of a latent model (required: FID compares pixels) and captions of a text model."""
        model, data = self.model, self.dataset
        if model.space.image_shape[0] not in (1, 3) and not model.latent_scale:
            raise ConfigError(f"FID needs images with 1 or 3 channels; data set {data['name']!r} has "
                              f"{model.space.image_shape[0]}")
        if model.latent_scale:
            if decoder:
                model.set_decoder(decoder, decoder_subfolder)
            if not model.decoder_name:
                raise ConfigError(f"FID of {data['name']} compares pixels, and this model names no autoencoder to "
                                  f"decode its latents with; pass --decoder (evaluate.py) or set dataset.decoder. "
                                  f"{DECODER_HINT}")
        if not model.text_conditional:
            return None
        return caption_contexts(data, contexts_dir, context_split, seed)

    def _build_reference(self) -> None:
        rank, _ = rank_and_world()
        with rank_zero_first():
            if rank == 0 and not self.ref_path.is_file():
                if self.verbose:
                    print(f"FID: computing reference statistics of {self.dataset['name']} ({self.split}) -> "
                          f"{self.ref_path}", flush=True)
                make_reference_stats(self.dataset, self.extractor, self.split, out=self.ref_path,
                                     kid_max=self.kid_max or 5000, batch_size=self.feature_batch, progress=self.verbose)

    def __call__(self, num: int, sampler: str, steps: int, seed: int = 0, chunk_size: int = 250,
                 guidance_scale: float = 0.0, workers: int = 1, on_chunk: OnChunk | None = None,
                 skip_scale: Any = None, precision: str | None = None) -> dict[str, Any]:
        """FID/KID of ``num`` samples; the dict also says how they were made and with which weights.

        ``skip_scale`` scales the long skips while sampling (``DiffusionModel.generate``); calling
        again with other values reuses the Inception network and the reference statistics.
        ``precision`` of the network ("bf16", "fp32"; None: bf16 on CUDA, fp32 elsewhere).
        """
        device = self.model.device
        generate_kwargs: dict[str, Any] = {"guidance_scale": float(guidance_scale or 0.0),
                                           "precision": sampling_precision(device, precision)}
        if skip_scale is not None:  # only then: other generate()s (the training module's) lack the option
            generate_kwargs["skip_scale"] = skip_scale
        with tf32_on_cuda(device):
            result = evaluate_module(self.model, self.ref, self.extractor, num, sampler, steps, seed, chunk_size,
                                     self.kid_max, self.feature_batch, workers, on_chunk, verbose=self.verbose,
                                     generate_kwargs=generate_kwargs, contexts=self.contexts)
        result["conditions"] = getattr(self.contexts, "source", None)
        return result


def caption_contexts(dataset: Mapping[str, Any], folder: str | Path | None = None, split: str | None = None,
                     seed: int = 0) -> Contexts:
    """``contexts(indices)``: the caption embeddings that condition samples with these global indices
    (U-ViT's protocol: a random caption of a random image of the features' val split)."""
    from scalelong.data.coco import CocoLatentFeatures

    root = Path(str(folder or dataset.get("data_dir") or ""))
    split = split or (dataset.get("fid") or {}).get("context_split") or "val"
    features = CocoLatentFeatures(root, split=split)

    def contexts(indices):
        return features.sample_contexts(indices, seed)

    contexts.source = f"{features.folder} ({len(features)} images)"  # for the result files
    return contexts


def quick_kid_fid(module: Any, dataset: Any, num: int = 200, sampler: str = "euler_maruyama", steps: int = 200,
                  mode: str = "clean", extractor: Callable[[Tensor], Tensor] | None = None, seed: int = 0,
                  verbose: bool = True, on_chunk: OnChunk | None = None,
                  reference_cache: str | Path | None = None, precision: str | None = None) -> dict[str, Any]:
    """KID and FID of ``num`` EMA samples against ``num`` random images of ``dataset``, printed.

    A CPU-sized check for the end of the quickstart, on every rank of a process group (each takes
    its share of the reference images and of the samples; all get the result). At a few hundred
    images KID is the meaningful number; FID is biased upwards and only comparable at the same
    count. ``dataset``: an ``InMemoryImages`` or uint8 images (N, C, H, W); ``on_chunk(indices,
    images)`` sees this rank's samples (the quickstart's final grid is made of them). With
    ``reference_cache`` (a .npz path) the data set images' statistics are computed once and reused.
    ``precision``: the network's, as in ``FIDEvaluator`` (None: bf16 on CUDA, fp32 elsewhere).
    """
    images = dataset.images if hasattr(dataset, "images") else dataset
    images = to_rgb_uint8(images)
    if num < 2:
        raise DataError(f"quick_kid_fid needs num >= 2, got {num}")
    if len(images) < num:
        raise DataError(f"the data set has {len(images)} images, fewer than num={num}; pass a smaller num")
    rank, world = rank_and_world()
    device = getattr(module, "device", torch.device("cpu"))
    t0 = time.perf_counter()
    if extractor is None:
        with rank_zero_first():  # one download into the shared cache
            extractor = inception.load_inception(mode, device=device, verbose=verbose and rank == 0)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
    # The cached statistics count only for these very images (another data_dir, another count).
    picked_sha1 = hashlib.sha1(images[pick].contiguous().numpy().tobytes()).hexdigest()
    ref = _cached_reference(reference_cache, extractor, picked_sha1)
    if ref is None:
        mine = torch.arange(num)[rank::world]  # this rank's share, by index into ``pick``
        ref_stats = FeatureStats(extractor.dim, feature_device(extractor), kid_max=num)
        done = 0
        for feats in iter_features(images[pick[mine]], extractor, 50, progress=verbose and rank == 0):
            ref_stats.update(feats, mine[done:done + len(feats)])
            done += len(feats)
        ref_stats.all_reduce()
        ref = ReferenceStats(ref_stats.mean(), ref_stats.cov(), ref_stats.count, ref_stats.kid_features(),
                             {"mode": getattr(extractor, "mode", None), "weights_sha1": getattr(extractor, "sha1", None),
                              "num": num, "seed": seed, "images_sha1": picked_sha1})
        if reference_cache is not None and rank == 0:
            save_reference(reference_cache, ref)
    t1 = time.perf_counter()
    with tf32_on_cuda(device):
        result = evaluate_module(module, ref, extractor, num, sampler, steps, seed, chunk_size=min(num, 50),
                                 kid_max=num, verbose=verbose and rank == 0, on_chunk=on_chunk,
                                 generate_kwargs={"precision": sampling_precision(device, precision)})
    result.update(ref_seconds=round(t1 - t0, 1), total_seconds=round(time.perf_counter() - t0, 1))
    if verbose and rank == 0:
        spread = f" +- {result['kid_std']:.5f}" if result["kid_std"] else ""
        print(f"KID {result['kid']:.5f}{spread} and FID {result['fid']:.2f} on {num} samples "
              f"({sampler}, {steps} steps, network in {result['precision']}) vs {num} data set images, {mode} Inception (sha1 "
              f"{str(result['inception_sha1'])[:12]}); {result['total_seconds']:.0f} s. At this count "
              "trust KID; FID is biased upwards and comparable only at the same count.", flush=True)
    return result


def _cached_reference(path: str | Path | None, extractor: Any, images_sha1: str) -> ReferenceStats | None:
    """Statistics saved by an earlier quick evaluation of the same images with the same weights, or None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        ref = load_reference(path)
    except DataError:
        return None
    same = ref.weights_sha1 == getattr(extractor, "sha1", None) and ref.meta.get("images_sha1") == images_sha1
    return ref if same and ref.kid_feats is not None else None


def nan_to_none(x: Any) -> Any:
    """JSON-friendly: NaN/inf floats become None."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
