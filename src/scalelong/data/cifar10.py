"""CIFAR10 (train split, 50,000 images 3x32x32, 10 classes) from the official python version.

Layout: ``data_dir/cifar-10-batches-py/data_batch_1`` ... ``data_batch_5``, each a pickled dict
with ``b'data'`` uint8 (10000, 3072) in CHW order (1024 red, 1024 green, 1024 blue values, rows
top to bottom) and ``b'labels'`` (10000 ints in 0..9). It is the folder inside
``cifar-10-python.tar.gz``, which is downloaded (md5-checked) when missing and allowed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from scalelong.data.arrays import data_dir_of
from scalelong.data.images import InMemoryImages
from scalelong.utils.errors import DataError
from scalelong.utils.io import atomic_write

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
SPLITS = {"train": TRAIN_BATCHES, "test": ("test_batch",)}
_CHUNK = 1 << 20

_LAYOUT = (f"{FOLDER_NAME}/data_batch_1 ... data_batch_5 (the python version of CIFAR10, the folder inside "
           f"{ARCHIVE_NAME} from {CIFAR10_URL})")


def load_cifar10(cfg: Mapping[str, Any]) -> InMemoryImages:
    """The CIFAR10 training set in memory: uint8 (50000, 3, 32, 32), labels (50000,) in 0..9.

    Keys read from ``cfg`` (the ``dataset`` config): ``data_dir`` (folder holding
    ``cifar-10-batches-py``, or where it is downloaded to), ``download`` (default true: fetch
    and extract the official archive when the folder is missing) and ``split`` (``train``, the
    default, or ``test``: the 10,000 images of ``test_batch``).
    """
    split = str(cfg.get("split", "train"))
    if split not in SPLITS:
        raise DataError(f"CIFAR10 has no split {split!r}; valid: {', '.join(SPLITS)}")
    root = data_dir_of(cfg, "CIFAR10", _LAYOUT)
    folder = root / FOLDER_NAME
    if not folder.is_dir():
        if not cfg.get("download", True):
            raise DataError(f"CIFAR10 not found: expected {root / FOLDER_NAME}/data_batch_1 ... data_batch_5 "
                            f"(the python version, extracted from {CIFAR10_URL}); set dataset.download=true to "
                            f"fetch it (163 MB), or point to the folder that holds {FOLDER_NAME} with "
                            f"dataset.data_dir=/path/to/folder")
        download_cifar10(root)
    return read_cifar10_batches(folder, SPLITS[split])


def read_cifar10_batches(folder: Path, names: tuple[str, ...] = TRAIN_BATCHES) -> InMemoryImages:
    """Read pickled CIFAR10 batches ``folder/<name>`` into one uint8 (N, 3, 32, 32) data set."""
    images, labels = [], []
    for name in names:
        data, lab = _read_batch(folder / name)
        images.append(data)
        labels.append(lab)
    images_t = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    return InMemoryImages(images_t, torch.from_numpy(np.concatenate(labels)), num_classes=10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a batch file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module == "numpy.core.multiarray" and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core.multiarray"  # the archive was pickled before numpy 2 renamed it
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = (f"delete {path.parent} (and {path.parent.parent / ARCHIVE_NAME} if present) and run again to download "
           f"and extract a fresh copy")
    if not path.is_file():
        raise DataError(f"CIFAR10 batch {path} is missing; {fix}")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except Exception as err:  # truncated or foreign pickles fail in many ways (EOFError, KeyError, ...)
        raise DataError(f"CIFAR10 batch {path} is corrupt or truncated ({type(err).__name__}: {err}); {fix}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DataError(f"CIFAR10 batch {path} holds data {data.dtype} {data.shape} and {labels.shape} labels, "
                        f"expected uint8 (N, 3072) and N labels; {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR10 batch {path} has labels outside 0..9; {fix}")
    return data, labels.astype(np.int64)


# --- download -------------------------------------------------------------------------------------

def _open_url(url: str):
    """The HTTP response for ``url`` (a file-like object); tests replace this function."""
    return urllib.request.urlopen(url, timeout=60)


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_cifar10(root: Path, progress: bool = True) -> Path:
    """Download (if needed), verify and extract the archive; returns ``root/cifar-10-batches-py``.

    The archive is written under a temporary name and renamed only once its md5 matched, and
    the folder is extracted into a temporary folder and renamed into place when complete.
    """
    root.mkdir(parents=True, exist_ok=True)
    archive = root / ARCHIVE_NAME
    manual = (f"or download {CIFAR10_URL} by hand to {archive} (md5 {CIFAR10_MD5}), or point to a folder that "
              f"already holds {FOLDER_NAME} with dataset.data_dir=/path/to/folder")
    if archive.is_file():
        if file_md5(archive) != CIFAR10_MD5:
            raise DataError(f"{archive} has the wrong md5 checksum (expected {CIFAR10_MD5}); it is damaged or not "
                            f"the CIFAR10 python archive: delete it and run again to download it, {manual}")
    else:
        _fetch(CIFAR10_URL, archive, CIFAR10_MD5, manual, progress)
    return _extract(archive, root)


def _fetch(url: str, dest: Path, md5: str, manual: str, progress: bool) -> None:
    from tqdm import tqdm

    print(f"downloading {url} to {dest}", file=sys.stderr)
    try:
        response = _open_url(url)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"could not download {url} ({err}); check the network and run again, {manual}") from err
    headers = getattr(response, "headers", None)
    total = headers.get("Content-Length") if headers is not None else None
    h = hashlib.md5()
    try:
        with response, atomic_write(dest) as f, tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                                                     desc=dest.name, disable=not progress) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                h.update(block)
                bar.update(len(block))
            if h.hexdigest() != md5:  # raised inside atomic_write: the bad download is deleted
                raise DataError(f"the download of {url} to {dest} has md5 {h.hexdigest()}, expected {md5} (a "
                                f"broken transfer or a changed file); run again, {manual}")
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"the download of {url} failed ({err}); run again, {manual}") from err


def _extract(archive: Path, root: Path) -> Path:
    """Extract only ``cifar-10-batches-py/*`` regular files, then move the folder into place."""
    final = root / FOLDER_NAME
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for m in members:
                    parts = PurePosixPath(m.name).parts
                    if (not (m.isfile() or m.isdir()) or PurePosixPath(m.name).is_absolute() or ".." in parts
                            or not parts or parts[0] != FOLDER_NAME):
                        raise DataError(f"{archive} contains an unexpected entry {m.name!r}; it is not the CIFAR10 "
                                        f"python archive: delete it and run again")
                if hasattr(tarfile, "data_filter"):  # the standard library's own path checks, where present
                    tar.extractall(tmp, members=members, filter="data")
                else:
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{archive} could not be extracted ({err}); delete it and run again to download it "
                            f"afresh") from err
        if not (tmp / FOLDER_NAME).is_dir():
            raise DataError(f"{archive} has no {FOLDER_NAME} folder; delete it and run again")
        if not final.exists():
            os.replace(tmp / FOLDER_NAME, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
