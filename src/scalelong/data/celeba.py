"""CelebA 64x64 (unconditional): U-ViT's 128x128 crop at (x 89, y 121) of the aligned faces,
resized to 64 and prepared once into a memory-mapped ``.npy`` (``docs/design.md``, "CelebA 64")."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scalelong.data.arrays import data_dir_of, default_workers, map_ordered, open_image_array, write_images_npy
from scalelong.data.images import InMemoryImages
from scalelong.utils.errors import DataError

ALIGNED_SIZE = (178, 218)  # (width, height) of every img_align_celeba image
CROP_CENTER = (89, 121)  # (x, y), U-ViT's choice
CROP_SIZE = 128
CROP_BOX = (CROP_CENTER[0] - CROP_SIZE // 2, CROP_CENTER[1] - CROP_SIZE // 2,
            CROP_CENTER[0] + CROP_SIZE // 2, CROP_CENTER[1] + CROP_SIZE // 2)  # (25, 57, 153, 185)
RESAMPLE = Image.BILINEAR
SPLITS = {"train": 0, "valid": 1, "test": 2}
_SOURCE = "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt"
_CELEBA_SITE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


def prepared_path(data_dir: Path, size: int = 64, split: str = "train") -> Path:
    return Path(data_dir) / f"celeba{size}_{split}.npy"


def _prepare_command(data_dir: Path, size: int) -> str:
    return f"`python scripts/prepare_celeba64.py --data-dir {data_dir}" + (f" --size {size}`" if size != 64 else "`")


def load_celeba(cfg: Mapping[str, Any]) -> InMemoryImages:
    """The prepared CelebA split, memory-mapped: uint8 (N, 3, S, S), no labels.

    Keys read: ``data_dir`` (the folder holding ``celeba/`` and the prepared file),
    ``image_size`` (S, default 64), ``split`` (default ``train``).
    """
    size = int(cfg.get("image_size", 64))
    split = str(cfg.get("split", "train"))
    root = data_dir_of(cfg, "CelebA", f"{_SOURCE} (torchvision's layout) and the prepared celeba{size}_train.npy")
    path = prepared_path(root, size, split)
    command = _prepare_command(root, size)
    if not path.is_file():
        source = ("" if (root / "celeba" / "img_align_celeba").is_dir() else
                  f"; that script reads torchvision's layout {root}/{_SOURCE} (from {_CELEBA_SITE}: "
                  f"img_align_celeba.zip and Eval/list_eval_partition.txt), which is not there either")
        raise DataError(f"CelebA {size}x{size} is not prepared: expected {path} (uint8 N x 3 x {size} x {size}); "
                        f"make it once with {command}{source}; or point to the folder that holds it with "
                        f"dataset.data_dir=/path/to/folder")
    images = open_image_array(path, (3, size, size), command)
    return InMemoryImages(images, None, num_classes=0)


def crop_celeba(image: Image.Image, size: int = 64) -> np.ndarray:
    """An aligned 178 x 218 CelebA image -> uint8 (3, size, size): U-ViT's crop, then the resize."""
    face = image.convert("RGB").crop(CROP_BOX)
    if size != CROP_SIZE:
        face = face.resize((size, size), RESAMPLE)
    return np.asarray(face, dtype=np.uint8).transpose(2, 0, 1)


def read_partition(path: Path, split: str = "train") -> list[str]:
    """File names of ``split`` from ``list_eval_partition.txt``, in the file's order."""
    if split not in SPLITS:
        raise DataError(f"unknown CelebA split {split!r}; valid: {', '.join(SPLITS)}")
    if not path.is_file():
        raise DataError(f"CelebA partition file {path} is missing; get Eval/list_eval_partition.txt from "
                        f"{_CELEBA_SITE} and put it there (torchvision's layout), or point to another folder "
                        f"with --data-dir")
    names = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in {"0", "1", "2"}:
            raise DataError(f"{path} line {lineno} is {line!r}, expected '<name>.jpg <0|1|2>'; the file is damaged, "
                            f"get a fresh copy from {_CELEBA_SITE}")
        if int(parts[1]) == SPLITS[split]:
            names.append(parts[0])
    return names


def _crop_file(job: tuple[str, int]) -> np.ndarray:
    path, size = job
    try:
        with Image.open(path) as img:
            if img.size != ALIGNED_SIZE:
                raise DataError(f"{path} is {img.size[0]} x {img.size[1]}, not an aligned 178 x 218 CelebA image; "
                                f"use the 'Align&Cropped' images (img_align_celeba)")
            return crop_celeba(img, size)
    except (OSError, SyntaxError) as err:  # PIL's errors for missing, truncated or non-image files
        raise DataError(f"cannot read CelebA image {path} ({err}); replace it from img_align_celeba.zip") from err


def prepare_celeba64(data_dir: str | Path, size: int = 64, split: str = "train", workers: int | None = None,
                     progress: bool = True, chunk: int = 256) -> Path:
    """Crop and resize a CelebA split once into ``data_dir/celeba{size}_{split}.npy`` (uint8 N x 3 x S x S).

    Reads torchvision's layout under ``data_dir/celeba``; images keep the partition file's order.
    The output is written atomically (no file until the last image is in); ``workers``
    processes decode JPEGs (default: up to 8).
    """
    root = Path(data_dir)
    names = read_partition(root / "celeba" / "list_eval_partition.txt", split)
    if not names:
        raise DataError(f"{root}/celeba/list_eval_partition.txt lists no {split} images; get a fresh copy from "
                        f"{_CELEBA_SITE}")
    folder = root / "celeba" / "img_align_celeba"
    if not folder.is_dir():
        raise DataError(f"CelebA images not found: expected {folder}/000001.jpg ... (img_align_celeba.zip from "
                        f"{_CELEBA_SITE}, torchvision's layout {root}/{_SOURCE}); or point to another folder with "
                        f"--data-dir")
    out = prepared_path(root, size, split)
    jobs = [(str(folder / name), size) for name in names]
    workers = default_workers() if workers is None else workers
    write_images_npy(out, map_ordered(_crop_file, jobs, workers), len(jobs), size,
                     f"CelebA {split} -> {out.name}", progress, chunk)
    return out
