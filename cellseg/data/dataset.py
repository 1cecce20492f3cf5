"""torch Dataset over HW3 sample folders, with augmentation that suits cells.

Augmentation (training only), two modes (AUGMENTS):
  basic  at native pixel scale: horizontal/vertical flips, 90-degree rotations, mild intensity
         jitter (brightness x[0.9, 1.1], contrast x[0.9, 1.1] about the mean, per-channel gain
         x[0.95, 1.05] for stain variation), and an optional random crop of `crop_size`.
  cells  the same geometry plus scale jitter x[0.8, 1.25] (the crop window is drawn in source
         pixels so the output stays `crop_size`; image bilinear, masks nearest), and colour jitter
         by modality: brightfield (H&E: median gray > 0.5) gets HED stain jitter (optical density
         unmixed with Ruifrok & Johnston's H-E-DAB vectors, each stain x[0.9, 1.1] + [-0.03, 0.03]
         OD, as in Tellez et al. 2018); dark-background fluorescence gets per-channel gain
         x[0.8, 1.2] and gamma [0.8, 1.25]; both then brightness/contrast x[0.85, 1.15].
Instances that vanish are dropped; boxes are recomputed from the final masks with the
x2 = max_x + 1 rule, so image, masks and boxes always agree. Randomness is drawn from (seed,
epoch, index), so a resumed run sees the same augmentations as an uninterrupted one and
DataLoader workers need no extra seeding.

`repeat_factors` + `RepeatFactorSampler`: LVIS repeat-factor sampling (Gupta et al. 2019) of the
crops holding rare classes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from cellseg.data.hw3 import Sample, pixels_to_box, read_instance_pixels, read_sample


@dataclass(frozen=True, eq=False)  # eq=False: a numpy field has no scalar ==
class SampleStats:
    """What training needs to know of a sample before it starts: its size and its objects."""

    sample_dir: Path
    height: int
    width: int
    object_sizes: np.ndarray  # (N,) max(w, h) of each instance's box, in pixels
    labels: np.ndarray | None = None  # (N,) class label (1-based) of each instance

    @property
    def instances(self) -> int:
        return int(self.object_sizes.size)


def scan_samples(sample_dirs: Sequence[str | Path], class_names: tuple[str, ...],
                 on_sample: Callable[[int], None] | None = None) -> list[SampleStats]:
    """Read every sample once (image, class files, their shapes) so a bad file fails before any
    training, as a one-line DataError naming it, not after an epoch's compute. `on_sample(i)` is
    called after the i-th (1-based) sample, for progress."""
    stats = []
    for i, d in enumerate(sample_dirs, start=1):
        image, labels, pixels = read_instance_pixels(d, class_names)
        h, w = image.shape[:2]
        sizes = np.array([max(x2 - x1, y2 - y1) for x1, y1, x2, y2 in (pixels_to_box(p, w) for p in pixels)],
                         np.float32)
        stats.append(SampleStats(Path(d), int(h), int(w), sizes, np.asarray(labels, np.int64).reshape(-1)))
        if on_sample is not None:
            on_sample(i)
    return stats


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 xyxy with x2 = max_x + 1, y2 = max_y + 1."""
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0, 4), np.float32)
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    y1 = rows.argmax(axis=1)
    y2 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


AUGMENTS = ("basic", "cells")
SCALE_JITTER = (0.8, 1.25)
# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class Window:
    """A crop window in source pixels, and the factor it is then resized by."""

    y0: int
    x0: int
    height: int
    width: int
    scale: float = 1.0


def check_augment(mode: str) -> None:
    if mode not in AUGMENTS:
        raise ValueError(f"unknown augmentation {mode!r} (choose from {', '.join(AUGMENTS)})")


def draw_window(rng: np.random.Generator, height: int, width: int, crop_size: int, mode: str) -> Window:
    """The random window of an image: with scale jitter ("cells") a window of crop_size / scale
    source pixels, so the output is about crop_size after resizing; draws nothing else."""
    check_augment(mode)
    scale = float(rng.uniform(*SCALE_JITTER)) if mode == "cells" else 1.0
    if crop_size <= 0:
        return Window(0, 0, height, width, scale)
    side = max(1, math.ceil(crop_size / scale)) if scale != 1.0 else crop_size
    if height <= side and width <= side:
        return Window(0, 0, height, width, scale)
    ch, cw = min(side, height), min(side, width)
    y0 = int(rng.integers(0, height - ch + 1))
    x0 = int(rng.integers(0, width - cw + 1))
    return Window(y0, x0, ch, cw, scale)


def augment_sample(image: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   crop_size: int = 0, mode: str = "basic") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random crop (+ scale), flips, rot90 and colour jitter; returns (image, masks, labels, boxes)."""
    win = draw_window(rng, image.shape[0], image.shape[1], crop_size, mode)
    rows, cols = slice(win.y0, win.y0 + win.height), slice(win.x0, win.x0 + win.width)
    return augment_window(image[rows, cols], masks[:, rows, cols], labels, rng, win.scale, mode)


def augment_window(image: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   scale: float = 1.0, mode: str = "basic") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Everything after the crop: resize by `scale`, drop vanished instances, flips, rot90,
    colour jitter; boxes recomputed from the final masks."""
    if scale != 1.0:
        image, masks = rescale(image, masks, scale)
    keep = masks.any(axis=(1, 2))
    masks, labels = masks[keep], labels[keep]
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if rng.random() < 0.5:
        image, masks = image[::-1], masks[:, ::-1]
    k = int(rng.integers(0, 4))
    if k:
        image, masks = np.rot90(image, k, axes=(0, 1)), np.rot90(masks, k, axes=(1, 2))
    image = colour_jitter(np.ascontiguousarray(image, np.float32), rng, mode)
    masks = np.ascontiguousarray(masks)
    return image, masks, labels, boxes_from_masks(masks)


def rescale(image: np.ndarray, masks: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear (antialiased when shrinking), masks nearest, to round(side * scale)."""
    h, w = image.shape[:2]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    im = torch.from_numpy(np.ascontiguousarray(image, np.float32).transpose(2, 0, 1))[None]
    im = F.interpolate(im, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)
    out = im[0].numpy().transpose(1, 2, 0)
    if masks.shape[0] == 0:
        return out, np.zeros((0, *size), bool)
    m = torch.from_numpy(np.ascontiguousarray(masks, np.uint8))[None]
    return out, F.interpolate(m, size=size, mode="nearest")[0].numpy().astype(bool)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, mode: str) -> np.ndarray:
    if mode == "basic":
        brightness = rng.uniform(0.9, 1.1)
        contrast = rng.uniform(0.9, 1.1)
        gain = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
        mean = float(image.mean())
        image = ((image - mean) * contrast + mean) * brightness * gain
        return np.clip(image, 0.0, 1.0).astype(np.float32)
    if float(np.median(image.mean(axis=2))) > 0.5:  # bright background: brightfield stain
        image = hed_jitter(image, rng.uniform(0.9, 1.1, size=3), rng.uniform(-0.03, 0.03, size=3))
    else:  # dark background: fluorescence channels
        gain = rng.uniform(0.8, 1.2, size=3).astype(np.float32)
        gamma = float(rng.uniform(0.8, 1.25))
        image = np.clip(image, 0.0, 1.0) ** gamma * gain
    brightness, contrast = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    mean = float(image.mean())
    return np.clip(((image - mean) * contrast + mean) * brightness, 0.0, 1.0).astype(np.float32)


def hed_jitter(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale (alpha) and shift (beta, optical density) each of the H, E, DAB stain amounts."""
    od = -np.log(np.clip(image, 1e-6, 1.0))
    stains = od.reshape(-1, 3) @ _HED_FROM_RGB
    od = (stains * alpha + beta) @ _RGB_FROM_HED
    return np.exp(-od).reshape(image.shape).astype(np.float32)


def repeat_factors(labels_per_sample: Sequence[np.ndarray], num_classes: int, threshold: float) -> np.ndarray:
    """LVIS repeat factors: class c in a share f_c of the samples gets r_c = max(1, sqrt(t / f_c));
    a sample gets the largest r_c of its classes (1 without instances)."""
    n = len(labels_per_sample)
    present = np.zeros((n, num_classes + 1), bool)
    for i, labels in enumerate(labels_per_sample):
        present[i, np.asarray(labels, np.int64)] = True
    share = present.mean(axis=0) if n else np.zeros(num_classes + 1)
    with np.errstate(divide="ignore"):
        per_class = np.where(share > 0, np.maximum(1.0, np.sqrt(threshold / np.maximum(share, 1e-12))), 1.0)
    per_class[0] = 1.0
    return np.array([per_class[present[i]].max() if present[i, 1:].any() else 1.0 for i in range(n)])


class RepeatFactorSampler(Sampler[int]):
    """Each epoch: sample i floor(r_i) times plus once more for a fixed number round(sum of the
    fractions) of samples drawn with probability proportional to their fraction; shuffled; then
    this rank's shard (padded by wrapping, as DistributedSampler). Deterministic in (seed,
    epoch), and the same length every epoch."""

    def __init__(self, factors: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.factors = np.asarray(factors, np.float64)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.epoch = 0
        whole = np.floor(self.factors)
        self._base = np.repeat(np.arange(len(self.factors)), whole.astype(np.int64))
        self._fractions = self.factors - whole
        self._extra = int(round(float(self._fractions.sum())))
        total = len(self._base) + self._extra
        self.num_samples = math.ceil(total / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        extra = np.zeros(0, np.int64)
        if self._extra:
            p = self._fractions / self._fractions.sum()
            extra = rng.choice(len(self.factors), size=self._extra, replace=False, p=p)
        indices = rng.permutation(np.concatenate([self._base, extra]))
        total = self.num_samples * self.num_replicas
        indices = np.resize(indices, total)  # wraps around to pad
        return iter(indices[self.rank::self.num_replicas].tolist())


class CellDataset(Dataset):
    """Items: (image float32 tensor 3xHxW in [0, 1], target {"boxes" float32 (N,4) xyxy,
    "labels" int64 (N,), "masks" uint8 (N,H,W), "image_id" int (index + 1)})."""

    def __init__(self, sample_dirs: Sequence[str | Path], class_names: tuple[str, ...], augment: bool,
                 crop_size: int = 0, seed: int = 0, cache: bool = False, mode: str = "basic") -> None:
        check_augment(mode)
        self.mode = mode
        self.sample_dirs = [Path(p) for p in sample_dirs]
        self.class_names = tuple(class_names)
        self.augment = augment
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        # Decoded samples, masks bit-packed (8x smaller): (sample, packed masks, mask shape).
        self._cache: dict[int, tuple[Sample, np.ndarray, tuple[int, ...]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sample_dirs)

    def sample(self, index: int) -> Sample:
        if index in self._cache:
            s, packed, shape = self._cache[index]
            masks = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
            return Sample(s.sample_id, s.image, masks, s.labels, s.boxes)
        s = read_sample(self.sample_dirs[index], self.class_names)
        if self.cache:
            empty = np.zeros((0, 1, 1), bool)
            self._cache[index] = (Sample(s.sample_id, s.image, empty, s.labels, s.boxes),
                                  np.packbits(s.masks), s.masks.shape)
        return s

    def cropped_sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """A random window of the sample with window-local masks only: a crowded 1024 px image
        holds ~1000 instances, whose full-size masks would take 1 GB. Draws the window from `rng`
        exactly as augment_sample would, so both paths give the same crop. Returns (image,
        masks, labels, scale still to apply)."""
        image, labels, pixels = read_instance_pixels(self.sample_dirs[index], self.class_names)
        h, w = image.shape[:2]
        win = draw_window(rng, h, w, self.crop_size, self.mode)
        y0, x0, ch, cw = win.y0, win.x0, win.height, win.width
        masks, kept = [], []
        for label, flat in zip(labels, pixels):
            rows, cols = np.divmod(flat, w)
            inside = (rows >= y0) & (rows < y0 + ch) & (cols >= x0) & (cols < x0 + cw)
            if inside.any():
                mask = np.zeros((ch, cw), bool)
                mask[rows[inside] - y0, cols[inside] - x0] = True
                masks.append(mask)
                kept.append(label)
        return (image[y0:y0 + ch, x0:x0 + cw], np.asarray(masks, bool).reshape(-1, ch, cw),
                np.asarray(kept, np.int64), win.scale)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self.crop_size > 0 and not self.cache:
                image, masks, labels, scale = self.cropped_sample(index, rng)
                image, masks, labels, boxes = augment_window(image, masks, labels, rng, scale, self.mode)
            else:
                s = self.sample(index)
                image, masks, labels, boxes = augment_sample(s.image, s.masks, s.labels, rng, self.crop_size,
                                                             self.mode)
        else:
            s = self.sample(index)
            image, masks, labels, boxes = s.image, s.masks, s.labels, s.boxes
        h, w = image.shape[:2]
        target = {
            "boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, np.int64).reshape(-1)),
            "masks": torch.as_tensor(np.asarray(masks, np.uint8).reshape(-1, h, w)),
            "image_id": index + 1,
        }
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
