"""CIFAR10 loader on generated batches in the official pickle format, and the md5-checked download."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from scalelong.data import build_dataset
from scalelong.data import cifar10
from scalelong.utils.errors import DataError

PER_BATCH = 2  # 10 training images: the FID reference tests pass them all through Inception


def batch_images(b: int) -> np.ndarray:
    """Distinct uint8 (PER_BATCH, 3, 32, 32) images for batch b (1-based)."""
    rng = np.random.default_rng(b)
    return rng.integers(0, 256, size=(PER_BATCH, 3, 32, 32), dtype=np.uint8)


def batch_bytes(b: int) -> bytes:
    images = batch_images(b)
    # the official layout: 1024 red values, then green, then blue, each plane row by row
    data = np.concatenate([images[:, c].reshape(PER_BATCH, 1024) for c in range(3)], axis=1)
    batch = {b"batch_label": f"training batch {b} of 5".encode(), b"labels": [(b + j) % 10 for j in range(PER_BATCH)],
             b"data": data, b"filenames": [f"img_{b}_{j}.png".encode() for j in range(PER_BATCH)]}
    return pickle.dumps(batch, protocol=2)


def write_folder(root: Path) -> Path:
    folder = root / cifar10.FOLDER_NAME
    folder.mkdir(parents=True)
    for b in range(1, 6):
        (folder / f"data_batch_{b}").write_bytes(batch_bytes(b))
    (folder / "test_batch").write_bytes(batch_bytes(6))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    return folder


def archive_bytes(extra: tarfile.TarInfo | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(cifar10.FOLDER_NAME)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for b in range(1, 6):
            data = batch_bytes(b)
            info = tarfile.TarInfo(f"{cifar10.FOLDER_NAME}/data_batch_{b}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))
    return buf.getvalue()


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.fixture
def fake_server(monkeypatch):
    """Serve ``payload['data']`` for the CIFAR URL and count the requests."""
    payload = {"data": archive_bytes(), "requests": 0}

    def fake_open(url):
        assert url == cifar10.CIFAR10_URL
        payload["requests"] += 1
        return FakeResponse(payload["data"])

    monkeypatch.setattr(cifar10, "_open_url", fake_open)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(payload["data"]).hexdigest())
    return payload


def expected_images() -> torch.Tensor:
    return torch.from_numpy(np.concatenate([batch_images(b) for b in range(1, 6)]))


def test_reads_the_five_batches_in_chw_order_with_labels(tmp_path):
    write_folder(tmp_path)
    cfg = {"name": "cifar10", "data_dir": str(tmp_path), "image_size": 32, "channels": 3, "download": False,
           "random_flip": True}
    data = build_dataset(cfg)
    assert data.shape == (3, 32, 32) and len(data) == 5 * PER_BATCH and data.num_classes == 10
    # bytes as stored, in batch order, never flipped (flips happen on the training device)
    assert torch.equal(data.images, expected_images())
    assert data.labels.tolist() == [(b + j) % 10 for b in range(1, 6) for j in range(PER_BATCH)]


def test_test_split(tmp_path):
    write_folder(tmp_path)
    data = cifar10.load_cifar10({"data_dir": str(tmp_path), "split": "test"})
    assert torch.equal(data.images, torch.from_numpy(batch_images(6)))
    with pytest.raises(DataError, match="no split 'val'"):
        cifar10.load_cifar10({"data_dir": str(tmp_path), "split": "val"})


def test_missing_folder_without_download_names_layout_and_override(tmp_path):
    with pytest.raises(DataError) as err:
        cifar10.load_cifar10({"data_dir": str(tmp_path), "download": False})
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "dataset.data_dir=" in msg
    assert "dataset.download=true" in msg and cifar10.CIFAR10_URL in msg


def test_download_verifies_md5_and_extracts(tmp_path, fake_server, capsys):
    data = cifar10.load_cifar10({"data_dir": str(tmp_path / "data")})
    assert torch.equal(data.images, expected_images())
    assert (tmp_path / "data" / cifar10.ARCHIVE_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted([cifar10.ARCHIVE_NAME, cifar10.FOLDER_NAME])
    assert cifar10.ARCHIVE_NAME in capsys.readouterr().err  # the progress bar
    # present now: no second download
    cifar10.load_cifar10({"data_dir": str(tmp_path / "data")})
    assert fake_server["requests"] == 1


def test_md5_mismatch_leaves_no_archive(tmp_path, fake_server, monkeypatch):
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="md5") as err:
        cifar10.load_cifar10({"data_dir": str(tmp_path)})
    assert cifar10.ARCHIVE_NAME in str(err.value)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary file


def test_damaged_existing_archive_is_named(tmp_path, fake_server):
    (tmp_path / cifar10.ARCHIVE_NAME).write_bytes(b"not the archive")
    with pytest.raises(DataError, match="wrong md5") as err:
        cifar10.load_cifar10({"data_dir": str(tmp_path)})
    assert str(tmp_path / cifar10.ARCHIVE_NAME) in str(err.value)
    assert fake_server["requests"] == 0


def test_network_failure_says_how_to_download_by_hand(tmp_path, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar10, "_open_url", offline)
    with pytest.raises(DataError, match="by hand") as err:
        cifar10.load_cifar10({"data_dir": str(tmp_path)})
    assert cifar10.CIFAR10_MD5 in str(err.value) and "dataset.data_dir=" in str(err.value)


def test_archive_with_unsafe_member_is_refused(tmp_path, fake_server, monkeypatch):
    evil = tarfile.TarInfo("../evil.txt")
    evil.size = 3
    fake_server["data"] = archive_bytes(evil)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(fake_server["data"]).hexdigest())
    with pytest.raises(DataError, match="unexpected entry"):
        cifar10.load_cifar10({"data_dir": str(tmp_path / "data")})
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "data" / cifar10.FOLDER_NAME).exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == [cifar10.ARCHIVE_NAME]  # temp folder cleaned


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_batch_is_named(tmp_path, damage):
    folder = write_folder(tmp_path)
    path = folder / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x80\x02garbage" + raw[20:])
    with pytest.raises(DataError) as err:
        cifar10.load_cifar10({"data_dir": str(tmp_path), "download": False})
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_batch_with_code_is_refused(tmp_path):
    folder = write_folder(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2"):
        cifar10.load_cifar10({"data_dir": str(tmp_path), "download": False})
