"""torch Dataset over HW3 sample folders, with augmentation that suits cells.

Augmentation (training only), all at native pixel scale: horizontal/vertical flips, 90-degree
rotations, mild intensity jitter (brightness x[0.9, 1.1], contrast x[0.9, 1.1] about the mean,
per-channel gain x[0.95, 1.05] for stain variation), and an optional random crop of `crop_size`
(instances that vanish are dropped; boxes are recomputed from the cropped masks with the
x2 = max_x + 1 rule). Randomness is drawn from (seed, epoch, index), so a resumed run sees the
same augmentations as an uninterrupted one and DataLoader workers need no extra seeding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cellseg.data.hw3 import Sample, pixels_to_box, read_instance_pixels, read_sample


@dataclass(frozen=True, eq=False)  # eq=False: a numpy field has no scalar ==
class SampleStats:
    """What training needs to know of a sample before it starts: its size and its objects."""

    sample_dir: Path
    height: int
    width: int
    object_sizes: np.ndarray  # (N,) max(w, h) of each instance's box, in pixels

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
        image, _, pixels = read_instance_pixels(d, class_names)
        h, w = image.shape[:2]
        sizes = np.array([max(x2 - x1, y2 - y1) for x1, y1, x2, y2 in (pixels_to_box(p, w) for p in pixels)],
                         np.float32)
        stats.append(SampleStats(Path(d), int(h), int(w), sizes))
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


def augment_sample(image: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   crop_size: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random crop, flips, rot90 and intensity jitter; returns (image, masks, labels, boxes)."""
    h, w = image.shape[:2]
    if crop_size > 0 and (h > crop_size or w > crop_size):
        ch, cw = min(crop_size, h), min(crop_size, w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        image = image[y0:y0 + ch, x0:x0 + cw]
        masks = masks[:, y0:y0 + ch, x0:x0 + cw]
        keep = masks.any(axis=(1, 2))
        masks, labels = masks[keep], labels[keep]
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if rng.random() < 0.5:
        image, masks = image[::-1], masks[:, ::-1]
    k = int(rng.integers(0, 4))
    if k:
        image, masks = np.rot90(image, k, axes=(0, 1)), np.rot90(masks, k, axes=(1, 2))
    brightness = rng.uniform(0.9, 1.1)
    contrast = rng.uniform(0.9, 1.1)
    gain = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    mean = float(image.mean())
    image = ((image - mean) * contrast + mean) * brightness * gain
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    masks = np.ascontiguousarray(masks)
    return image, masks, labels, boxes_from_masks(masks)


class CellDataset(Dataset):
    """Items: (image float32 tensor 3xHxW in [0, 1], target {"boxes" float32 (N,4) xyxy,
    "labels" int64 (N,), "masks" uint8 (N,H,W), "image_id" int (index + 1)})."""

    def __init__(self, sample_dirs: Sequence[str | Path], class_names: tuple[str, ...], augment: bool,
                 crop_size: int = 0, seed: int = 0, cache: bool = False) -> None:
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

    def cropped_sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A random crop_size window of the sample with crop-local masks only: a crowded 1024 px
        image holds ~1000 instances, whose full-size masks would take 1 GB. Draws the window
        from `rng` exactly as augment_sample would, so both paths give the same crop."""
        image, labels, pixels = read_instance_pixels(self.sample_dirs[index], self.class_names)
        h, w = image.shape[:2]
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
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
                np.asarray(kept, np.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self.crop_size > 0 and not self.cache:
                image, masks, labels = self.cropped_sample(index, rng)
                image, masks, labels, boxes = augment_sample(image, masks, labels, rng)
            else:
                s = self.sample(index)
                image, masks, labels, boxes = augment_sample(s.image, s.masks, s.labels, rng, self.crop_size)
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
