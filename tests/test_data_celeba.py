"""CelebA 64: U-ViT's crop on generated aligned JPEGs, the one-off preparation and the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from scalelong.data import build_dataset
from scalelong.data import celeba
from scalelong.utils.errors import DataError

QUADRANTS = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (250, 250, 250)]  # TL, TR, BL, BR of the crop
PARTITION = [("000001.jpg", 0), ("000002.jpg", 0), ("000003.jpg", 1), ("000004.jpg", 0), ("000005.jpg", 2),
             ("000006.jpg", 0)]


def face(seed: int) -> Image.Image:
    """A 178 x 218 image: black outside the crop box, four coloured quadrants inside, a per-image tint."""
    arr = np.zeros((218, 178, 3), dtype=np.uint8)
    left, top, right, bottom = 25, 57, 153, 185  # the box U-ViT's Crop(x1=57, x2=185, y1=25, y2=153) cuts
    for q, colour in enumerate(QUADRANTS):
        r, c = divmod(q, 2)
        arr[top + 64 * r:top + 64 * (r + 1), left + 64 * c:left + 64 * (c + 1)] = colour
    arr[top:bottom, left:right] = np.clip(arr[top:bottom, left:right].astype(int) - 3 * seed, 0, 255)
    return Image.fromarray(arr)


def write_celeba(root: Path) -> Path:
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for k, (name, _) in enumerate(PARTITION):
        face(k).save(folder / name, quality=100, subsampling=0)
    (root / "celeba" / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in PARTITION))
    return folder


def test_crop_is_the_box_centred_at_89_121():
    assert celeba.CROP_BOX == (25, 57, 153, 185)
    img = face(0)
    out = celeba.crop_celeba(img, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    # the painted 128 x 128 quadrants alone, resized: any black from outside the box would differ
    quadrants = np.asarray(img)[57:185, 25:153]
    assert quadrants.min(axis=2).max() > 0 and np.asarray(img)[56, 25:153].max() == 0  # black just outside
    ideal = np.asarray(Image.fromarray(quadrants).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(out, ideal)
    for q, colour in enumerate(QUADRANTS):
        r, c = divmod(q, 2)
        assert tuple(out[:, 16 + 32 * r, 16 + 32 * c]) == colour
    # one pixel off in any direction shows black at that edge
    for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
        box = (25 + dx, 57 + dy, 153 + dx, 185 + dy)
        shifted = np.asarray(img.crop(box).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
        assert np.abs(shifted.astype(int) - out).max() > 30


def test_resize_is_what_uvit_torchvision_pipeline_gives():
    """U-ViT: F.crop(img, 57, 25, 128, 128) then transforms.Resize(64) on the PIL image."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8))
    reference = np.asarray(T.Resize(64)(TF.crop(img, 57, 25, 128, 128))).transpose(2, 0, 1)
    assert np.array_equal(celeba.crop_celeba(img, 64), reference)


def test_prepare_then_load_memory_mapped(tmp_path, capsys):
    folder = write_celeba(tmp_path)
    out = celeba.prepare_celeba64(tmp_path, workers=0)
    assert out == tmp_path / "celeba64_train.npy"
    assert "CelebA train" in capsys.readouterr().err  # the progress bar
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    data = build_dataset({"name": "celeba64", "data_dir": str(tmp_path), "image_size": 64, "channels": 3,
                          "random_flip": True})
    train = [n for n, p in PARTITION if p == 0]
    assert len(data) == len(train) and data.labels is None and data.num_classes == 0
    expected = np.stack([celeba.crop_celeba(Image.open(folder / n)) for n in train])
    assert np.array_equal(data.images.numpy(), expected)  # partition order, unflipped
    assert isinstance(np.load(out, mmap_mode="r"), np.memmap)
    batch = data.__getitems__(celeba_request([3, 0]))
    assert torch.equal(batch["images"], torch.from_numpy(expected[[3, 0]]))


def celeba_request(indices):
    from scalelong.data.sampler import BatchRequest

    return BatchRequest(step=5, indices=indices)


def test_prepare_with_worker_processes_gives_the_same_file(tmp_path):
    write_celeba(tmp_path)
    serial = np.load(celeba.prepare_celeba64(tmp_path, workers=0, progress=False)).copy()
    parallel = np.load(celeba.prepare_celeba64(tmp_path, workers=2, progress=False, chunk=2))
    assert np.array_equal(serial, parallel)


def test_unprepared_data_says_to_run_the_script(tmp_path):
    with pytest.raises(DataError) as err:
        celeba.load_celeba({"data_dir": str(tmp_path), "image_size": 64})
    msg = str(err.value)
    assert "scripts/prepare_celeba64.py" in msg and "dataset.data_dir=" in msg
    assert "img_align_celeba" in msg and "list_eval_partition.txt" in msg  # the raw layout, missing too
    write_celeba(tmp_path)
    with pytest.raises(DataError, match="prepare_celeba64.py"):
        celeba.load_celeba({"data_dir": str(tmp_path), "image_size": 64})


def test_bad_image_aborts_without_output(tmp_path):
    folder = write_celeba(tmp_path)
    (folder / "000004.jpg").write_bytes((folder / "000004.jpg").read_bytes()[:300])
    with pytest.raises(DataError, match="000004.jpg"):
        celeba.prepare_celeba64(tmp_path, workers=0, progress=False, chunk=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["celeba"]  # no output, no temporary file


def test_non_aligned_image_is_named(tmp_path):
    folder = write_celeba(tmp_path)
    Image.new("RGB", (200, 200)).save(folder / "000002.jpg")
    with pytest.raises(DataError, match="000002.jpg.*178 x 218"):
        celeba.prepare_celeba64(tmp_path, workers=0, progress=False)


def test_damaged_partition_file_is_named(tmp_path):
    write_celeba(tmp_path)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg x\n")
    with pytest.raises(DataError, match="list_eval_partition.txt line 2"):
        celeba.prepare_celeba64(tmp_path, workers=0, progress=False)


def test_script_prepares_and_reports_errors_in_one_line(tmp_path, capsys):
    script = load_script("prepare_celeba64")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "list_eval_partition.txt" in err and len(err.strip().splitlines()) == 1
    write_celeba(tmp_path)
    assert script.main(["--data-dir", str(tmp_path), "--workers", "0", "--size", "32"]) == 0
    assert np.load(tmp_path / "celeba32_train.npy").shape == (4, 3, 32, 32)
