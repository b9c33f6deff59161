"""ImageNet 64x64 (class-conditional), prepared once from the Downsampled ImageNet npz batches or
the raw training folder (ADM's crop) into memory-mapped ``.npy`` files. Formats: ``docs/design.md``,
"ImageNet 64"."""

from __future__ import annotations

import sys
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scalelong.data.arrays import (data_dir_of, default_workers, load_label_array, map_ordered, open_image_array,
                                   write_images_npy, write_npy_stream)
from scalelong.data.images import InMemoryImages
from scalelong.utils.errors import ConfigError, DataError
from scalelong.utils.io import atomic_write, write_text

SOURCES = ("npz", "folder")
NPZ_BATCHES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}
_DOWNLOAD = "https://image-net.org/download-images"
_READ_ROWS = 1024  # rows per block while streaming npz data (12.6 MB at 64x64)


def prepared_paths(data_dir: Path, source: str, size: int = 64) -> tuple[Path, Path]:
    """(images .npy, labels .npy) of a prepared source."""
    return (Path(data_dir) / f"imagenet{size}_{source}_images.npy",
            Path(data_dir) / f"imagenet{size}_{source}_labels.npy")


def _command(data_dir: Path, source: str, size: int) -> str:
    extra = f" --size {size}" if size != 64 else ""
    return f"`python scripts/prepare_imagenet64.py --source {source} --data-dir {data_dir}{extra}`"


def load_imagenet64(cfg: Mapping[str, Any]) -> InMemoryImages:
    """The prepared ImageNet 64 training set, memory-mapped: uint8 (N, 3, S, S), labels (N,) 0-based.

    Keys read: ``data_dir`` (folder with the prepared files), ``image_size`` (S, default 64),
    ``num_classes`` (default 1000; labels must lie below it), ``source`` (``npz``, ``folder``
    or ``auto``, the default: whichever was prepared; an error if both were), ``split``
    (``train`` only).
    """
    size = int(cfg.get("image_size", 64))
    num_classes = int(cfg.get("num_classes", 1000))
    source = str(cfg.get("source", "auto"))
    if str(cfg.get("split", "train")) != "train":
        raise DataError(f"ImageNet 64 offers the train split only, not {cfg.get('split')!r}")
    root = data_dir_of(cfg, "ImageNet 64", f"the prepared imagenet{size}_<npz|folder>_images.npy and _labels.npy")
    if source not in (*SOURCES, "auto"):
        raise DataError(f"unknown ImageNet source dataset.source={source!r}; valid: npz, folder, auto")
    if source == "auto":
        found = [s for s in SOURCES if all(p.is_file() for p in prepared_paths(root, s, size))]
        if len(found) > 1:
            raise DataError(f"{root} holds ImageNet {size} prepared from both sources (npz and folder); choose one "
                            f"with dataset.source=npz or dataset.source=folder")
        if not found:
            raise DataError(
                f"ImageNet {size}x{size} is not prepared: expected {prepared_paths(root, 'npz', size)[0].name} and "
                f"{prepared_paths(root, 'npz', size)[1].name} (or the _folder_ pair) in {root}. Make them once "
                f"from the Downsampled ImageNet 64x64 batches {root}/train_data_batch_1.npz ... _10.npz "
                f"(Imagenet64_train npz, from {_DOWNLOAD}) with {_command(root, 'npz', size)}, or from the raw "
                f"training set {root}/train/<wnid>/*.JPEG with {_command(root, 'folder', size)}; or point to "
                f"the folder that holds them with dataset.data_dir=/path/to/folder")
        source = found[0]
    images_path, labels_path = prepared_paths(root, source, size)
    command = _command(root, source, size)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise DataError(f"ImageNet {size} ({source}) is not prepared: {path} is missing; make it once with "
                            f"{command}, or point to the folder that holds it with dataset.data_dir=/path/to/folder")
    images = open_image_array(images_path, (3, size, size), command)
    labels = load_label_array(labels_path, len(images), num_classes, command)
    return InMemoryImages(images, labels, num_classes=num_classes)


# --- the Downsampled ImageNet npz batches ---------------------------------------------------------

class _NpzArray:
    """One array of an ``.npz`` file, read sequentially from the zip without loading it whole."""

    def __init__(self, zf: zipfile.ZipFile, key: str, path: Path):
        self.path = path
        try:
            self.f = zf.open(f"{key}.npy")
        except KeyError as err:
            raise DataError(f"{path} has no array {key!r} (keys: {[n[:-4] for n in zf.namelist()]}); it is not a "
                            f"Downsampled ImageNet batch") from err
        version = np.lib.format.read_magic(self.f)
        if version == (1, 0):
            self.shape, fortran, self.dtype = np.lib.format.read_array_header_1_0(self.f)
        elif version == (2, 0):
            self.shape, fortran, self.dtype = np.lib.format.read_array_header_2_0(self.f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran:
            raise DataError(f"{path}: array {key!r} is stored in Fortran order, expected C order")

    def read_rows(self, n: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        want = n * row
        buf = bytearray()
        while len(buf) < want:
            part = self.f.read(want - len(buf))
            if not part:
                raise DataError(f"{self.path} is truncated (its data array ends early); download it again")
            buf += part
        return np.frombuffer(bytes(buf), dtype=self.dtype).reshape(n, *self.shape[1:])

    def finish(self) -> None:
        """Read to the end: zipfile checks the member's CRC only there (a damaged byte shows here)."""
        if self.f.read(1):
            raise DataError(f"{self.path} holds more data than its header announces; download it again")


def _open_npz(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{path} is truncated or not an .npz file ({err}); download it again") from err


def _npz_batch_header(path: Path, size: int) -> int:
    """Validate a batch's ``data``/``labels`` headers; returns its number of images."""
    with _open_npz(path) as zf:
        try:
            data = _NpzArray(zf, "data", path)
            labels = _NpzArray(zf, "labels", path)
        except (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is truncated or damaged ({err}); download it again") from err
    row = 3 * size * size
    if data.dtype != np.uint8 or len(data.shape) != 2 or data.shape[1] != row:
        hint = ""
        if len(data.shape) == 2 and data.shape[1] in (3 * 32 * 32, 3 * 16 * 16, 3 * 8 * 8):
            side = int(round((data.shape[1] / 3) ** 0.5))
            hint = f" (that is the {side}x{side} variant; use the 64x64 batches or set --size {side})"
        raise DataError(f"{path} holds data {data.dtype} {data.shape}, expected uint8 (N, {row}) for "
                        f"{size}x{size} images{hint}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path} holds {data.shape[0]} images but labels of shape {labels.shape}")
    return data.shape[0]


def find_npz_batches(npz_dir: Path) -> list[Path]:
    """The ten ``train_data_batch_<i>.npz`` files; a DataError naming the missing ones."""
    paths = [Path(npz_dir) / name for name in NPZ_BATCHES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"Downsampled ImageNet 64x64 batches missing in {npz_dir}: {', '.join(missing)}; expected "
                        f"{NPZ_BATCHES[0]} ... {NPZ_BATCHES[-1]} (the Imagenet64_train npz parts from {_DOWNLOAD}, "
                        f"unzipped into one folder); point to that folder with --npz-dir")
    return paths


def prepare_imagenet64_npz(npz_dir: str | Path, out_dir: str | Path, size: int = 64, num_classes: int = 1000,
                           progress: bool = True) -> tuple[Path, Path]:
    """Convert the ten npz batches into ``imagenet{size}_npz_images.npy`` / ``_labels.npy`` in ``out_dir``.

    Images keep the batches' order; labels 1..num_classes become 0-based int16. Streams each
    batch in blocks, so memory stays small; both outputs are written atomically.
    """
    from tqdm import tqdm

    paths = find_npz_batches(Path(npz_dir))
    counts = [_npz_batch_header(p, size) for p in paths]
    images_out, labels_out = prepared_paths(Path(out_dir), "npz", size)
    labels = []
    with write_npy_stream(images_out, (sum(counts), 3, size, size), np.uint8) as stream, \
            tqdm(total=sum(counts), desc=f"ImageNet npz -> {images_out.name}", unit="img", unit_scale=True,
                 disable=not progress, file=sys.stderr) as bar:
        for path, count in zip(paths, counts):
            try:
                with _open_npz(path) as zf:
                    lab = np.lib.format.read_array(zf.open("labels.npy"), allow_pickle=False)
                    if lab.dtype.kind not in "iu":
                        raise DataError(f"{path} has labels of type {lab.dtype}, expected integers 1..{num_classes}")
                    if count and (lab.min() < 1 or lab.max() > num_classes):
                        raise DataError(f"{path} has labels from {lab.min()} to {lab.max()}, expected 1..{num_classes}"
                                        f" (Downsampled ImageNet labels are 1-based); the file is damaged or of "
                                        f"another data set: download it again")
                    labels.append((lab - 1).astype(np.int16))
                    data = _NpzArray(zf, "data", path)
                    for lo in range(0, count, _READ_ROWS):
                        rows = data.read_rows(min(_READ_ROWS, count - lo))
                        # a row is three size x size planes (R, G, B), so it reshapes to CHW as is
                        stream.write(rows.reshape(-1, 3, size, size))
                        bar.update(len(rows))
                    data.finish()
            except ConfigError:  # our own messages (a bad label, a full disk) as they are
                raise
            except (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                raise DataError(f"{path} is truncated or damaged ({type(err).__name__}: {err}); download it "
                                f"again") from err
    _save_labels(labels_out, np.concatenate(labels))
    return images_out, labels_out


def _save_labels(path: Path, labels: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, labels)


# --- the raw ImageNet training folder -------------------------------------------------------------

def adm_center_crop(image: Image.Image, size: int = 64) -> np.ndarray:
    """ADM's (and U-ViT's) centre crop -> uint8 (3, size, size).

    Box-halve while the short side is >= 2 * size (good antialiasing at low cost), bicubic
    resize so the short side is ``size`` (the long side rounded), then the centre square.
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size].transpose(2, 0, 1)


def list_imagenet_folder(train_dir: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, 0-based labels, wnids): classes are the sorted sub-folders, files sorted within."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise DataError(f"ImageNet training folder {train_dir} not found: expected {train_dir}/<wnid>/*.JPEG (the "
                        f"ILSVRC2012 training images from {_DOWNLOAD}, one folder per class); point to it with "
                        f"--train-dir")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not wnids:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<wnid>/*.JPEG (extract each class "
                        f"tar of ILSVRC2012_img_train.tar into its own folder)")
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        files = sorted(p for p in (train_dir / wnid).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            # an empty class would shift every later label by one
            raise DataError(f"{train_dir / wnid} has no images; extract {wnid}.tar into it or remove the folder")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int16), wnids


def _crop_file(job: tuple[str, int]) -> np.ndarray:
    path, size = job
    try:
        with Image.open(path) as img:
            return adm_center_crop(img, size)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read ImageNet image {path} ({err}); replace or remove it") from err


def prepare_imagenet64_folder(train_dir: str | Path, out_dir: str | Path, size: int = 64, num_classes: int = 1000,
                              workers: int | None = None, progress: bool = True, chunk: int = 256
                              ) -> tuple[Path, Path]:
    """Centre-crop the raw training folder into ``imagenet{size}_folder_images.npy`` / ``_labels.npy``.

    Also writes ``imagenet{size}_folder_classes.txt`` (label i's wnid on line i + 1). Outputs
    are atomic; ``workers`` processes decode JPEGs (default: up to 8).
    """
    paths, labels, wnids = list_imagenet_folder(train_dir)
    if len(wnids) > num_classes:
        raise DataError(f"{train_dir} has {len(wnids)} class folders, more than num_classes={num_classes}; remove "
                        f"the extra folders or pass --num-classes {len(wnids)}")
    images_out, labels_out = prepared_paths(Path(out_dir), "folder", size)
    jobs = [(str(p), size) for p in paths]
    workers = default_workers() if workers is None else workers
    write_images_npy(images_out, map_ordered(_crop_file, jobs, workers), len(jobs), size,
                     f"ImageNet folder -> {images_out.name}", progress, chunk)
    _save_labels(labels_out, labels)
    write_text(Path(out_dir) / f"imagenet{size}_folder_classes.txt", "\n".join(wnids) + "\n")
    return images_out, labels_out
