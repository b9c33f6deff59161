"""Atomic file output: write to a temporary file beside the target, then rename over it.

A kill or a full disk during a write leaves the previous file (or no file) in place, never a
truncated one. Used for checkpoints, configs, sample grids, arrays and result files. A write
that fails (full disk, no permission, read-only file system) raises ``OutputError`` naming the
file, the reason and the fix, which the entry points print as one line.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # annotations only: a run that stops on its input never imports torch
    import torch

from scalelong.utils.errors import ConfigError, OutputError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb",
                 message: Callable[[OSError], str] | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path``, on error it vanishes.

    An ``OSError`` while making the folder or the temporary file, writing (also when a library
    re-raises it as an error of its own, as ``torch.save`` does), syncing or renaming becomes an
    ``OutputError`` (the ``OSError`` as its cause) whose text is ``message(err)``, by default
    "cannot write PATH (reason); the previous file is intact. <fix>". An ``OSError`` of the
    caller's own work in the ``with`` block (a network error, one naming another file, a library
    error without an errno) passes through unchanged, as does every other exception.
    """
    path = Path(path)
    existed = _exists(path)
    tmp = None
    in_body = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            f = os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        try:
            in_body = True
            yield f
            in_body = False
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            _close_quietly(f)  # a failing flush must not hide the error that got us here
            raise
        f.close()
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        cause = _write_error(err, path, tmp) if in_body else err if isinstance(err, OSError) else None
        if cause is not None:
            raise OutputError(message(cause) if message is not None else write_error_message(path, cause, existed, tmp)) \
                from cause
        raise


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _close_quietly(f: IO) -> None:
    try:
        f.close()
    except OSError:
        pass


def _name(filename) -> str | None:
    if filename is None:
        return None
    return os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)


def _write_error(err: BaseException, path: Path, tmp: str | None) -> OSError | None:
    """The OSError of writing the file behind ``err``, raised in the ``with`` block; None if it is none.

    ``err`` itself, or for a library that turns the OSError of a failed write into an error of its
    own (``torch.save``: RuntimeError "unexpected pos"), the OSError it was raised from. An error
    the caller chose (a ConfigError), KeyboardInterrupt and other BaseExceptions are left alone.
    """
    if isinstance(err, OSError):
        return err if _about_this_file(err, path, tmp) else None
    if not isinstance(err, Exception) or isinstance(err, ConfigError):
        return None
    seen = set()
    inner = err.__cause__ or err.__context__
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(inner, OSError):
            return inner if _about_this_file(inner, path, tmp) else None
        inner = inner.__cause__ or inner.__context__
    return None


def _about_this_file(err: OSError, path: Path, tmp: str | None) -> bool:
    """False for an OSError of the caller's own work in the ``with`` block rather than of the write."""
    if err.errno is None:  # raised by a library (PIL's "image file is truncated", URLError), not a system call
        return False
    named = _name(err.filename)
    if named is not None and named not in (str(path), tmp):
        return False  # about another file, e.g. an input that could not be read
    return not (isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__ in ("socket", "ssl"))


def write_error_message(path: Path, err: OSError, existed: bool, tmp: str | None = None) -> str:
    """"cannot write PATH (reason); the previous file is intact. <fix>": the one line for a failed write."""
    reason = err.strerror or str(err)
    named = _name(err.filename)
    existing = _nearest_existing(path.parent)
    if existing is not None and not existing.is_dir() and isinstance(err, (FileExistsError, NotADirectoryError)):
        reason = f"{existing} is a file, not a folder"
    elif named is not None and named not in (str(path), tmp) and not _is_temporary(named, path):
        reason = f"{reason}: {named}"  # the folder that could not be made
    kept = "the previous file is intact" if existed else "no partial file is left"
    if err.errno in _NO_SPACE:
        fix = "Free some space or choose another output folder"
    elif err.errno in _NO_PERMISSION:
        fix = f"Make {existing or path.parent} writable or choose another output folder"
    else:
        fix = "Choose another output folder"
    return f"cannot write {path} ({reason}); {kept}. {fix}"


def _is_temporary(name: str, path: Path) -> bool:
    base = os.path.basename(name)
    return base.startswith(f".{path.name}.") and base.endswith(".tmp")


def _nearest_existing(folder: Path) -> Path | None:
    """``folder`` if it exists, else its nearest ancestor that does (a folder, or a file in the way)."""
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            return p
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (rows*H', cols*W', C) grid image, ``nrow`` images a row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(round(n**0.5)))
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[k]
    return grid


def grid_image(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """uint8 (N, C, H, W) images as one PIL image (a grid)."""
    grid = image_grid(images, nrow)
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save uint8 (N, C, H, W) images as a PNG grid, atomically."""
    img = grid_image(images, nrow)
    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)
