"""MS-COCO 256 latent features: U-ViT's folder layout, step-keyed caption choice, latents, preparation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalelong.data import build_dataset
from scalelong.data import coco
from scalelong.data.images import keep_batch
from scalelong.data.sampler import BatchRequest, StepBatchSampler
from scalelong.utils.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [2, 1, 3, 2, 5]  # captions per image


def write_features(root: Path, split: str = "train") -> dict:
    """A small U-ViT-style features folder; returns the arrays written."""
    rng = np.random.default_rng(0)
    folder = root / split
    folder.mkdir(parents=True)
    arrays = {"moments": [], "context": []}
    for i, n in enumerate(CAPTIONS):
        m = rng.standard_normal(coco.MOMENTS_SHAPE).astype(np.float32)
        np.save(folder / f"{i}.npy", m)
        arrays["moments"].append(m)
        ctx = [rng.standard_normal(coco.CONTEXT_SHAPE).astype(np.float32) for _ in range(n)]
        for k, c in enumerate(ctx):
            np.save(folder / f"{i}_{k}.npy", c)
        arrays["context"].append(ctx)
    np.save(root / "empty_context.npy", np.full(coco.CONTEXT_SHAPE, 0.5, np.float32))
    return arrays


def cfg(root: Path, **extra) -> dict:
    return {"name": "mscoco", "data_dir": str(root), "image_size": 32, "channels": 4, "num_classes": 0,
            "seed": 7, **extra}


def test_batches_follow_the_layout_and_the_step(tmp_path):
    arrays = write_features(tmp_path)
    data = build_dataset(cfg(tmp_path))
    assert isinstance(data, coco.CocoLatentFeatures)
    assert len(data) == 5 and data.shape == (4, 32, 32) and data.num_classes == 0
    assert data.latent_scale == pytest.approx(0.23010)
    assert data.num_captions.tolist() == CAPTIONS
    assert torch.equal(data.empty_context, torch.full((77, 768), 0.5))

    request = BatchRequest(step=3, indices=[4, 0, 2])
    batch = data.__getitems__(request)
    assert batch["moments"].shape == (3, 8, 32, 32) and batch["moments"].dtype == torch.float32
    assert batch["context"].shape == (3, 77, 768) and batch["context"].dtype == torch.float32
    assert int(batch["step"]) == 3
    ks = [coco.caption_index(7, 3, i, CAPTIONS[i]) for i in request.indices]
    assert data.captions(3, request.indices) == ks
    for row, (i, k) in enumerate(zip(request.indices, ks)):
        assert np.array_equal(batch["moments"][row].numpy(), arrays["moments"][i])
        assert np.array_equal(batch["context"][row].numpy(), arrays["context"][i][k])
    # the same (seed, step) gives the same captions; steps spread over all captions of an item
    assert torch.equal(data.__getitems__(request)["context"], batch["context"])
    assert {data.captions(s, [4])[0] for s in range(60)} == set(range(5))
    other_seed = build_dataset(cfg(tmp_path, seed=8))
    assert [other_seed.captions(s, [4])[0] for s in range(20)] != [data.captions(s, [4])[0] for s in range(20)]


def test_through_the_step_sampler_and_a_dataloader(tmp_path):
    write_features(tmp_path)
    data = coco.load_coco(cfg(tmp_path))
    sampler = StepBatchSampler(len(data), 4, seed=7, start_step=11)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=keep_batch)
    batch = next(iter(loader))
    assert int(batch["step"]) == 11 and batch["moments"].shape == (4, 8, 32, 32)


def test_sample_latents_matches_the_posterior_formula():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 32, 32, generator=g)
    logvar = torch.randn(2, 4, 32, 32, generator=g)
    logvar[0, 0] = 50.0  # clamped to 20
    logvar[1, 1] = -100.0  # clamped to -30
    moments = torch.cat([mean, logvar], dim=1)
    z = coco.sample_latents(moments, torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * 0.23010
    assert z.shape == (2, 4, 32, 32) and torch.allclose(z, expected)
    assert torch.equal(coco.sample_latents(moments, torch.Generator().manual_seed(1)), z)  # reproducible


def test_missing_folder_names_layout_script_and_override(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path))
    msg = str(err.value)
    assert "{i}.npy" in msg and "{i}_{k}.npy" in msg and "empty_context.npy" in msg
    assert "scripts/prepare_coco_features.py" in msg and "dataset.data_dir=" in msg


def test_wrong_shapes_are_named(tmp_path):
    write_features(tmp_path)
    np.save(tmp_path / "train" / "2.npy", np.zeros((4, 32, 32), np.float32))  # a latent, not moments
    data = build_dataset(cfg(tmp_path))
    with pytest.raises(DataError) as err:
        data.__getitems__(BatchRequest(step=0, indices=[1, 2]))
    assert str(tmp_path / "train" / "2.npy") in str(err.value) and "(8, 32, 32)" in str(err.value)
    np.save(tmp_path / "train" / "0_0.npy", np.zeros((77, 1024), np.float32))  # a ViT-H context
    with pytest.raises(DataError, match="0_0.npy has shape"):
        build_dataset(cfg(tmp_path))


@pytest.mark.parametrize("remove,named", [("3.npy", "3.npy is missing"), ("4_2.npy", "4_2.npy is missing"),
                                          ("1_0.npy", "1_0.npy is missing")])
def test_gaps_in_the_numbering_are_named(tmp_path, remove, named):
    write_features(tmp_path)
    (tmp_path / "train" / remove).unlink()
    with pytest.raises(DataError, match=named):
        build_dataset(cfg(tmp_path))


# --- preparing the features with tiny randomly initialised models ---------------------------------

def tiny_models(folder: Path):
    """A tiny AutoencoderKL (factor 8, 4 latent channels) and a tiny CLIP text model of width 768."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=256).eval()
    # a byte-level BPE vocabulary without merges: every character is a token
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + n) for n in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = folder / "clip"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    text_model = CLIPTextModel(config).eval()
    return vae, tokenizer, text_model


def write_coco(root: Path, split: str = "train") -> list[tuple[str, list[str]]]:
    """COCO 2014 layout: images of several sizes, a captions json listing them out of id order."""
    rng = np.random.default_rng(1)
    (root / f"{split}2014").mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = [(42, (300, 200)), (7, (200, 260)), (19, (256, 256))]
    captions = {42: ["a red bus", "a bus on a street"], 7: ["two cats"], 19: ["a plate", "food", "a fork"]}
    anns, ann_id = [], 0
    for k in range(3):  # interleaved, as in the real file
        for image_id, caps in captions.items():
            if k < len(caps):
                anns.append({"id": ann_id, "image_id": image_id, "caption": caps[k]})
                ann_id += 1
    for image_id, (w, h) in images:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg")
    (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "width": w, "height": h}
                   for i, (w, h) in images],
        "annotations": anns}))
    return [(f"COCO_{split}2014_{i:012d}.jpg", captions[i]) for i in sorted(captions)]


def test_prepare_with_tiny_models_then_load(tmp_path, capsys):
    vae, tokenizer, text_model = tiny_models(tmp_path / "models")
    expected = write_coco(tmp_path / "coco")
    out = tmp_path / "features"
    n = coco.prepare_coco_split(tmp_path / "coco" / "train2014", tmp_path / "coco" / "annotations" /
                                "captions_train2014.json", out / "train", vae, tokenizer, text_model, batch_size=2)
    coco.write_empty_context(out, tokenizer, text_model)
    assert n == 3 and "COCO ->" in capsys.readouterr().err
    assert not [p for p in (out / "train").iterdir() if not p.name[0].isdigit()]  # no temporary files
    data = build_dataset(cfg(out))
    assert data.num_captions.tolist() == [len(caps) for _, caps in expected]
    for i, (name, caps) in enumerate(expected):  # sorted by image id, captions in file order
        image = coco.center_crop_resize(Image.open(tmp_path / "coco" / "train2014" / name))
        moments = coco.encode_moments(vae, image[None])
        assert np.allclose(np.load(out / "train" / f"{i}.npy"), moments[0], atol=1e-5)
        contexts = coco.encode_text(tokenizer, text_model, caps)
        for k in range(len(caps)):
            assert np.allclose(np.load(out / "train" / f"{i}_{k}.npy"), contexts[k], atol=1e-5)
    assert torch.allclose(data.empty_context, torch.from_numpy(coco.encode_text(tokenizer, text_model, [""])[0]))

    # an interrupted run resumes: only the incomplete image is encoded again
    (out / "train" / "2_1.npy").unlink()
    kept = (out / "train" / "0.npy").stat().st_mtime_ns
    coco.prepare_coco_split(tmp_path / "coco" / "train2014", tmp_path / "coco" / "annotations" /
                            "captions_train2014.json", out / "train", vae, tokenizer, text_model, progress=False)
    assert (out / "train" / "2_1.npy").is_file() and (out / "train" / "0.npy").stat().st_mtime_ns == kept


def test_centre_crop_is_the_central_square():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # the central 100 x 100 square is white, the sides black
    out = coco.center_crop_resize(Image.fromarray(arr), 256)
    assert out.shape == (256, 256, 3) and out[:, 3:-3].min() >= 250


def test_script_with_local_model_folders(tmp_path, capsys):
    vae, tokenizer, text_model = tiny_models(tmp_path / "models")
    vae.save_pretrained(tmp_path / "models" / "vae")
    tokenizer.save_pretrained(tmp_path / "models" / "clip")
    text_model.save_pretrained(tmp_path / "models" / "clip")
    write_coco(tmp_path / "coco", "val")
    spec = importlib.util.spec_from_file_location("prepare_coco_features", ROOT / "scripts" /
                                                  "prepare_coco_features.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--coco-dir", str(tmp_path / "coco"), "--out", str(tmp_path / "features"), "--splits", "val",
            "--vae", str(tmp_path / "models" / "vae"), "--clip", str(tmp_path / "models" / "clip"),
            "--device", "cpu", "--limit", "2"]
    assert script.main(args) == 0
    data = build_dataset(cfg(tmp_path / "features", split="val"))
    assert len(data) == 2 and data.num_captions.tolist() == [1, 3]
    with pytest.raises(SystemExit):
        script.main(args[:-2] + ["--splits", "train"])  # no train2014 here
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: COCO captions file")
