"""The HW3 data layout.

Training:  ROOT/train/<sample_id>/image.tif + class<k>.tif (k >= 1, only for classes present;
           each class file is an instance label image, 0 = background, any positive ids).
           A class file may also be a lossless class<k>.tiff or class<k>.png; lossy or other
           formats with a class-like name are refused, never silently ignored.
Test:      ROOT/test_release/<name>.tif and ROOT/test_image_name_to_ids.json
           (a list of {"file_name", "id", "height", "width"}).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.data.images import read_image, read_label_image
from cellseg.errors import DataError, InputError
from cellseg.fileio import read_json

IMAGE_FILE = "image.tif"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".tif", ".tiff", ".png")  # lossless label images only
_CLASS_FILE = re.compile(r"class([1-9][0-9]*)\.(?i:tiff?|png)")
# Any name that looks like a class mask: refused unless it is a valid _CLASS_FILE.
_CLASS_LIKE = re.compile(r"class[^.]*\.(tiff?|png|jpe?g|bmp|gif|webp|npy|npz)", re.IGNORECASE)
_GROUP_SUFFIX = re.compile(r"_[0-9]+$")


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no scalar ==
class Sample:
    """One training image with its instances (ordered by class, then by id in the file)."""

    sample_id: str
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray  # (N,) int64 in 1..K
    boxes: np.ndarray  # (N, 4) float32 xyxy, x2 = max_x + 1 (1-pixel instance has width 1)


@dataclass(frozen=True)
class TestImageEntry:
    file_name: str
    image_id: int
    height: int
    width: int


def find_train_root(root: str | os.PathLike) -> Path:
    """ROOT/train when it exists, else ROOT itself when it holds sample folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if (root / "train").is_dir():
        return root / "train"
    if any((d / IMAGE_FILE).is_file() for d in root.iterdir() if d.is_dir()):
        return root
    raise DataError(f"{root}: no train/ folder and no <sample_id>/{IMAGE_FILE} sample folders")


def list_sample_dirs(root: str | os.PathLike) -> list[Path]:
    """Sorted sample folders (those holding image.tif) of the training root."""
    train = find_train_root(root)
    dirs = []
    for d in sorted(train.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if (d / IMAGE_FILE).is_file():
            dirs.append(d)
        elif any(_CLASS_LIKE.fullmatch(f.name) for f in d.iterdir()):
            raise DataError(f"{d}: has class files but no {IMAGE_FILE}")
    if not dirs:
        raise DataError(f"{train}: no sample folders with {IMAGE_FILE}")
    return dirs


def class_files_of(sample_dir: Path) -> dict[int, Path]:
    """{k: path} of the class<k>.tif / .tiff / .png files in a sample folder; a class-like name
    that does not parse as one of those with k >= 1, or two files for one class, is an error
    (it would otherwise be silently ignored)."""
    files: dict[int, Path] = {}
    for f in sorted(sample_dir.iterdir()):
        if not _CLASS_LIKE.fullmatch(f.name):
            continue
        match = _CLASS_FILE.fullmatch(f.name)
        if match is None:
            raise DataError(f"{f}: unexpected class file name (expected class<k>.tif, .tiff or .png "
                            f"with k >= 1; masks must be lossless)")
        k = int(match.group(1))
        if k in files:
            raise DataError(f"{f}: a second mask file for class {k} (also {files[k].name})")
        files[k] = f
    return files


def class_names_of(root: str | os.PathLike) -> tuple[str, ...]:
    """("class1", ..., "classK"), K = the highest class file number in any sample."""
    highest = 0
    for d in list_sample_dirs(root):
        highest = max([highest, *class_files_of(d)])
    if highest == 0:
        raise DataError(f"{find_train_root(root)}: no class<k>.tif files in any sample")
    return tuple(f"class{k}" for k in range(1, highest + 1))


def _instances_of(label_image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(ids, [flat pixel indices of each id]) via one argsort, not N full-image comparisons.
    Pieces of one id that are not connected stay one instance."""
    flat = label_image.ravel()
    nonzero = np.flatnonzero(flat)
    if nonzero.size == 0:
        return np.zeros(0, np.int64), []
    ids = flat[nonzero]
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    pixels = np.split(nonzero[order], starts[1:])
    return sorted_ids[starts], pixels


def read_instance_pixels(
    sample_dir: str | os.PathLike, class_names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(image, labels (N,) int64, [flat pixel indices of each instance]) of a sample folder,
    without building N full-image masks. Instances are ordered by class, then by id."""
    sample_dir = Path(sample_dir)
    image = read_image(sample_dir / IMAGE_FILE)
    height, width = image.shape[:2]
    labels: list[int] = []
    pixels: list[np.ndarray] = []
    for k, path in sorted(class_files_of(sample_dir).items()):
        if k > len(class_names):
            raise DataError(f"{path}: class {k} but the data set has {len(class_names)} classes")
        label_image = read_label_image(path)
        if label_image.shape != (height, width):
            raise DataError(
                f"{path}: mask shape {label_image.shape} differs from image shape {(height, width)}"
            )
        _, class_pixels = _instances_of(label_image)
        labels.extend([k] * len(class_pixels))
        pixels.extend(class_pixels)
    return image, np.asarray(labels, dtype=np.int64), pixels


def pixels_to_box(flat_pixels: np.ndarray, width: int) -> tuple[int, int, int, int]:
    """[min_x, min_y, max_x + 1, max_y + 1] of flat pixel indices in an image of this width."""
    rows, cols = np.divmod(flat_pixels, width)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def read_sample(sample_dir: str | os.PathLike, class_names: tuple[str, ...]) -> Sample:
    """Read one sample folder. Instances are ordered by class, then by id. Memory: the masks
    take N * H * W bytes (800 instances on 1000 x 1000 = 800 MB)."""
    sample_dir = Path(sample_dir)
    image, labels, pixels = read_instance_pixels(sample_dir, class_names)
    height, width = image.shape[:2]
    masks = np.zeros((len(pixels), height, width), dtype=bool)
    boxes = np.zeros((len(pixels), 4), dtype=np.float32)
    for i, flat_pixels in enumerate(pixels):
        masks[i].ravel()[flat_pixels] = True
        boxes[i] = pixels_to_box(flat_pixels, width)
    return Sample(sample_dir.name, image, masks, labels, boxes)


# ---- test set ------------------------------------------------------------------------------


def list_test_images(root: str | os.PathLike) -> list[Path]:
    """Sorted images of ROOT/test_release, or of ROOT itself when it is a folder of images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: test image folder not found")
    folder = root / "test_release" if (root / "test_release").is_dir() else root
    images = sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_id_entries(path: str | os.PathLike) -> list[TestImageEntry]:
    """Entries of test_image_name_to_ids.json, validated (unique names and ids)."""
    path = Path(path)
    raw = read_json(path, "id map file")
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of {{file_name, id, height, width}}")
    entries: list[TestImageEntry] = []
    names: set[str] = set()
    ids: set[int] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"{path}: entry {i} is not an object")
        missing = [k for k in ("file_name", "id", "height", "width") if k not in item]
        if missing:
            raise DataError(f"{path}: entry {i} lacks {', '.join(missing)}")
        name, image_id = item["file_name"], item["id"]
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: entry {i} file_name is not a non-empty string")
        if not all(_positive_int(item[k]) for k in ("id", "height", "width")):
            raise DataError(f"{path}: entry {i} ({name}) id/height/width must be non-negative integers")
        if name in names:
            raise DataError(f"{path}: duplicate file_name {name}")
        if image_id in ids:
            raise DataError(f"{path}: duplicate id {image_id}")
        names.add(name)
        ids.add(image_id)
        entries.append(TestImageEntry(name, image_id, item["height"], item["width"]))
    return entries


def read_id_map(path: str | os.PathLike) -> dict[str, int]:
    """{file_name: image id} from test_image_name_to_ids.json."""
    return {e.file_name: e.image_id for e in read_id_entries(path)}


# ---- grouped validation split --------------------------------------------------------------


def sample_group(sample_id: str) -> str:
    """Crops of one source image share a group: strip one trailing `_<digits>` if present
    (consep_train_1_000 -> consep_train_1), else the id itself."""
    stripped = _GROUP_SUFFIX.sub("", sample_id)
    return stripped if stripped else sample_id


def split_train_val(
    sample_ids: list[str], val_fraction: float, seed: int,
    class_counts: dict[str, np.ndarray] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministic split by group (see sample_group): no group straddles train and val.

    Without `class_counts` groups are visited in a seeded random order; a group joins val when
    that brings the val sample count closer to val_fraction * n (the first always joins). With
    `class_counts` (sample id -> instances per class) the split is stratified: see
    _stratified_val_groups. With val_fraction > 0 and >= 2 groups val gets at least one group and
    train keeps at least one. Order of the input is kept within each list.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = list(sample_ids)
    sizes: dict[str, int] = {}
    for sid in ids:
        sizes[sample_group(sid)] = sizes.get(sample_group(sid), 0) + 1
    names = sorted(sizes)
    if val_fraction == 0.0 or len(names) < 2:
        return ids, []
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    if class_counts is None:
        chosen = _sized_val_groups(order, sizes, val_fraction * len(ids))
    else:
        chosen = _stratified_val_groups(order, sizes, _group_class_counts(ids, class_counts), val_fraction)
    train = [s for s in ids if sample_group(s) not in chosen]
    val = [s for s in ids if sample_group(s) in chosen]
    return train, val


def _sized_val_groups(order: list[str], sizes: dict[str, int], target: float) -> set[str]:
    val_groups: list[str] = []
    count = 0
    for name in order:
        if not val_groups or abs(count + sizes[name] - target) < abs(count - target):
            val_groups.append(name)
            count += sizes[name]
    if len(val_groups) == len(order):
        val_groups.pop()
    return set(val_groups)


def _group_class_counts(ids: list[str], class_counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    totals: dict[str, np.ndarray] = {}
    for sid in ids:
        group = sample_group(sid)
        totals[group] = totals.get(group, 0.0) + np.asarray(class_counts[sid], np.float64)
    return totals


def _stratified_val_groups(order: list[str], sizes: dict[str, int], counts: dict[str, np.ndarray],
                           val_fraction: float) -> set[str]:
    """Val groups whose samples and instances of every class come closest to val_fraction of the
    whole, so validation scores every class (a split by sample count alone can leave a common
    class out of val when classes cluster in source images). Greedy from the seed's first
    group: add the group that lowers the cost most, until none does. A group is never taken
    when that would leave a class with no training instance."""
    total = sum(counts.values())
    classes = total > 0
    target_samples = val_fraction * sum(sizes.values())
    target = val_fraction * total

    def cost(samples: float, instances: np.ndarray) -> float:
        size_gap = abs(samples - target_samples) / max(target_samples, 1.0)
        class_gaps = np.abs(instances - target)[classes] / np.maximum(target[classes], 1.0)
        return float(size_gap + class_gaps.sum())

    def keeps_training_data(instances: np.ndarray) -> bool:
        return bool(np.all(instances[classes] < total[classes]))

    first = next((g for g in order if keeps_training_data(counts[g])), order[0])
    chosen, samples, instances = [first], float(sizes[first]), counts[first].copy()
    while len(chosen) < len(order) - 1:
        best, best_cost = None, cost(samples, instances)
        for group in order:
            if group in chosen or not keeps_training_data(instances + counts[group]):
                continue
            trial = cost(samples + sizes[group], instances + counts[group])
            if trial < best_cost - 1e-12:
                best, best_cost = group, trial
        if best is None:
            break
        chosen.append(best)
        samples += sizes[best]
        instances += counts[best]
    return set(chosen)
