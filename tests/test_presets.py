"""The paper presets: each composes to the paper's numbers and trains a few CPU steps on
generated files in the data set's real format (with a shrunken model)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from scalelong.cli.train import train
from scalelong.models import preset_config

# method.md sections 4 and 5: preset, global batch, lr, betas, weight decay, warm-up, steps.
PAPER = {
    "cifar10": ("uvit_s2_32", 128, 2e-4, [0.99, 0.999], 0.03, 2500, 500_000),
    "celeba64": ("uvit_s4_64", 128, 2e-4, [0.99, 0.99], 0.03, 5000, 500_000),
    "imagenet64": ("uvit_m4_64", 1024, 3e-4, [0.99, 0.99], 0.03, 5000, 300_000),
    "mscoco": ("uvit_s2_latent", 256, 2e-4, [0.9, 0.9], 0.03, 5000, 1_000_000),
}
UNET = {"cifar10": "ddpm_cifar10", "celeba64": "ddpm_64", "imagenet64": "ddpm_64"}


@pytest.mark.parametrize("dataset", list(PAPER))
def test_dataset_alone_selects_the_paper_settings(dataset):
    cfg = compose([f"dataset={dataset}"])
    preset, batch, lr, betas, wd, warmup, steps = PAPER[dataset]
    assert cfg["model"] == preset_config(preset, dataset)
    assert cfg["train"]["batch_size"] == batch and cfg["train"]["max_steps"] == steps
    o = cfg["optim"]
    assert (o["lr"], o["betas"], o["weight_decay"], cfg["train"]["warmup_steps"]) == (lr, betas, wd, warmup)
    assert cfg["ema"]["decay"] == 0.9999
    assert cfg["sample"]["every_n_steps"] == 5000 and cfg["checkpoint"]["keep_every_n_steps"] == 50_000


@pytest.mark.parametrize("dataset, backbone", [(d, "uvit") for d in PAPER] + [(d, "unet") for d in UNET])
def test_the_paper_experiment_on_one_gpu(dataset, backbone):
    """experiment=paper dataset=X model=Y: the data set's preset and recipe, one GPU, FID callback."""
    cfg = compose(["experiment=paper", f"dataset={dataset}", f"model={backbone}"])
    preset = PAPER[dataset][0] if backbone == "uvit" else UNET[dataset]
    assert cfg["dataset"]["name"] == dataset and cfg["model"] == preset_config(preset, dataset)
    assert cfg["trainer"]["accelerator"] == "gpu" and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["train"]["batch_size"] == PAPER[dataset][1] and "fid" in cfg["callbacks"]


def test_the_paper_evaluation_protocol_is_recorded():
    fid = compose(["dataset=cifar10"])["dataset"]["fid"]
    assert (fid["train_samples"], fid["train_sampler"], fid["train_steps"]) == (10000, "dpm_solver", 50)
    assert (fid["final_samples"], fid["final_sampler"], fid["final_steps"]) == (50000, "euler_maruyama", 1000)
    coco = compose(["dataset=mscoco"])["dataset"]
    assert coco["text_drop_prob"] == 0.1 and coco["fid"]["final_samples"] == 30000
    assert coco["latent_scale"] == 0.2301


def test_the_text_dataset_refuses_the_unet():
    from scalelong.utils.errors import ConfigError
    from scalelong.cli.train import build_module

    with pytest.raises(ConfigError, match="only model=uvit takes text tokens"):
        build_module(compose(["dataset=mscoco", "model=unet"]))


SHRINK = ["trainer=cpu", "experiment=smoke", "logger=none", "train.batch_size=4", "train.max_steps=2",
          "model=uvit_tiny", "train.num_workers=0"]


def _cifar10(root):
    from test_data_cifar10 import write_folder

    write_folder(root)
    return ["dataset=cifar10", "dataset.download=false"]


def _celeba64(root):
    from test_data_celeba import write_celeba

    from scalelong.data.celeba import prepare_celeba64

    write_celeba(root)
    prepare_celeba64(root, progress=False)
    return ["dataset=celeba64"]


def _imagenet64(root):
    from test_data_imagenet import write_batches

    from scalelong.data.imagenet import prepare_imagenet64_npz

    prepare_imagenet64_npz(write_batches(root / "npz"), root, progress=False)
    return ["dataset=imagenet64", "dataset.label_drop_prob=0.1"]


def _mscoco(root):
    from test_data_coco import write_features

    write_features(root)
    return ["dataset=mscoco"]


@pytest.mark.parametrize("dataset", list(PAPER))
def test_each_preset_trains_a_few_steps_on_generated_files(tmp_path, dataset):
    data_root = tmp_path / "data"
    data_root.mkdir()
    overrides = globals()[f"_{dataset}"](data_root)
    cfg = compose([*overrides, *SHRINK, f"dataset.data_dir={data_root}"], tmp_path / "run")
    result = train(cfg)
    assert result["trainer"].global_step == 2
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    module = result["module"]
    if dataset == "mscoco":  # the empty prompt came from the data set, and guidance samples run
        assert torch.equal(module.empty_context, torch.full((77, 768), 0.5))
        contexts = torch.randn(2, 77, 768)
        images = module.model.generate(2, "dpm_solver", 3, contexts=contexts, guidance_scale=1.0)
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    if dataset == "imagenet64":  # a null class exists, so guided class samples run
        assert module.net.num_classes == 1001
        images = module.model.generate(2, "euler_ode", 2, labels=torch.tensor([3, 7]), guidance_scale=0.5)
        assert images.shape == (2, 3, 64, 64)


def test_unet_preset_trains_on_cifar10_files(tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    overrides = _cifar10(data_root)
    shrink = [o for o in SHRINK if not o.startswith("model.preset")]
    result = train(compose([*overrides, *shrink, "model=unet", "model=unet_tiny", f"dataset.data_dir={data_root}"],
                           tmp_path / "run"))
    assert result["trainer"].global_step == 2


def test_latent_samples_are_decoded_to_pixels_by_the_configured_autoencoder(tmp_path):
    """dataset.decoder: a diffusers AutoencoderKL folder (here tiny and random) turns latent
    samples into 256x256 RGB images (grids, FID)."""
    pytest.importorskip("diffusers")
    from test_data_coco import tiny_models, write_features

    vae, _, _ = tiny_models(tmp_path / "models")
    vae.save_pretrained(tmp_path / "vae")
    data_root = tmp_path / "data"
    write_features(data_root)
    cfg = compose(["dataset=mscoco", *SHRINK, f"dataset.data_dir={data_root}", f"dataset.decoder={tmp_path / 'vae'}"],
                  tmp_path / "run")
    result = train(cfg)
    images = result["module"].model.generate(2, "dpm_solver", 3, contexts=torch.randn(2, 77, 768), guidance_scale=1.0)
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.uint8
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
