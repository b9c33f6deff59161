"""ImageNet 64: generated Downsampled-ImageNet npz batches and a small raw folder, prepared and loaded."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalelong.data import build_dataset
from scalelong.data import imagenet
from scalelong.utils.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [3, 2, 3, 2, 1, 2, 3, 2, 2, 1]  # images per batch 1..10


def hwc_images(b: int, n: int) -> np.ndarray:
    return np.random.default_rng(b).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def batch_labels(b: int, n: int) -> np.ndarray:
    return np.array([1 + (97 * b + 31 * j) % 1000 for j in range(n)], dtype=np.int64)  # 1-based


def row_layout(images: np.ndarray) -> np.ndarray:
    """As the Downsampled ImageNet scripts build a row: red plane, green plane, blue plane, flattened."""
    return np.stack([np.concatenate([img[:, :, 0].ravel(), img[:, :, 1].ravel(), img[:, :, 2].ravel()])
                     for img in images])


def write_batches(folder: Path, labels_fn=batch_labels, side: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for b, n in enumerate(COUNTS, start=1):
        imgs = hwc_images(b, n) if side == 64 else np.zeros((n, side, side, 3), np.uint8)
        data = row_layout(imgs)
        save = np.savez_compressed if b % 2 else np.savez  # both kinds occur in the wild
        save(folder / f"train_data_batch_{b}.npz", data=data, labels=labels_fn(b, n).tolist(),
             mean=data.mean(axis=0))
    return folder


def expected_npz() -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([hwc_images(b, n) for b, n in enumerate(COUNTS, start=1)]).transpose(0, 3, 1, 2)
    labels = np.concatenate([batch_labels(b, n) for b, n in enumerate(COUNTS, start=1)]) - 1
    return images, labels


def cfg(root: Path, **extra) -> dict:
    return {"name": "imagenet64", "data_dir": str(root), "image_size": 64, "channels": 3, "num_classes": 1000,
            "conditional": True, "random_flip": True, **extra}


def test_npz_batches_prepare_and_load(tmp_path, capsys):
    write_batches(tmp_path / "npz")
    images_out, labels_out = imagenet.prepare_imagenet64_npz(tmp_path / "npz", tmp_path)
    assert "ImageNet npz" in capsys.readouterr().err  # the progress bar
    assert images_out.name == "imagenet64_npz_images.npy" and labels_out.name == "imagenet64_npz_labels.npy"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    data = build_dataset(cfg(tmp_path))
    images, labels = expected_npz()
    assert len(data) == sum(COUNTS) and data.num_classes == 1000
    assert np.array_equal(data.images.numpy(), images)  # R, G, B planes -> CHW; batch order; unflipped
    assert data.labels.tolist() == labels.tolist() and data.labels.min() >= 0  # 0-based
    assert isinstance(np.load(images_out, mmap_mode="r"), np.memmap)
    from scalelong.data.sampler import BatchRequest

    batch = data.__getitems__(BatchRequest(step=0, indices=[5, 1]))
    assert torch.equal(batch["images"], torch.from_numpy(images[[5, 1]]))
    assert batch["labels"].tolist() == labels[[5, 1]].tolist()


@pytest.mark.parametrize("bad", [0, 1001])
def test_npz_label_out_of_range_names_the_batch(tmp_path, bad):
    def labels(b, n):
        lab = batch_labels(b, n)
        if b == 4:
            lab[1] = bad
        return lab

    write_batches(tmp_path / "npz", labels)
    with pytest.raises(DataError) as err:
        imagenet.prepare_imagenet64_npz(tmp_path / "npz", tmp_path, progress=False)
    assert "train_data_batch_4.npz" in str(err.value) and "1..1000" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["npz"]  # nothing written


def test_truncated_npz_is_named(tmp_path):
    folder = write_batches(tmp_path / "npz")
    path = folder / "train_data_batch_7.npz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError) as err:
        imagenet.prepare_imagenet64_npz(folder, tmp_path, progress=False)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["npz"]


def test_damaged_npz_data_is_named(tmp_path):
    folder = write_batches(tmp_path / "npz")
    path = folder / "train_data_batch_2.npz"  # stored uncompressed: a flipped byte fails the CRC at the end
    with zipfile.ZipFile(path) as zf:
        at = zf.getinfo("data.npy").header_offset + 30 + len("data.npy") + 500  # inside the pixel bytes
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_data_batch_2.npz"):
        imagenet.prepare_imagenet64_npz(folder, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["npz"]


def test_32x32_batches_and_missing_batches(tmp_path):
    write_batches(tmp_path / "small", side=32)
    with pytest.raises(DataError, match="32x32 variant"):
        imagenet.prepare_imagenet64_npz(tmp_path / "small", tmp_path, progress=False)
    (tmp_path / "small" / "train_data_batch_9.npz").unlink()
    with pytest.raises(DataError, match="missing.*train_data_batch_9.npz"):
        imagenet.prepare_imagenet64_npz(tmp_path / "small", tmp_path, progress=False)


def test_unprepared_lists_both_sources_and_the_override(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path))
    msg = str(err.value)
    assert "train_data_batch_1.npz" in msg and "train/<wnid>/*.JPEG" in msg
    assert "scripts/prepare_imagenet64.py --source npz" in msg and "--source folder" in msg
    assert "dataset.data_dir=" in msg


def test_labels_beyond_num_classes_name_the_labels_file(tmp_path):
    write_batches(tmp_path / "npz")
    _, labels_out = imagenet.prepare_imagenet64_npz(tmp_path / "npz", tmp_path, progress=False)
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path, num_classes=10))
    assert str(labels_out) in str(err.value) and "dataset.num_classes" in str(err.value)


# --- the raw folder --------------------------------------------------------------------------------

def stripes(width: int, height: int) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :width // 4] = (255, 0, 0)
    arr[:, width // 4:3 * width // 4] = (0, 255, 0)
    arr[:, 3 * width // 4:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_adm_centre_crop_keeps_the_centre():
    # 512 x 256 -> halved twice to 128 x 64 -> centre 64 columns = the green middle half
    out = imagenet.adm_center_crop(stripes(512, 256), 64)
    assert out.shape == (3, 64, 64) and np.array_equal(out, np.broadcast_to(np.array([0, 255, 0])[:, None, None],
                                                                            (3, 64, 64)))
    # a small portrait grey image: bicubic upscaling, converted to RGB
    out = imagenet.adm_center_crop(Image.new("L", (40, 90), 77), 64)
    assert out.shape == (3, 64, 64) and (out == 77).all()


def write_folder(root: Path) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    files = {}
    for wnid, sizes in [("n03000000", [(90, 70)]), ("n01000000", [(300, 200), (64, 64)]),
                        ("n02000000", [(150, 400), (130, 129), (80, 80)])]:
        (root / wnid).mkdir(parents=True)
        files[wnid] = []
        for k, (w, h) in enumerate(sizes):
            path = root / wnid / f"{wnid}_{k}.{'png' if k == 2 else 'JPEG'}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files[wnid].append(path)
    (root / "n01000000" / "notes.txt").write_text("not an image")
    return files


def test_raw_folder_prepare_and_load(tmp_path, capsys):
    files = write_folder(tmp_path / "train")
    imagenet.prepare_imagenet64_folder(tmp_path / "train", tmp_path, workers=0)
    assert "ImageNet folder" in capsys.readouterr().err
    data = build_dataset(cfg(tmp_path))
    ordered = [(label, p) for label, wnid in enumerate(sorted(files)) for p in sorted(files[wnid])]
    assert data.labels.tolist() == [label for label, _ in ordered] == [0, 0, 1, 1, 1, 2]
    expected = np.stack([imagenet.adm_center_crop(Image.open(p)) for _, p in ordered])
    assert np.array_equal(data.images.numpy(), expected)
    assert (tmp_path / "imagenet64_folder_classes.txt").read_text().split() == sorted(files)


def test_both_sources_prepared_needs_a_choice(tmp_path):
    write_folder(tmp_path / "train")
    imagenet.prepare_imagenet64_folder(tmp_path / "train", tmp_path, workers=2, progress=False, chunk=2)
    write_batches(tmp_path / "npz")
    imagenet.prepare_imagenet64_npz(tmp_path / "npz", tmp_path, progress=False)
    with pytest.raises(DataError, match="dataset.source=npz"):
        build_dataset(cfg(tmp_path))
    assert len(build_dataset(cfg(tmp_path, source="npz"))) == sum(COUNTS)
    assert len(build_dataset(cfg(tmp_path, source="folder"))) == 6


def test_raw_folder_errors(tmp_path):
    files = write_folder(tmp_path / "train")
    (tmp_path / "train" / "n09000000").mkdir()
    with pytest.raises(DataError, match="n09000000 has no images"):
        imagenet.prepare_imagenet64_folder(tmp_path / "train", tmp_path, workers=0, progress=False)
    (tmp_path / "train" / "n09000000").rmdir()
    bad = files["n02000000"][1]
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=bad.name):
        imagenet.prepare_imagenet64_folder(tmp_path / "train", tmp_path, workers=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    with pytest.raises(DataError, match="more than num_classes=2"):
        imagenet.prepare_imagenet64_folder(tmp_path / "train", tmp_path, num_classes=2, workers=0)


def test_script_both_sources(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_imagenet64", ROOT / "scripts" / "prepare_imagenet64.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.main(["--source", "npz", "--data-dir", str(tmp_path)])
    assert capsys.readouterr().err.startswith("error: Downsampled ImageNet 64x64 batches missing")
    write_folder(tmp_path / "train")
    assert script.main(["--source", "folder", "--data-dir", str(tmp_path), "--workers", "0"]) == 0
    assert np.load(tmp_path / "imagenet64_folder_images.npy").shape == (6, 3, 64, 64)
