"""What a run does after its last step: the quick KID/FID on a CPU-sized count of samples (with
``quick_eval``), on the digits their legibility, samples/final.png of those samples, and the
estimate of how long that takes, which the progress printer shows after the first steps.
``cli/train.py`` composes these into the run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalelong.utils.io import write_text


def quick_eval(module, data, quick: Mapping[str, Any], sample: Mapping[str, Any], run_dir: Path, write: bool,
               extractor) -> dict[str, float]:
    """KID and FID on a CPU-sized count at the end of a short run (the quickstart), with the run's
    sampler, and on the digits the samples' legibility; quick_eval.json (and, with
    ``quick_eval.grid``, samples/final.png of the same samples) written by rank 0. The data set's
    statistics are cached for the next run."""
    from scalelong.metrics.evaluation import nan_to_none, quick_kid_fid
    from scalelong.utils.distributed import all_gather_object
    from scalelong.utils.io import save_image_grid

    num = int(quick["num"])
    size = quick_eval_size(quick, data.dataset_cfg)
    drawn = int(data.dataset_cfg.get("image_size") or size)  # the size the network draws at
    model, reference = module.model, data.data
    if size != drawn:  # drawn at another size than scored
        model, reference = _DrawnResized(module.model, size), _reference_at(data, size)
    kept: list = []  # (sample indices, images) of this rank's share
    reader = _digit_reader(data.dataset_cfg, size)
    readings: list = []  # (sample indices, confidences, classes) of this rank's share

    def on_chunk(indices, images):
        kept.append((indices, images))
        if reader is not None:
            readings.append((indices, *reader.read(images)))

    cache = _quick_reference(data.dataset_cfg["name"], num, size)
    result = quick_kid_fid(model, reference, num=num, sampler=sample["sampler"], steps=int(sample["steps"]),
                           extractor=extractor, on_chunk=on_chunk, reference_cache=cache)
    result["size"], result["drawn_size"] = size, drawn  # scored and shown at, drawn at
    shares = all_gather_object(kept) if quick.get("grid") else []  # collective: on every rank
    metrics = {"eval/quick_kid": float(result["kid"]), "eval/quick_fid": float(result["fid"])}
    if reader is not None:  # the same on every rank
        result["legibility"] = _legibility(reader, all_gather_object(readings), num, write)
        metrics.update({"eval/legibility": result["legibility"]["mean_confidence"],
                        "eval/legible_fraction": result["legibility"]["confident"] / num})
    if write:
        write_text(run_dir / "quick_eval.json", json.dumps({k: nan_to_none(v) for k, v in result.items()},
                                                           indent=2, default=str) + "\n")
        pieces = [piece for share in shares for piece in share]
        if pieces:
            import torch

            grid = torch.zeros(num, *pieces[0][1].shape[1:], dtype=pieces[0][1].dtype)
            for indices, images in pieces:
                grid[torch.as_tensor(indices)] = images.cpu()
            save_image_grid(grid, run_dir / "samples" / "final.png")
    return metrics


def quick_eval_size(quick: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> int:
    """The side of the images the end's evaluation scores and shows: ``quick_eval.size``, or
    (null) the data set's ``image_size``."""
    return int(quick.get("size") or dataset_cfg.get("image_size") or 0)


def as_shown_at_end(images, config: Mapping[str, Any]):
    """uint8 samples (N, C, H, W) as the run's end showed them in samples/final.png: resized to its
    ``quick_eval.size`` where it set one (the quickstart's 8x8 digits as 16x16), else as drawn.
    For the grids of sample.py and evaluate.py; their .npz files keep the samples as drawn."""
    from scalelong.data.images import resize_uint8

    size = (config.get("quick_eval") or {}).get("size")
    return resize_uint8(images, int(size)) if size else images


class _DrawnResized:
    """A model whose samples come resized to ``size`` (``resize_uint8``): the digits drawn at their
    native 8x8 are scored, read and shown as the data set's 16x16 digits (``quick_eval.size``)."""

    def __init__(self, model, size: int):
        self._model, self._size = model, size

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        from scalelong.data.images import resize_uint8

        return resize_uint8(self._model.generate(*args, **kwargs), self._size)


def _reference_at(data, size: int):
    """The data set's images at ``size``: loaded at that size where its loader makes sizes (the
    digits' own 16x16: the very images a 16x16 run's evaluation compares with), else resized."""
    from scalelong.data import build_dataset
    from scalelong.data.images import resize_uint8
    from scalelong.utils.errors import ConfigError

    try:
        return build_dataset({**data.dataset_cfg, "image_size": size}).images
    except ConfigError:  # a loader of one size only
        return resize_uint8(data.data.images, size)


def _digit_reader(dataset_cfg: Mapping[str, Any], size: int):
    """The digit classifier's reader for the built-in digits scored at 16x16 (or their native
    8x8, read as 16x16), else None."""
    if dataset_cfg.get("name") != "digits" or size not in (8, 16):
        return None
    from scalelong.metrics.digits import DigitReader

    return DigitReader()


def _legibility(reader, shares: list, num: int, verbose: bool) -> dict[str, Any]:
    """The samples' legibility (summary and per sample, in sample order) beside that of real
    digits the classifier never saw, read the same way; its line printed when ``verbose``."""
    from scalelong.metrics.digits import legibility, legibility_line, readings_in_order

    confidence, label = readings_in_order(shares, num)
    samples, real = legibility(confidence, label), reader.real_digits()
    if verbose:
        print(legibility_line(samples, real), flush=True)
    return {**samples, "real_digits": real, "classifier_sha1": reader.sha1,
            "per_sample": {"confidence": [round(float(c), 4) for c in confidence], "class": label.tolist()}}


def _quick_reference(dataset: str, num: int, size: int) -> Path:
    """Where the quick evaluation caches the statistics of ``num`` images of the data set at
    ``size`` x ``size`` (a run at another size finds its own, not one it would overwrite)."""
    from scalelong.metrics.inception import cache_dir

    return cache_dir() / "fid_stats" / f"quick_{dataset}{size}_clean_n{num}_seed0.npz"


def load_inception_for_the_end(config: Mapping[str, Any]) -> tuple[Any, float]:
    """The Inception network for the KID/FID at the end, loaded before training (so missing
    weights stop the run at once), and its measured seconds per image on this machine."""
    import time

    import torch

    from scalelong.metrics import inception
    from scalelong.metrics.features import iter_features
    from scalelong.utils.errors import DataError

    try:
        extractor = inception.load_inception("clean", verbose=False)
    except DataError as err:
        raise DataError(f"{err}; or train without the KID/FID at the end: quick_eval=null") from None
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    list(iter_features(images[:1], extractor, 1))  # warm-up
    t0 = time.perf_counter()
    list(iter_features(images, extractor, 4))
    return extractor, (time.perf_counter() - t0) / 4


def grid_at_end(config: Mapping[str, Any]) -> bool:
    """Whether SampleGrid samples samples/final.png after the last step: not when the quick
    evaluation's own samples become that grid (``quick_eval.grid``), nor with ``sample.at_end=false``."""
    quick = config.get("quick_eval") or {}
    return bool(config["sample"].get("at_end", True)) and not quick.get("grid")


def end_of_run_estimate(config: Mapping[str, Any], inception: tuple[Any, float] | None):
    """``seconds per training step -> (seconds of sampling and evaluation at the end, what)``."""
    sample, quick, batch = config["sample"], config.get("quick_eval"), int(config["train"]["batch_size"])

    def estimate(seconds_per_step: float) -> tuple[float, str]:
        forward = seconds_per_step / (3 * batch)  # one network evaluation: about a third of a training image
        seconds, what = 0.0, []
        if grid_at_end(config) and sample["num"]:
            seconds += sample["num"] * sample["steps"] * forward
            what.append(f"a grid of {sample['num']} samples")
        if quick:
            num = int(quick["num"])
            cached = _quick_reference(config["dataset"]["name"], num, quick_eval_size(quick, config["dataset"]))
            images = num if cached.is_file() else 2 * num
            seconds += num * sample["steps"] * forward + images * (inception[1] if inception else 0.2)
            what.append(f"{num} samples and their KID/FID")
        return seconds, " and ".join(what)

    return estimate
