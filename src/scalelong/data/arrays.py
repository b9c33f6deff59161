"""Prepared image arrays: one uint8 ``.npy`` file per data set, written once, memory-mapped after.

Decoding a data set's JPEGs (or unzipping its batches) once and keeping the result as a plain
``.npy`` array lets every run start in seconds and lets DataLoader workers share the pages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from scalelong.utils.errors import DataError, OutputError
from scalelong.utils.io import atomic_write, write_error_message


class NpyStream:
    """Rows handed to ``write`` go straight to the file; see ``write_npy_stream``."""

    def __init__(self, f, shape: tuple[int, ...], dtype: np.dtype, path: Path, existed: bool):
        self._f, self.shape, self.dtype = f, shape, dtype
        self.path, self.existed = path, existed
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]} written to an array of rows {self.shape[1:]}")
        if self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"more than the announced {self.shape[0]} rows written")
        try:
            self._f.write(rows.tobytes())
        except OSError as err:  # named here, so that callers reading inputs in the same loop
            # cannot mistake a full disk for a damaged input file
            raise OutputError(write_error_message(self.path, err, self.existed)) from err
        self.rows += len(rows)


@contextmanager
def write_npy_stream(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> Iterator[NpyStream]:
    """Write a ``.npy`` array of ``shape`` row block by row block, atomically.

    The array never has to fit in memory. The file appears under ``path`` only when all
    ``shape[0]`` rows were written; an error or a kill leaves no file (or the previous one).
    """
    dtype = np.dtype(dtype)
    existed = os.path.exists(path)
    with atomic_write(path) as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(f, header)
        stream = NpyStream(f, tuple(shape), dtype, Path(path), existed)
        yield stream
        if stream.rows != shape[0]:
            raise ValueError(f"{stream.rows} rows written to {path}, {shape[0]} announced")


def write_images_npy(path: str | os.PathLike, images, count: int, size: int, desc: str, progress: bool = True,
                     chunk: int = 256) -> Path:
    """Write ``count`` uint8 (3, size, size) images from an iterator into one ``.npy``, atomically,
    a block of ``chunk`` images at a time, with a progress bar."""
    import sys

    from tqdm import tqdm

    with write_npy_stream(path, (count, 3, size, size), np.uint8) as stream, \
            tqdm(total=count, desc=desc, unit="img", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        block = []
        for image in images:
            block.append(image)
            bar.update()
            if len(block) == chunk:
                stream.write(np.stack(block))
                block = []
        if block:
            stream.write(np.stack(block))
    return Path(path)


def open_image_array(path: Path, image_shape: tuple[int, int, int], remake: str) -> torch.Tensor:
    """A prepared uint8 (N, C, H, W) ``.npy`` file as a memory-mapped tensor (no copy in RAM).

    ``remake`` is the fix named in errors (the command that writes the file again).
    """
    try:
        # copy-on-write mapping: torch wants a writable array, and pages stay shared until written
        arr = np.load(path, mmap_mode="c")
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy array ({err}); delete it and rerun {remake}") from err
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(image_shape):
        raise DataError(f"{path} holds {arr.dtype} {arr.shape}, expected uint8 (N, {', '.join(map(str, image_shape))})"
                        f"; delete it and rerun {remake}")
    return torch.from_numpy(arr)


def load_label_array(path: Path, num_items: int, num_classes: int, remake: str) -> torch.Tensor:
    """A prepared labels ``.npy`` file (N,) of ints in [0, num_classes), as a long tensor."""
    try:
        labels = np.load(path)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy array ({err}); delete it and rerun {remake}") from err
    if labels.shape != (num_items,) or labels.dtype.kind not in "iu":
        raise DataError(f"{path} holds {labels.dtype} {labels.shape}, expected {num_items} integer labels "
                        f"(one per image); delete it and rerun {remake}")
    if num_items and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels from {labels.min()} to {labels.max()}, outside 0..{num_classes - 1} "
                        f"(dataset.num_classes={num_classes}); set dataset.num_classes or rerun {remake}")
    return torch.from_numpy(labels.astype(np.int64))


def data_dir_of(cfg, what: str, layout: str) -> Path:
    """``cfg['data_dir']`` as a Path; a DataError with the expected layout when it is not set."""
    value = cfg.get("data_dir")
    if not value:
        raise DataError(f"no folder given for {what}: set dataset.data_dir=/path/to/folder, a folder that holds "
                        f"{layout}")
    return Path(str(value)).expanduser()


def map_ordered(fn, items, workers: int = 0, chunksize: int = 64) -> Iterator:
    """``fn`` over ``items`` in order; ``workers`` > 0 decodes in that many processes."""
    if workers <= 0:
        yield from map(fn, items)
        return
    import multiprocessing

    # fork: the workers need no re-import, and they only run PIL/numpy code
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)
