"""Training: composition of every config, EMA, warm-up, a loss that falls, exact resume."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from conftest import CONF, compose

from scalelong.training.ema import EMA
from scalelong.utils.errors import ConfigError
from scalelong.cli.train import train
from scalelong.scaling import STRATEGIES
from scalelong.cli.train import build_module
from scalelong.model import DiffusionModel
from scalelong.training.lr_schedule import lr_factor, warmup_constant
from scalelong.training.module import DiffusionModule

SCALING_OVERRIDES = {name: [f"scaling={name}"] for name in STRATEGIES}
SCALING_OVERRIDES["constant"] = ["scaling=constant", "scaling.kappa=0.7"]


def smoke(run_dir, *extra):
    return compose(["experiment=smoke", "logger=none", *extra], run_dir)


DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))


@pytest.mark.parametrize("dataset, model, scaling", list(itertools.product(DATASETS, ["uvit", "unet"], STRATEGIES)))
def test_every_combination_composes_and_instantiates(tmp_path, dataset, model, scaling):
    cfg = compose([f"dataset={dataset}", f"model={model}", *SCALING_OVERRIDES[scaling]], tmp_path)
    assert cfg["model"]["_target_"] == {"uvit": "scalelong.models.UViT", "unet": "scalelong.models.UNet"}[model]
    assert cfg["scaling"]["name"] == scaling
    if dataset == "mscoco" and model == "unet":
        with pytest.raises(ConfigError, match="only model=uvit takes text tokens"):
            build_module(cfg)
        return
    # Full-size presets are built on the meta device (shapes only); the digits models also run.
    with torch.device("cpu" if dataset == "digits" else "meta"):
        module = build_module(cfg)
    assert module.net.skip_scaling.name == scaling
    assert module.net.skip_scaling.num_skips == module.net.num_skips > 0
    if dataset == "digits":
        c, h, w = module.space.image_shape
        out = module.net(torch.zeros(2, c, h, w), torch.tensor([1.0, 500.0]))
        assert out.shape == (2, c, h, w)


def test_quickstart_defaults():
    cfg = compose([])
    assert cfg["dataset"]["name"] == "digits" and cfg["model"]["_target_"] == "scalelong.models.UNet"
    assert cfg["model"]["base_channels"] == 24 and cfg["trainer"]["accelerator"] == "cpu"
    # The quickstart's recipe (README "The quickstart"): no attention, the digits at their native 8x8
    # for 1,500 steps on the cosine noise schedule at 4x its SNR, a decayed, clipped rate, one grid made
    # of the 100 scored samples, which are scored, read and shown at the data set's 16x16.
    assert cfg["model"]["attn_resolutions"] == [] and cfg["train"]["max_steps"] == 1500
    assert cfg["dataset"]["image_size"] == 8 and cfg["model"]["img_size"] == 8
    assert cfg["diffusion"] == {"schedule": "cosine", "snr_shift": 4} and cfg["train"]["lr_decay"] == "cosine"
    assert cfg["quick_eval"] == {"num": 100, "grid": True, "size": 16}
    # recipe=digits16: the quickstart before, on 16x16 digits for 1,000 steps at the schedule's own SNR
    sixteen = compose(["recipe=digits16"])
    assert (sixteen["dataset"]["image_size"], sixteen["model"]["img_size"], sixteen["train"]["max_steps"]) == (
        16, 16, 1000)
    assert sixteen["diffusion"] == {"schedule": "cosine", "snr_shift": 1} and sixteen["quick_eval"].get("size") is None
    assert compose(["recipe=digits16", "model=uvit"])["model"]["patch_size"] == 4
    # the SNR shift follows the size: the digits drawn at 16x16 train on the schedule as it is
    assert compose(["dataset.image_size=16"])["diffusion"]["snr_shift"] == 1
    with pytest.raises(ConfigError, match="set diffusion.snr_shift"):
        compose(["dataset.image_size=0"])
    assert cfg["train"]["grad_clip"] == 1.0 and cfg["train"]["min_snr_gamma"] is None  # the plain loss
    # The studies keep the recipe they ran with: 16x16 digits on the paper's schedule as it is, a
    # constant rate, no clipping (claim 5: the cosine schedule); so does the post-hoc EMA study.
    from scalelong.cli.posthoc_ema_study import CPU_OVERRIDES

    for experiment in ("study_cpu", "collapse_cpu", "stability_cpu", "claim5_cpu"):
        study = compose([f"experiment={experiment}"])
        assert (study["diffusion"]["schedule"], study["train"]["lr_decay"], study["train"]["grad_clip"]) == (
            "cosine" if experiment == "claim5_cpu" else "linear", None, None), experiment
        assert (study["dataset"]["image_size"], study["model"]["img_size"], study["diffusion"]["snr_shift"]) == (
            16, 16, 1), experiment
        if study["model"]["_target_"].endswith("UViT"):
            assert study["model"]["patch_size"] == 4, experiment  # 4 x 4 tokens, as they ran
    posthoc = compose(list(CPU_OVERRIDES))
    assert (posthoc["dataset"]["image_size"], posthoc["diffusion"]["snr_shift"]) == (16, 1)
    assert cfg["sample"]["every_n_steps"] == 0
    assert (cfg["sample"]["sampler"], cfg["sample"]["steps"]) == ("ancestral", 50)
    uvit = compose(["model=uvit"])["model"]
    assert uvit["_target_"] == "scalelong.models.UViT" and uvit["embed_dim"] == 128  # the uvit_tiny preset
    assert uvit["patch_size"] == 2  # 4 x 4 tokens of the 8x8 digits


def test_the_grid_at_the_end_is_a_key_of_the_config():
    """sample.at_end is in conf/train.yaml (true), so it is set without Hydra's `+`, as the
    post-hoc EMA study's training overrides set it."""
    from scalelong.cli.posthoc_ema_study import CPU_OVERRIDES
    from scalelong.training.end_of_run import grid_at_end

    cfg = compose(["quick_eval=null"])
    assert cfg["sample"]["at_end"] is True and grid_at_end(cfg)
    study = compose(list(CPU_OVERRIDES))
    assert study["sample"]["at_end"] is False and not grid_at_end(study)


def test_the_digits_are_scikit_learns_read_from_its_file():
    """The built-in data set, read from scikit-learn's own file without importing it, is exactly
    what ``sklearn.datasets.load_digits`` gives; the 16x16 images keep the labels' order."""
    import numpy as np
    from sklearn import datasets

    from scalelong.data.digits import digits_arrays, digits_csv, load_digits_images

    assert digits_csv() is not None  # the direct path is the one taken here
    pixels, labels = digits_arrays()
    reference = datasets.load_digits()
    assert np.array_equal(pixels, reference.images) and np.array_equal(labels, reference.target)
    data = load_digits_images(16)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.uint8
    assert torch.equal(data.labels, torch.as_tensor(reference.target))


def test_warmup_schedule_values():
    assert [warmup_constant(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_constant(0, 0) == 1.0


def test_the_trainer_updates_the_ema_once_per_step_and_warms_the_lr_up(tmp_path, monkeypatch):
    """Through the real trainer: the learning rate of optimizer step k is lr * min(k / w, 1), and
    after step k the EMA is decay * EMA + (1 - decay) * weights, once per step."""
    seen = {"lr": [], "weights": [], "ema": []}

    class Recording(DiffusionModule):
        def on_fit_start(self):
            super().on_fit_start()
            seen["ema0"] = [p.detach().clone() for p in self.ema.module.parameters()]

        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            seen["lr"].append(optimizer.param_groups[0]["lr"])

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            seen["weights"].append([p.detach().clone() for p in self.net.parameters()])
            seen["ema"].append([p.detach().clone() for p in self.ema.module.parameters()])

    monkeypatch.setattr("scalelong.training.module.DiffusionModule", Recording)
    for warmup in (False, True):
        seen.update(lr=[], weights=[], ema=[])
        cfg = smoke(tmp_path / str(warmup), "train.max_steps=6", "train.warmup_steps=3", "train.lr_decay=null", "ema.decay=0.5",
                    "optim.lr=1e-3", f"ema.warmup={str(warmup).lower()}")
        train(cfg)
        assert seen["lr"] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
        ema = seen["ema0"]
        for n, (weights, logged) in enumerate(zip(seen["weights"], seen["ema"]), start=1):
            # with warm-up, update n averages with min(decay, (1 + n) / (10 + n)): 2/11, 3/12, ...
            decay = min(0.5, (1 + n) / (10 + n)) if warmup else 0.5
            ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
            for expected, actual in zip(ema, logged):
                torch.testing.assert_close(actual, expected)
        assert len(seen["ema"]) == 6
        assert not torch.equal(seen["weights"][-1][0], seen["weights"][1][0])  # the weights did move


@pytest.mark.parametrize("decay, expected", [
    # warm-up over 3 steps, then from 1 down to 0 at step 7: cos(pi * k / 4) / 2 + 1/2 for k = 0..3
    ("cosine", [0.0, 1 / 3, 2 / 3, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)]),
    ("linear", [0.0, 1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
])
def test_the_trainer_decays_the_lr_to_zero_at_the_last_step(tmp_path, monkeypatch, decay, expected):
    """``train.lr_decay``: through the real trainer, optimizer step k uses lr * the schedule's factor."""
    seen = []

    class Recording(DiffusionModule):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            seen.append(optimizer.param_groups[0]["lr"])

    monkeypatch.setattr("scalelong.training.module.DiffusionModule", Recording)
    train(smoke(tmp_path, "train.max_steps=7", "train.warmup_steps=3", "optim.lr=1e-3", f"train.lr_decay={decay}"))
    assert seen == pytest.approx([1e-3 * f for f in expected])
    assert lr_factor(7, 3, decay, 7) == 0.0 and lr_factor(5, 3, None, 7) == 1.0


def test_the_trainer_weights_the_loss_by_min_snr_when_asked(tmp_path, monkeypatch):
    """``train.min_snr_gamma``: through the real trainer, the loss each step minimises is the mean of
    min(SNR, gamma) / SNR times each sample's squared error (the default, null, is the plain mean:
    test_quickstart_defaults and the loss tests)."""
    import scalelong.training.module as module_file

    seen = []
    plain_loss = module_file.noise_prediction_loss

    def recording(net, x0, sde, cond, **kwargs):
        loss, per_sample, t = plain_loss(net, x0, sde, cond, return_per_sample=True, **kwargs)
        seen.append((kwargs.get("min_snr_gamma"), sde, loss.detach(), per_sample.detach(), t))
        return loss

    monkeypatch.setattr(module_file, "noise_prediction_loss", recording)
    train(smoke(tmp_path, "train.max_steps=3", "train.min_snr_gamma=5"))
    assert len(seen) == 3
    weights = []
    for given, sde, loss, per_sample, t in seen:
        assert given == 5.0
        snr = sde.mean_coef(t) ** 2 / sde.std(t) ** 2
        weight = torch.clamp(snr, max=5.0) / snr
        torch.testing.assert_close(loss, (per_sample * weight).mean())
        weights.append(weight)
    # the steps drew times on both sides of SNR = gamma
    assert float(torch.cat(weights).min()) < 0.5 and float(torch.cat(weights).max()) == 1.0


def test_ema_arithmetic():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for e, s in zip(ema.module.parameters(), start):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * (s + 1.0))
    ema.update(net)  # a second step with the weights unchanged moves 10% of the rest of the way
    for e, s in zip(ema.module.parameters(), start):
        torch.testing.assert_close(e, s + 1.0 - 0.81)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_stays_in_eval_mode():
    ema = EMA(torch.nn.Dropout(0.5), 0.99)
    ema.train()
    assert not ema.module.training


def test_the_ema_copy_in_eval_mode_is_not_reported_as_a_problem(tmp_path, monkeypatch):
    """Lightning warns about modules in eval mode at the start of fit; the EMA copy is one on
    purpose, so a run says nothing. Any other module left in eval mode is still reported."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(smoke(tmp_path / "plain"))
    assert not [w for w in seen if "in eval mode" in str(w.message)]

    class FrozenNet(DiffusionModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.net.eval()
            self.net.train = lambda mode=True: self.net  # stays in eval mode through fit

    monkeypatch.setattr("scalelong.training.module.DiffusionModule", FrozenNet)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(smoke(tmp_path / "frozen"))
    assert [w for w in seen if "in eval mode" in str(w.message)]


def _fixed_loss(module: DiffusionModule, images: torch.Tensor) -> float:
    """Loss on a fixed batch with fixed t and noise, so two evaluations are comparable."""
    g = torch.Generator().manual_seed(123)
    x0 = images.float() / 127.5 - 1
    t = module.sde.sample_t(len(x0), 1e-3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = module.net.eval()(module.sde.marginal(x0, t, noise), t * 999)
    return float(torch.mean((pred - noise) ** 2))


# 15 steps on the quickstart's 8x8 digits: measured loss ratios 0.60 (unet) and 0.80 (uvit; 0.72 after
# 30). At 4x the SNR the loss has a higher floor than on 16x16 digits, where they were 0.15 and 0.55.
@pytest.mark.parametrize("model, bound", [("unet", 0.7), ("uvit", 0.9)])
def test_a_few_steps_make_the_loss_fall(tmp_path, model, bound):
    cfg = smoke(tmp_path, f"model={model}", "scaling=learnable", "train.max_steps=15", "train.batch_size=32",
                "optim.lr=2e-3")
    torch.manual_seed(cfg["seed"])
    before_module = build_module(cfg)
    from scalelong.data import build_dataset
    images = build_dataset(cfg["dataset"]).images[:256]
    before = _fixed_loss(before_module, images)
    result = train(cfg)
    after = _fixed_loss(result["module"], images)
    assert after < bound * before, (before, after)
    assert math.isfinite(result["metrics"]["train/grad_norm"])


def _state(module: DiffusionModule, trainer) -> dict[str, torch.Tensor]:
    state = {f"net.{k}": v for k, v in module.net.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in module.ema.module.state_dict().items()})
    opt = trainer.optimizers[0].state_dict()
    for pid, s in opt["state"].items():
        for k, v in s.items():
            state[f"opt.{pid}.{k}"] = torch.as_tensor(v)
    return state


def test_resume_continues_exactly(tmp_path):
    # The tiny UNet has dropout 0.1: its masks must repeat after a resume too.
    common = ["scaling=learnable", "train.batch_size=16", "train.warmup_steps=4", "checkpoint.every_n_steps=3"]
    full = train(smoke(tmp_path / "full", *common, "train.max_steps=6"))
    half = train(smoke(tmp_path / "half", *common, "train.max_steps=3"))
    ckpt = torch.load(half["checkpoint"], weights_only=False)
    assert ckpt["global_step"] == 3
    resumed = train(smoke(tmp_path / "resumed", *common, "train.max_steps=6", f"ckpt_path={half['checkpoint']}"))
    assert resumed["trainer"].global_step == 6
    a, b = _state(full["module"], full["trainer"]), _state(resumed["module"], resumed["trainer"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # The learning-rate schedule continued too: step 6 of a 4-step warm-up and the recipe's decay
    # (the digits' cosine, down to 0 at the last step), as in the uninterrupted run.
    cfg = smoke(tmp_path)
    expected = cfg["optim"]["lr"] * lr_factor(6, 4, cfg["train"]["lr_decay"], 6)
    assert resumed["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
    assert full["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)


def test_checkpoint_restores_model_ema_and_optimizer(tmp_path):
    run = train(smoke(tmp_path, "scaling=constant", "scaling.kappa=0.6", "train.max_steps=3"))
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    restored = DiffusionModel.from_checkpoint(run["checkpoint"])
    for name, trained, loaded in [("net", run["module"].net, restored.net), ("ema", run["module"].ema.module,
                                                                             restored.ema_net)]:
        for (k, v), (k2, v2) in zip(trained.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), f"{name}.{k}"
    assert "ema.module.stem.weight" in ckpt["state_dict"]
    assert len(ckpt["optimizer_states"][0]["state"]) == len(list(run["module"].net.parameters()))
    assert restored.net.skip_scaling.kappa == 0.6 and restored.step == 3


def test_compiled_backbone_matches_eager(quick_compile):
    """model.compile=true compiles the backbone in place: same outputs, same parameter names
    (traced by TorchDynamo, the backbone whole, without Inductor's C++: see ``quick_compile``)."""
    cfg = compose(["model=uvit", "scaling=learnable", "model.compile=true",
                   "model.depth=2", "model.embed_dim=32", "model.num_heads=2"])
    torch.manual_seed(0)
    compiled = build_module(cfg)
    eager = build_module(compose(["model=uvit", "scaling=learnable",
                                     "model.depth=2", "model.embed_dim=32", "model.num_heads=2"]))
    eager.load_state_dict(compiled.state_dict())
    x, t = torch.randn(3, *compiled.space.image_shape), torch.tensor([10.0, 400.0, 990.0])
    with torch.no_grad():
        torch.testing.assert_close(compiled.net(x, t), eager.net(x, t), rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_a_finished_run_stays_finished_when_a_key_is_added_to_the_configs(tmp_path):
    """A sweep run again skips its finished jobs, also after an update added a setting (with its
    default) that their stored config.yaml lacks; a setting whose value differs still reruns."""
    import copy
    import json

    from omegaconf import OmegaConf

    from scalelong.cli.train import _finished_run

    cfg = smoke(tmp_path, "train.max_steps=5")
    (tmp_path / "metrics.json").write_text(json.dumps({"step": 5, "train/loss": 0.1}))
    older = copy.deepcopy(cfg)
    del older["train"]["lr_decay"]  # the run was made before train.lr_decay existed
    OmegaConf.save(OmegaConf.create(older), tmp_path / "config.yaml")
    assert _finished_run(cfg)["metrics"]["step"] == 5
    changed = copy.deepcopy(cfg)
    changed["optim"]["lr"] = 2 * cfg["optim"]["lr"]
    assert _finished_run(changed) is None
    removed = copy.deepcopy(cfg)
    del removed["ema"]["warmup"]  # a setting the run had and the configs no longer have
    assert _finished_run(removed) is None
