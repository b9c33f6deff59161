"""MS-COCO 256 text-to-image in Stable Diffusion latent space, U-ViT's ``coco256_features`` layout
(autoencoder moments per image, CLIP contexts per caption), read from disk a batch at a time,
and making those features. Layout: ``docs/design.md``, "MS-COCO features"."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from scalelong.data.arrays import data_dir_of
from scalelong.data.sampler import BatchRequest
from scalelong.utils.seeding import STREAM_CAPTION, STREAM_EVAL_CAPTION, step_seed
from scalelong.utils.errors import DataError
from scalelong.utils.io import atomic_write

LATENT_SCALE = 0.23010  # U-ViT's scale for these latents (configs/mscoco_uvit_small.py)
MOMENTS_SHAPE = (8, 32, 32)
LATENT_SHAPE = (4, 32, 32)
CONTEXT_SHAPE = (77, 768)
IMAGE_SIZE = 256
_NAME = re.compile(r"^(\d+)(?:_(\d+))?\.npy$")
_COCO_SITE = "https://cocodataset.org/#download"


def _prepare_hint(root: Path) -> str:
    return (f"make them from COCO 2014 (train2014.zip, val2014.zip and annotations_trainval2014.zip from "
            f"{_COCO_SITE}) with `python scripts/prepare_coco_features.py --coco-dir /path/to/coco --out {root}`, "
            f"or point to an existing U-ViT coco256_features folder with dataset.data_dir=/path/to/folder")


# --- latents ---------------------------------------------------------------------------------------

def sample_latents(moments: Tensor, generator: torch.Generator | None = None, scale: float = LATENT_SCALE,
                   noise: Tensor | None = None) -> Tensor:
    """Autoencoder moments (B, 8, H, W) -> scaled latents (B, 4, H, W) = (mean + std * noise) * scale.

    As the Stable Diffusion (and U-ViT) Gaussian posterior: the first 4 channels are the mean,
    the last 4 the log-variance, clamped to [-30, 20] before ``std = exp(logvar / 2)``. The noise
    comes from ``generator`` (on the moments' device) so a training step can redraw it exactly,
    or is given as ``noise`` (B, 4, H, W).
    """
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scale


def caption_index(seed: int, step: int, index: int, num_captions: int) -> int:
    """Which caption of item ``index`` batch ``step`` uses: a fixed function of (seed, step, index)."""
    return step_seed(step_seed(seed, step, STREAM_CAPTION), index) % num_captions


# --- the data set ----------------------------------------------------------------------------------

def scan_features(folder: Path) -> np.ndarray:
    """Number of captions of each item (N,) from the file names of a features folder.

    A DataError when an item's moments file or one of its caption files is missing (the
    numbering must be 0..N-1 for items and 0..n_i-1 for captions).
    """
    items, caps = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _NAME.match(entry.name)
            if m is None:
                continue  # other files (temporary ones, notes) are not features
            if m.group(2) is None:
                items.append(int(m.group(1)))
            else:
                caps.append((int(m.group(1)), int(m.group(2))))
    n = len(items)
    if n == 0:
        raise DataError(f"{folder} holds no feature files ({{i}}.npy, {{i}}_{{k}}.npy); "
                        f"{_prepare_hint(folder.parent)}")
    if max(items) >= n:
        present = np.zeros(n, dtype=bool)
        present[[i for i in items if i < n]] = True
        missing = int(np.flatnonzero(~present)[0])
        raise DataError(f"{folder / f'{missing}.npy'} is missing: the {n} moment files must be numbered 0..{n - 1}; "
                        f"rerun scripts/prepare_coco_features.py (it resumes) to complete the folder")
    pairs = np.asarray(caps, dtype=np.int64).reshape(-1, 2)
    orphans = pairs[pairs[:, 0] >= n]
    if len(orphans):
        i, k = orphans[0]
        raise DataError(f"{folder / f'{i}_{k}.npy'} has no moments file {i}.npy; rerun "
                        f"scripts/prepare_coco_features.py (it resumes) to complete the folder")
    counts = np.bincount(pairs[:, 0], minlength=n)
    top = np.full(n, -1, dtype=np.int64)
    np.maximum.at(top, pairs[:, 0], pairs[:, 1])
    bad = np.flatnonzero((counts == 0) | (top + 1 != counts))
    if len(bad):
        i = int(bad[0])
        have = set(pairs[pairs[:, 0] == i, 1].tolist())
        k = next(k for k in range(int(top[i]) + 2) if k not in have)
        raise DataError(f"{folder / f'{i}_{k}.npy'} is missing: the captions of image {i} must be numbered "
                        f"{i}_0.npy, {i}_1.npy, ...; rerun scripts/prepare_coco_features.py (it resumes)")
    return counts


def _load_feature(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy file ({err}); delete it and rerun "
                        f"scripts/prepare_coco_features.py (it resumes)") from err
    if arr.shape != shape:
        raise DataError(f"{path} has shape {arr.shape}, expected {shape} (MS-COCO 256 features: moments "
                        f"{MOMENTS_SHAPE} of the Stable Diffusion autoencoder, CLIP ViT-L/14 contexts "
                        f"{CONTEXT_SHAPE}); remake the folder with scripts/prepare_coco_features.py")
    return arr.astype(np.float32, copy=False)


class CocoLatentFeatures(Dataset):
    """U-ViT's MS-COCO 256 features, read from disk one batch (``BatchRequest``) at a time.

    A batch is ``{"moments": (B, 8, 32, 32) float32, "context": (B, 77, 768) float32,
    "step": tensor(step)}``; the model sees ``sample_latents(moments)`` (B, 4, 32, 32). The caption
    of each item is ``caption_index(seed, step, index, n)``, so a resumed run reads the captions
    an uninterrupted one would. Classifier-free guidance (dropping the context for
    ``empty_context``) is the training step's job.
    """

    shape = LATENT_SHAPE
    num_classes = 0
    latent_scale = LATENT_SCALE

    def __init__(self, root: str | Path, split: str = "train", seed: int = 0):
        self.root = Path(root)
        self.folder = self.root / split
        self.seed = int(seed)
        empty = self.root / "empty_context.npy"
        if not self.folder.is_dir() or not empty.is_file():
            missing = self.folder if not self.folder.is_dir() else empty
            raise DataError(f"MS-COCO 256 features not found ({missing} is missing): expected {self.folder}/{{i}}.npy "
                            f"(autoencoder moments {MOMENTS_SHAPE} float32) and {{i}}_{{k}}.npy (CLIP ViT-L/14 "
                            f"hidden states {CONTEXT_SHAPE} float32) for every image i and caption k, and "
                            f"{empty} (the empty prompt); {_prepare_hint(self.root)}")
        self.empty_context = torch.from_numpy(_load_feature(empty, CONTEXT_SHAPE).copy())
        self.num_captions = scan_features(self.folder)
        self._eval_order: list[int] | None = None  # image order of sample_contexts, for _eval_order_seed
        self._eval_order_seed: int | None = None
        # a wrong layout shows at once, not at the first batch
        _load_feature(self.folder / "0.npy", MOMENTS_SHAPE)
        _load_feature(self.folder / "0_0.npy", CONTEXT_SHAPE)

    def __len__(self) -> int:
        return len(self.num_captions)

    def captions(self, step: int, indices: Sequence[int]) -> list[int]:
        """The caption number k of each item of the batch at ``step``."""
        return [caption_index(self.seed, step, int(i), int(self.num_captions[i])) for i in indices]

    def _batch(self, step: int, indices: Sequence[int]) -> dict[str, Tensor]:
        ks = self.captions(step, indices)
        moments = np.stack([_load_feature(self.folder / f"{i}.npy", MOMENTS_SHAPE) for i in indices])
        context = np.stack([_load_feature(self.folder / f"{i}_{k}.npy", CONTEXT_SHAPE) for i, k in zip(indices, ks)])
        return {"moments": torch.from_numpy(moments), "context": torch.from_numpy(context), "step": torch.tensor(step)}

    def __getitems__(self, request: BatchRequest) -> dict[str, Tensor]:
        return self._batch(request.step, request.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Item ``i`` with the caption step 0 would use: moments (8, 32, 32), context (77, 768)."""
        batch = self._batch(0, [i])
        return {"moments": batch["moments"][0], "context": batch["context"][0]}

    def sample_contexts(self, sample_indices: Tensor | Sequence[int], seed: int = 0) -> Tensor:
        """Caption contexts (n, 77, 768) that condition the samples with these global indices.

        As U-ViT's evaluation (random captions of the val split): the split's images are put in
        one random order (from ``seed``) and cycled, and sample i takes a random caption of image
        ``order[i % N]``. So 30k samples see 30k different val2014 images, and sample i's caption
        depends only on (seed, i), never on how many processes draw the samples.
        """
        n = len(self)
        if self._eval_order is None or self._eval_order_seed != seed:
            g = torch.Generator().manual_seed(step_seed(seed, 0, STREAM_EVAL_CAPTION))
            self._eval_order, self._eval_order_seed = torch.randperm(n, generator=g).tolist(), seed
        out = []
        for i in torch.as_tensor(sample_indices).tolist():
            item = self._eval_order[i % n]
            k = step_seed(step_seed(seed, i, STREAM_EVAL_CAPTION), item) % int(self.num_captions[item])
            out.append(_load_feature(self.folder / f"{item}_{k}.npy", CONTEXT_SHAPE))
        return torch.from_numpy(np.stack(out))


def load_coco(cfg: Mapping[str, Any]) -> CocoLatentFeatures:
    """MS-COCO 256 features (see ``CocoLatentFeatures``).

    Keys read: ``data_dir`` (U-ViT's ``coco256_features`` folder), ``split`` (default ``train``),
    ``seed`` (caption choice; default 0 — set it to the run's seed).
    """
    root = data_dir_of(cfg, "MS-COCO 256 features", "train/{i}.npy, train/{i}_{k}.npy and empty_context.npy "
                       "(U-ViT's coco256_features)")
    return CocoLatentFeatures(root, split=str(cfg.get("split", "train")), seed=int(cfg.get("seed", 0)))


class CocoImages:
    """The images of a COCO 2014 split folder (``val2014/*.jpg``) as U-ViT's FID sees them.

    Centre-cropped and resized to ``size`` (``center_crop_resize``), decoded on demand in
    batches: the reference set of text-to-image FID, 40,504 images at 256 px (7.9 GB as uint8),
    is streamed, never held in memory. Images are in file-name order (= COCO image id order).
    """

    def __init__(self, folder: str | Path, size: int = IMAGE_SIZE, workers: int = 4):
        self.folder, self.size, self.workers = Path(folder), int(size), int(workers)
        if not self.folder.is_dir():
            raise DataError(f"COCO image folder {self.folder} not found: FID of the text-to-image model compares "
                            f"with the {self.folder.name} images; get {self.folder.name}.zip from {_COCO_SITE}, "
                            f"unzip it and set dataset.coco_dir to the folder that holds {self.folder.name}/")
        self.files = sorted(p.name for p in self.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.files:
            raise DataError(f"{self.folder} holds no .jpg images; unzip {self.folder.name}.zip from {_COCO_SITE} there")

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices: Tensor | Sequence[int]) -> Tensor:
        """uint8 images (n, 3, size, size) of the given positions."""
        from concurrent.futures import ThreadPoolExecutor

        paths = [self.folder / self.files[i] for i in torch.as_tensor(indices).tolist()]
        with ThreadPoolExecutor(max(1, self.workers)) as pool:  # PIL releases the GIL while decoding
            arrays = list(pool.map(lambda path: _read_image(path, self.size), paths))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --- making the features (scripts/prepare_coco_features.py) ----------------------------------------

def coco_captions(annotation_file: str | Path) -> list[tuple[int, str, list[str]]]:
    """(image id, file name, captions) of a COCO captions json, sorted by image id.

    Captions keep the order of the ``annotations`` list, which is what pycocotools'
    ``getAnnIds``/``loadAnns`` give U-ViT.
    """
    path = Path(annotation_file)
    try:
        data = json.loads(path.read_text())
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[str]] = {i: [] for i in images}
        for ann in data["annotations"]:
            captions[int(ann["image_id"])].append(str(ann["caption"]))
    except FileNotFoundError as err:
        raise DataError(f"COCO captions file {path} not found; get annotations_trainval2014.zip from {_COCO_SITE} "
                        f"and unzip it into the folder given as --coco-dir") from err
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a COCO captions file ({type(err).__name__}: {err}); get a fresh "
                        f"annotations_trainval2014.zip from {_COCO_SITE}") from err
    empty = [i for i, caps in captions.items() if not caps]
    if empty:
        raise DataError(f"{path}: image {empty[0]} ({images[empty[0]]}) has no captions; the file is incomplete, "
                        f"get a fresh copy from {_COCO_SITE}")
    return [(i, images[i], captions[i]) for i in sorted(images)]


def center_crop_resize(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """U-ViT's COCO preprocessing -> uint8 (size, size, 3): the central square, Lanczos-resized."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    square = Image.fromarray(arr[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> autoencoder moments (B, 8, H/8, W/8) float32.

    ``vae`` is a ``diffusers.AutoencoderKL``; the moments are its posterior's parameters (the
    ``quant_conv`` output, before any clamping), the same tensor U-ViT's ``encode_moments`` saves.
    """
    device, dtype = _module_device_dtype(vae)
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32)
    x = (x / 127.5 - 1.0).to(dtype)
    return vae.encode(x).latent_dist.parameters.float().cpu().numpy()


@torch.no_grad()
def encode_text(tokenizer, text_model: torch.nn.Module, texts: list[str], max_length: int = 77) -> np.ndarray:
    """Captions -> CLIP last hidden states (n, max_length, D) float32, as U-ViT's FrozenCLIPEmbedder.

    Padded to ``max_length`` with the tokenizer's pad token and truncated; no attention mask is
    passed (U-ViT passes none), so the padded positions' states match U-ViT's files.
    """
    device, _ = _module_device_dtype(text_model)
    tokens = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    out = text_model(input_ids=tokens["input_ids"].to(device))
    return out.last_hidden_state.float().cpu().numpy()


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, np.ascontiguousarray(arr, dtype=np.float32))


def _done(folder: Path, i: int, n: int) -> bool:
    return (folder / f"{i}.npy").is_file() and all((folder / f"{i}_{k}.npy").is_file() for k in range(n))


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return center_crop_resize(img, size)
    except (OSError, SyntaxError) as err:
        raise DataError(f"cannot read COCO image {path} ({err}); replace it from the COCO 2014 zip") from err


def prepare_coco_split(image_dir: str | Path, annotation_file: str | Path, out_dir: str | Path,
                       vae: torch.nn.Module, tokenizer, text_model: torch.nn.Module, size: int = IMAGE_SIZE,
                       batch_size: int = 16, limit: int | None = None, progress: bool = True) -> int:
    """Write ``out_dir/{i}.npy`` (moments) and ``out_dir/{i}_{k}.npy`` (caption contexts) for a split.

    ``vae`` (``diffusers.AutoencoderKL``), ``tokenizer`` and ``text_model`` (``transformers``
    CLIP) are built by the caller, on the device and dtype to use. Each file is written
    atomically, an image's captions before its moments, and images whose files all exist are
    skipped, so an interrupted run resumes. ``limit`` keeps the first images only (for trials).
    Returns the number of images of the split.
    """
    from tqdm import tqdm

    entries = coco_captions(annotation_file)
    if limit is not None:
        entries = entries[:limit]
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise DataError(f"COCO image folder {image_dir} not found; get it from {_COCO_SITE} (train2014.zip / "
                        f"val2014.zip) and unzip it into the folder given as --coco-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(i, name, caps) for i, (_, name, caps) in enumerate(entries) if not _done(out_dir, i, len(caps))]
    with tqdm(total=len(entries), initial=len(entries) - len(todo), desc=f"COCO -> {out_dir}", unit="img",
              disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, len(todo), batch_size):
            part = todo[lo:lo + batch_size]
            images = np.stack([_read_image(image_dir / name, size) for _, name, _ in part])
            moments = encode_moments(vae, images)
            texts = [c for _, _, caps in part for c in caps]
            contexts = encode_text(tokenizer, text_model, texts)
            at = 0
            for (i, _, caps), m in zip(part, moments):
                for k in range(len(caps)):
                    _save(out_dir / f"{i}_{k}.npy", contexts[at + k])
                at += len(caps)
                _save(out_dir / f"{i}.npy", m)  # last: its presence marks the item complete
                bar.update()
    return len(entries)


def write_empty_context(out_root: str | Path, tokenizer, text_model: torch.nn.Module) -> Path:
    """``out_root/empty_context.npy``: the CLIP hidden states (77, D) of the empty prompt."""
    path = Path(out_root) / "empty_context.npy"
    _save(path, encode_text(tokenizer, text_model, [""])[0])
    return path
