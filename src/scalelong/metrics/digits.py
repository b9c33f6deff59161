"""Cheap, honest sample-quality measures for the digits from a small CNN trained to classify
scikit-learn's digits: the Frechet distance (and KID) in its feature space, instead of Inception
(seconds per image on a CPU), whose features plug into the FID machinery like Inception's; and
legibility, how sure the same network, trained also to say "no digit" to noise and blends
(the reader), is of each sample's digit, as a reader would judge it."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalelong.metrics.inception import cache_dir
from scalelong.utils.io import write_bytes

VERSION = 1  # bump when the network or its training changes: cached weights are keyed by it
READER_VERSION = 1  # the same for the legibility reader (trained also on images that are no digit)
NUM_TRAIN = 1500  # the classifier learns from these digits (a fixed shuffle); the other 297 are held out


class DigitClassifier(nn.Module):
    """16x16 grey digits -> 10 classes; ``features`` is the 64-d layer before the last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """x (B, 1, 16, 16) in [0, 1] -> (B, 64)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def held_out_split(num: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of the digits the classifier trains on and of those it never sees."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return order[:NUM_TRAIN], order[NUM_TRAIN:]


def _not_digits(x: Tensor, labels: Tensor, g: torch.Generator) -> Tensor:
    """As many images that are no digit as ``x`` has: half pixel noise (grey, or black and white
    as an untrained model's clipped samples are), half even blends of two different digits (what
    a model that has not yet chosen a digit draws)."""
    n = len(x)
    level = torch.rand(n, 1, 1, 1, generator=g)
    grey = torch.rand(n, 1, 16, 16, generator=g) * level
    clipped = (torch.rand(n, 1, 16, 16, generator=g) < level).float()
    noise = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, grey, clipped)
    other = torch.randperm(n, generator=g)
    blend = (labels != labels[other]).view(-1, 1, 1, 1) & (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    return torch.where(blend, (x + x[other]) / 2, noise)


def train_digit_classifier(seed: int = 0, epochs: int = 30, outliers: bool = False) -> tuple[DigitClassifier, float]:
    """The classifier trained on 1,500 of the 1,797 digits (16x16, as the data set serves them);
    returns it and its accuracy on the other 297. A few seconds on a CPU.

    With ``outliers`` (the legibility reader) it also sees as many images that are no digit
    (noise, blends of two digits) with the uniform distribution as target ("outlier exposure"):
    the plain classifier is as sure of its answer on noise (0.75-0.80 on average) as on many
    digits, so its confidence could not tell a digit from a scribble. The plain one stays the
    Frechet distance's feature extractor: its features keep the study's figures comparable."""
    from scalelong.data import load_digits_images

    data = load_digits_images(16)
    x = data.images.float() / 255.0
    y = data.labels
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)  # the order held_out_split draws
    train, held_out = order[:NUM_TRAIN], order[NUM_TRAIN:]
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 100 tiny images: more threads only wait for each other
    net = DigitClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=g).split(100):
            idx = train[batch]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            if outliers:
                loss = loss - F.log_softmax(net(_not_digits(x[idx], y[idx], g)), 1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = float((net(x[held_out]).argmax(1) == y[held_out]).float().mean())
    return net.eval(), accuracy


def load_digit_classifier(cache: str | Path | None = None,
                          reader: bool = False) -> tuple[DigitClassifier, str, float]:
    """The classifier from ``<cache>/digits/classifier_v{VERSION}.pt`` (with ``reader``, the
    legibility reader from ``reader_v{READER_VERSION}.pt``), trained and saved the first time;
    returns (network, sha1 of the weights file, held-out accuracy)."""
    name, version = ("reader", READER_VERSION) if reader else ("classifier", VERSION)
    path = Path(cache) if cache is not None else cache_dir() / "digits" / f"{name}_v{version}.pt"
    if not path.is_file():
        net, accuracy = train_digit_classifier(outliers=reader)
        buffer = io.BytesIO()
        torch.save({"state_dict": net.state_dict(), "accuracy": accuracy, "version": version}, buffer)
        write_bytes(path, buffer.getvalue())
    data = path.read_bytes()
    stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    net = DigitClassifier()
    net.load_state_dict(stored["state_dict"])
    return net.eval().requires_grad_(False), hashlib.sha1(data).hexdigest(), float(stored["accuracy"])


class DigitFeatures(nn.Module):
    """The classifier's 64 features, with the interface of the Inception extractors: ``resize``
    (numpy HWC uint8 -> float HWC; the digits are already 16x16), ``dim``, ``mode``, ``sha1``, and
    a call on float (B, 3, 16, 16) in [0, 255] (grey repeated, as the FID pipeline feeds it)."""

    dim = 64
    mode = "digit_classifier"

    def __init__(self, cache: str | None = None):
        super().__init__()
        self.net, self.sha1, self.accuracy = load_digit_classifier(cache)

    @staticmethod
    def resize(image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (8, 8):  # drawn at the digits' native size: read as the data set's 16x16
            chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
            image = as_read(chw)[0].permute(1, 2, 0).numpy()
        if image.shape[:2] != (16, 16):
            raise ValueError(f"the digit classifier reads 16x16 (or 8x8) images, got {image.shape[:2]}")
        return image.astype(np.float32)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x[:, :1].to(self.device, torch.float32) / 255.0)


# --- legibility: how sure the classifier is of each sample's digit -----------------------------

CONFIDENT = 0.9  # a sample "reads as a digit" when the classifier gives one class at least this


class DigitReader:
    """Reads images as digits: per image, the reader's class and its confidence (the largest
    softmax probability). Real digits it never saw score high, blurs lower, noise low."""

    def __init__(self, cache: str | Path | None = None):
        self.net, self.sha1, self.accuracy = load_digit_classifier(cache, reader=True)
        self._real: dict | None = None

    @torch.no_grad()
    def read(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (N, 1 or 3, 16, 16) or (N, 1 or 3, 8, 8), as samples are saved -> (confidence (N,),
        class (N,)). 8x8 images (drawn at the digits' native size) are read as the data set makes
        its 16x16 ones from them."""
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[2:]) not in ((16, 16), (8, 8)):
            raise ValueError(f"the digit reader reads uint8 (N, C, 16, 16) or (N, C, 8, 8) images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        probs = F.softmax(self.net(as_read(images[:, :1].cpu()).float() / 255.0), dim=1)
        confidence, label = probs.max(dim=1)
        return confidence, label

    def real_digits(self) -> dict:
        """The same summary for the 297 digits the classifier never saw, read the same way
        (uint8 16x16, as the data set serves them and the samples are saved): the figure to
        compare a model's samples with."""
        if self._real is None:
            from scalelong.data import load_digits_images

            images = load_digits_images(16).images
            _, held_out = held_out_split(len(images))
            self._real = legibility(*self.read(images[held_out]))
        return self._real


def as_read(images: Tensor) -> Tensor:
    """uint8 digits as the classifier reads them: 16x16, those drawn at 8x8 resized the data set's way."""
    from scalelong.data.images import resize_uint8

    return resize_uint8(images, 16) if tuple(images.shape[-2:]) == (8, 8) else images


def readings_in_order(shares: list, num: int) -> tuple[Tensor, Tensor]:
    """Confidences and classes of samples 0..num-1 from every rank's ``(indices, confidence,
    class)`` pieces (``all_gather_object`` of what each rank read)."""
    confidence, label = torch.zeros(num), torch.zeros(num, dtype=torch.long)
    for indices, conf, cls in (piece for share in shares for piece in share):
        where = torch.as_tensor(indices)
        confidence[where], label[where] = conf.cpu(), cls.cpu()
    return confidence, label


def legibility(confidence: Tensor, label: Tensor, confident: float = CONFIDENT) -> dict:
    """Summary of readings: how many read as a digit with confidence > ``confident``, how often
    each class is read (a model that draws only ones is not legible either), the mean confidence."""
    counts = torch.bincount(label, minlength=10).tolist()
    return {"num": len(confidence), "mean_confidence": float(confidence.mean()),
            "confident": int((confidence > confident).sum()), "threshold": confident, "class_counts": counts}


def legibility_line(samples: dict, real: dict) -> str:
    """One line for the end of a run, e.g. ``91 of 100 samples read as a digit with confidence >
    0.9; classes 0-9 each 7-13 times; mean confidence 0.83 (real digits 0.91)``."""
    counts = samples["class_counts"]
    missing = [str(k) for k, c in enumerate(counts) if c == 0]
    classes = (f"classes 0-9 each {min(counts)}-{max(counts)} times" if not missing
               else f"classes read {min(c for c in counts if c)}-{max(counts)} times, never {', '.join(missing)}")
    return (f"Legibility: {samples['confident']} of {samples['num']} samples read as a digit with confidence > "
            f"{samples['threshold']:g}; {classes}; mean confidence {samples['mean_confidence']:.2f} "
            f"(real digits {real['mean_confidence']:.2f}, {real['confident']} of {real['num']} > {real['threshold']:g})")
