"""FID of the MS-COCO text-to-image model: val captions as conditions, decoded latents, val2014 reference.

U-ViT's protocol: each sample is conditioned on a caption of a random val2014 image, the latents
are decoded by the Stable Diffusion autoencoder, and the 256 x 256 pixels are compared with the
centre-cropped val2014 images. Tiny random stand-ins: the autoencoder (test_data_coco.tiny_models),
the features (random arrays in U-ViT's layout) and Inception (fid_helpers.LinearFeatures).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose
from fid_helpers import LinearFeatures
from PIL import Image
from test_data_coco import CAPTIONS, write_features

from scalelong.data import coco
from scalelong.utils.errors import ConfigError, DataError
from scalelong.metrics.evaluation import FIDEvaluator
from scalelong.metrics.reference import (compute_reference, load_reference, make_reference_stats, reference_resolution,
                                         save_reference)
from scalelong.metrics.sampling import chunk_seed

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["trainer=cpu", "experiment=smoke", "logger=none", "train.batch_size=4", "train.max_steps=2",
          "model=uvit_tiny", "train.num_workers=0"]


def _context_owner(arrays: dict) -> dict[bytes, tuple[int, int]]:
    """Which (image, caption) file each context array came from."""
    return {c.tobytes(): (i, k) for i, caps in enumerate(arrays["context"]) for k, c in enumerate(caps)}


def test_sample_contexts_cycle_through_val_images_and_depend_only_on_seed_and_index(tmp_path):
    arrays = write_features(tmp_path, "val")
    data = coco.CocoLatentFeatures(tmp_path, split="val")
    owner = _context_owner(arrays)
    n = len(CAPTIONS)
    contexts = data.sample_contexts(torch.arange(4 * n), seed=3)
    assert contexts.shape == (4 * n, 77, 768) and contexts.dtype == torch.float32
    pairs = [owner[c.numpy().tobytes()] for c in contexts]  # every row is one caption file
    for lap in range(4):  # each run of N samples sees every val image exactly once
        assert sorted(i for i, _ in pairs[lap * n:(lap + 1) * n]) == list(range(n))
    # image 4 has 5 captions: over the laps it is not always conditioned on the same one
    assert len({k for i, k in pairs if i == 4}) > 1
    # sample i's caption does not depend on which other samples are drawn with it (the ranks)
    assert torch.equal(data.sample_contexts(torch.tensor([17, 2, 9]), seed=3), contexts[[17, 2, 9]])
    other = [owner[c.numpy().tobytes()] for c in data.sample_contexts(torch.arange(4 * n), seed=4)]
    assert other != pairs


def _write_val2014(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(2)
    folder = root / "val2014"
    folder.mkdir(parents=True)
    paths = []
    for k in range(count):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        path = folder / f"COCO_val2014_{k:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_val2014_reference_statistics_stream_centre_crops_at_256(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELONG_CACHE", str(tmp_path / "cache"))
    paths = _write_val2014(tmp_path / "coco", 10)
    cfg = compose(["dataset=mscoco", f"dataset.coco_dir={tmp_path / 'coco'}"])["dataset"]
    assert reference_resolution(cfg) == 256 and cfg["fid"]["reference_split"] == "val2014"
    reads = []
    take = coco.CocoImages.take
    monkeypatch.setattr(coco.CocoImages, "take", lambda self, idx: reads.append(len(idx)) or take(self, idx))
    ext = LinearFeatures()
    path, stats = make_reference_stats(cfg, ext, "val2014", batch_size=1, kid_max=4, progress=False)
    assert path == tmp_path / "cache" / "fid_stats" / "mscoco_clean_val2014_256.npz"
    assert stats.num == 10 and stats.meta["res"] == 256 and stats.meta["dataset_size"] == 10
    assert max(reads) == 8  # never more than 8 batches of images in memory, not the whole split
    # the same numbers as the centre crops of all the files held in memory
    crops = np.stack([coco.center_crop_resize(Image.open(p)) for p in paths])
    expected = compute_reference(torch.from_numpy(crops).permute(0, 3, 1, 2), ext, batch_size=5)
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-6, atol=1e-9)
    assert load_reference(path).num == 10


def test_coco_reference_errors_name_the_fix(tmp_path):
    cfg = compose(["dataset=mscoco", f"dataset.coco_dir={tmp_path / 'nowhere'}"])["dataset"]
    with pytest.raises(ConfigError, match="valid splits: val2014, train2014"):
        make_reference_stats(cfg, LinearFeatures(), "val")
    with pytest.raises(DataError, match=r"val2014 images; get val2014.zip .* set dataset.coco_dir"):
        make_reference_stats(cfg, LinearFeatures(), "val2014")


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """A tiny text-to-image run (2 steps) with a tiny random autoencoder, train and val features."""
    from test_data_coco import tiny_models

    root = tmp_path_factory.mktemp("coco_run")
    vae, _, _ = tiny_models(root / "models")
    vae.save_pretrained(root / "vae")
    write_features(root / "data")
    arrays = write_features(root / "val_only", "val")
    (root / "val_only" / "val").rename(root / "data" / "val")
    from scalelong.cli.train import train

    result = train(compose(["dataset=mscoco", *SHRINK, f"dataset.data_dir={root / 'data'}",
                            f"dataset.decoder={root / 'vae'}"], root / "run"))
    # the run decoded its sample grid, yet the checkpoint does not carry the autoencoder
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert (root / "run" / "samples" / "final.png").is_file() and not [k for k in state if "_decoder" in k]
    return {"root": root, "checkpoint": result["checkpoint"], "module": result["module"], "val": arrays}


def _evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_evaluate_conditions_on_val_captions_and_decodes_to_256_pixels(coco_run, tmp_path, monkeypatch):
    from scalelong.metrics import inception
    from scalelong.model import DiffusionModel

    ext = LinearFeatures()
    ext.weights = SimpleNamespace(describe=lambda: "a linear stand-in", path=Path("linear"), source="test")
    monkeypatch.setattr(inception, "load_inception", lambda *args, **kwargs: ext)
    rng = np.random.default_rng(0)  # reference features of random 256 px "images"
    ref = compute_reference(torch.from_numpy(rng.integers(0, 256, (6, 3, 256, 256), dtype=np.uint8)), ext,
                            {"dataset": "mscoco", "split": "val2014", "res": 256}, kid_max=6)
    save_reference(tmp_path / "ref.npz", ref)
    out = tmp_path / "eval"
    assert _evaluate_script().main([str(coco_run["checkpoint"]), "--num", "5", "--sampler", "dpm_solver", "--steps",
                                    "2", "--ref", str(tmp_path / "ref.npz"), "--device", "cpu", "--chunk-size", "2",
                                    "--kid-max", "5", "--workers", "1", "--out", str(out)]) == 0
    report = json.loads((out / "fid.json").read_text())
    assert report["num"] == 5 and report["guidance_scale"] == 1.0 and report["fid"] > 0
    assert report["sampler"] == "dpm_solver" and report["steps"] == 2
    assert report["conditions"] == f"{coco_run['root'] / 'data' / 'val'} ({len(CAPTIONS)} images)"
    assert report["decoder"] == str(coco_run["root"] / "vae")
    with np.load(out / "samples_rank000.npz") as z:
        samples, indices = z["samples"], z["indices"]
    assert samples.shape == (5, 256, 256, 3) and indices.tolist() == list(range(5))
    # chunk 1 (samples 2 and 3) is exactly what the model draws for those samples' val captions
    module = DiffusionModel.from_checkpoint(coco_run["checkpoint"], "cpu")
    data = coco.CocoLatentFeatures(coco_run["root"] / "data", split="val")
    expected = module.generate(2, "dpm_solver", 2, seed=chunk_seed(0, 1), contexts=data.sample_contexts([2, 3], 0),
                               guidance_scale=1.0, batch_size=2)
    assert torch.equal(expected.permute(0, 2, 3, 1), torch.from_numpy(samples[2:4]))
    other = module.generate(2, "dpm_solver", 2, seed=chunk_seed(0, 1), contexts=data.sample_contexts([7, 8], 0),
                            guidance_scale=1.0, batch_size=2)
    assert not torch.equal(other, expected)  # the captions matter


def test_latent_fid_without_a_decoder_or_val_features_is_one_clear_error(coco_run, tmp_path):
    from scalelong.model import DiffusionModel

    model = DiffusionModel.from_checkpoint(coco_run["checkpoint"])
    model.set_decoder(None)
    with pytest.raises(ConfigError, match="names no autoencoder .* --decoder .* dataset.decoder"):
        FIDEvaluator(model, extractor=LinearFeatures(), ref=tmp_path / "ref.npz")
    model.set_decoder(str(coco_run["root"] / "vae"))
    with pytest.raises(DataError, match="MS-COCO 256 features not found"):
        FIDEvaluator(model, extractor=LinearFeatures(), ref=tmp_path / "ref.npz", contexts_dir=tmp_path / "missing")


def test_in_training_fid_of_the_text_to_image_model(coco_run, tmp_path):
    from scalelong.cli.train import train

    root = coco_run["root"]
    ext = LinearFeatures()
    ref = compute_reference(torch.randint(0, 256, (6, 3, 256, 256), dtype=torch.uint8), ext, kid_max=6)
    save_reference(tmp_path / "ref.npz", ref)
    cfg = compose(["dataset=mscoco", *SHRINK, f"dataset.data_dir={root / 'data'}", f"dataset.decoder={root / 'vae'}",
                   "callbacks=fid"], tmp_path / "run")
    cfg["callbacks"]["fid"].update(every_n_steps=2, num_samples=3, steps=2, ref=str(tmp_path / "ref.npz"),
                                   chunk_size=2, kid_max=3, verbose=False,
                                   feature_extractor={"_target_": "fid_helpers.LinearFeatures"})
    assert cfg["callbacks"]["fid"]["guidance_scale"] == 1.0 and cfg["callbacks"]["fid"]["sampler"] == "dpm_solver_pp_fast"
    train(cfg)
    history = json.loads((tmp_path / "run" / "fid_history.json").read_text())
    assert [e["step"] for e in history] == [2] and history[0]["num"] == 3 and history[0]["guidance_scale"] == 1.0
    assert history[0]["fid"] > 0 and (tmp_path / "run" / "checkpoints" / "best_fid.ckpt").is_file()


def test_sample_script_conditions_a_text_checkpoint_on_val_captions(coco_run, tmp_path):
    from scalelong.model import DiffusionModel

    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "scripts" / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "grid"
    assert script.main([str(coco_run["checkpoint"]), "--num", "2", "--sampler", "dpm_solver", "--steps", "2",
                        "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out.with_suffix(".npz")) as z:
        samples = torch.from_numpy(z["samples"])
    module = DiffusionModel.from_checkpoint(coco_run["checkpoint"], "cpu")
    data = coco.CocoLatentFeatures(coco_run["root"] / "data", split="val")
    expected = module.generate(2, "dpm_solver", 2, seed=0, contexts=data.sample_contexts([0, 1], 0),
                               guidance_scale=1.0)
    assert samples.shape == (2, 256, 256, 3) and torch.equal(samples, expected.permute(0, 2, 3, 1))
    assert out.with_suffix(".png").is_file()
