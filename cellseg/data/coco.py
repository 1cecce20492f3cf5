"""COCO ground truth: RLE helpers, HW3 -> COCO conversion, loading with validation, writing.

RLE dicts are {"size": [h, w], "counts": str} (pycocotools' compressed RLE, counts decoded to
str so that they are JSON-serialisable).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from cellseg.data.hw3 import class_names_of, list_sample_dirs, read_instance_pixels
from cellseg.errors import DataError, foreign_errors
from cellseg.fileio import atomic_write_json, read_json


def encode_mask(mask: np.ndarray) -> dict:
    """HxW bool mask -> {"size": [h, w], "counts": str}."""
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects an HxW mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _decode(rle: dict) -> np.ndarray:
    # pycocotools' Cython decode trips numpy 2's __array__(copy=) DeprecationWarning on every
    # call; it is harmless and would flood logs, so it is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def decode_rle(rle: dict) -> np.ndarray:
    """RLE dict (compressed str/bytes counts, or uncompressed list counts) -> HxW bool."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return _decode(compressed)



_RLE_MAX_CHARS_PER_NUMBER = 12  # 60 bits: more is no count a real mask can have


def rle_counts_problem(counts: str, height: int, width: int) -> str | None:
    """Why a compressed RLE counts string is not a valid mask of height x width, or None.

    Decodes the string the way pycocotools' rleFrString does (6-bit characters from '0', 5 data
    bits + a continuation bit, sign bit on the last character, counts from the fourth on stored
    as differences to the count two before), vectorised, and checks every run is non-negative
    and the runs sum to height * width. pycocotools itself reads past such strings or accepts a
    short one silently."""
    if not isinstance(counts, str):
        return "RLE counts must be a string"
    raw = counts.encode("ascii", errors="replace")
    chars = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return None if height * width == 0 else "RLE counts are empty"
    if (chars < 0).any() or (chars > 63).any():
        return "RLE counts hold characters outside the compressed-RLE alphabet ('0'..'o')"
    ends = (chars & 0x20) == 0
    if not ends[-1]:
        return "RLE counts end in the middle of a number"
    starts = np.flatnonzero(np.r_[True, ends[:-1]])
    token = np.cumsum(np.r_[0, ends[:-1].astype(np.int64)])
    position = np.arange(chars.size) - starts[token]
    if position.max() >= _RLE_MAX_CHARS_PER_NUMBER:
        return "RLE counts hold a number too long for any mask"
    values = np.zeros(len(starts), np.int64)
    np.add.at(values, token, (chars & 0x1F) << (5 * position))
    last = chars[ends]
    negative = (last & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (position[ends][negative] + 1))
    runs = values.copy()
    runs[2::2] = np.cumsum(values[2::2])  # counts from index 3 on are deltas to index - 2
    runs[1::2] = np.cumsum(values[1::2])
    runs[0] = values[0]
    if (runs < 0).any():
        return "RLE counts decode to a negative run length"
    if int(runs.sum()) != height * width:
        return f"RLE counts cover {int(runs.sum())} pixels, not height x width = {height * width}"
    return None


def rle_areas(rles: list[dict]) -> np.ndarray:
    """Pixel count of each RLE. pycocotools' `area` on a list of more than 255 RLEs overflows a
    uint8 inside its C code (2.0.11: "Python integer 300 out of bounds for uint8"), so call it on
    chunks; cell images easily hold more instances than that."""
    from pycocotools import mask as mask_utils

    chunk = 128
    parts = [np.asarray(mask_utils.area(rles[i:i + chunk]), dtype=np.int64).reshape(-1)
             for i in range(0, len(rles), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)

def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """HxW bool mask of a COCO annotation: polygons, compressed RLE or uncompressed RLE."""
    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons: list of [x1, y1, x2, y2, ...]
        if not seg:
            return np.zeros((height, width), bool)
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in seg], height, width)
        return _decode(mask_utils.merge(rles))
    return decode_rle(seg)


@dataclass(frozen=True, eq=False)
class CocoImage:
    """One image's instances, to be written as COCO GT."""

    image_id: int
    file_name: str
    height: int
    width: int
    masks: Sequence[np.ndarray]  # N HxW bool masks: an (N, H, W) array or a lazy sequence
    labels: np.ndarray  # (N,) int, category ids


def build_coco_gt(images: Iterable[CocoImage], class_names: tuple[str, ...]) -> dict:
    """COCO GT dict: category k (1-based) named class_names[k-1]; annotation ids 1..M; bbox
    [x, y, w, h] with w = max_x + 1 - min_x (a 1-pixel instance has w = h = 1)."""
    gt: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)],
    }
    next_ann_id = 1
    for img in images:
        gt["images"].append(
            {"id": int(img.image_id), "file_name": img.file_name, "height": int(img.height), "width": int(img.width)}
        )
        for mask, label in zip(img.masks, img.labels):
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                continue  # an empty mask is no instance
            x0, y0 = int(cols[0]), int(rows[0])
            gt["annotations"].append(
                {
                    "id": next_ann_id,
                    "image_id": int(img.image_id),
                    "category_id": int(label),
                    "segmentation": encode_mask(mask),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0],
                    "iscrowd": 0,
                }
            )
            next_ann_id += 1
    return gt


class _PixelMasks:
    """Masks made one at a time from flat pixel indices (no (N, H, W) array in memory)."""

    def __init__(self, pixels: list[np.ndarray], height: int, width: int) -> None:
        self.pixels, self.height, self.width = pixels, height, width

    def __len__(self) -> int:
        return len(self.pixels)

    def __iter__(self):
        for flat in self.pixels:
            mask = np.zeros(self.height * self.width, bool)
            mask[flat] = True
            yield mask.reshape(self.height, self.width)


def hw3_to_coco(root: str | os.PathLike) -> dict:
    """COCO GT of an HW3 training root; image ids 1..N in sorted sample order, file_name
    "<sample_id>/image.tif", categories id k name "class{k}"."""
    class_names = class_names_of(root)

    def images() -> Iterable[CocoImage]:
        for image_id, sample_dir in enumerate(list_sample_dirs(root), start=1):
            image, labels, pixels = read_instance_pixels(sample_dir, class_names)
            h, w = image.shape[:2]
            masks = _PixelMasks(pixels, h, w)
            yield CocoImage(image_id, f"{sample_dir.name}/image.tif", h, w, masks, labels)

    return build_coco_gt(images(), class_names)


# ---- loading with validation ---------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_segmentation(where: str, seg: object, h: int, w: int) -> None:
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(map(_is_number, poly)):
                raise DataError(f"{where}: polygon must be a list of >= 3 x,y number pairs")
        return
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise DataError(f"{where}: segmentation must be polygons or an RLE dict with size and counts")
    size = seg["size"]
    if not isinstance(size, list) or len(size) != 2 or [size[0], size[1]] != [h, w]:
        raise DataError(f"{where}: RLE size {size} differs from image size [{h}, {w}]")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise DataError(f"{where}: uncompressed RLE counts must be non-negative ints summing to h*w")
    elif not isinstance(counts, str):
        raise DataError(f"{where}: RLE counts must be a string or a list of ints")
    else:
        problem = rle_counts_problem(counts, h, w)
        if problem:
            raise DataError(f"{where}: {problem}")


def validate_coco_gt(gt: object, source: str) -> dict:
    """Check the structure of a COCO GT dict; fill a missing area / bbox from the mask and a
    missing iscrowd with 0 (so every evaluator sees the same fields). Returns gt."""
    if not isinstance(gt, dict):
        raise DataError(f"{source}: COCO GT must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DataError(f"{source}: COCO GT lacks a '{key}' list")
    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(gt["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise DataError(f"{source}: images[{i}] needs an integer id and a file_name string")
        if not (_is_int(img.get("height")) and _is_int(img.get("width")) and img["height"] > 0 and img["width"] > 0):
            raise DataError(f"{source}: images[{i}] (id {img['id']}) needs positive integer height and width")
        if img["id"] in sizes:
            raise DataError(f"{source}: duplicate image id {img['id']}")
        sizes[img["id"]] = (img["height"], img["width"])
    category_ids: set[int] = set()
    for i, cat in enumerate(gt["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{source}: categories[{i}] needs an integer id and a name string")
        if cat["id"] in category_ids:
            raise DataError(f"{source}: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])
    ann_ids: set[int] = set()
    for i, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where} is not an object")
        if not _is_int(ann.get("id")) or ann["id"] in ann_ids:
            raise DataError(f"{where} needs a unique integer id")
        ann_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in sizes:
            raise DataError(f"{where} refers to unknown image_id {ann.get('image_id')!r}")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            raise DataError(f"{where} refers to unknown category_id {ann.get('category_id')!r}")
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), (bool, float)):
            raise DataError(f"{where}: iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
        if "segmentation" not in ann:
            raise DataError(f"{where} has no segmentation")
        h, w = sizes[ann["image_id"]]
        _check_segmentation(where, ann["segmentation"], h, w)
        if "bbox" in ann and not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4 and all(map(_is_number, ann["bbox"]))):
            raise DataError(f"{where}: bbox must be 4 numbers [x, y, w, h]")
        if "area" in ann and not _is_number(ann["area"]):
            raise DataError(f"{where}: area must be a number")
        if "area" not in ann or "bbox" not in ann:
            with foreign_errors(where, "segmentation"):
                rle = mask_utils.encode(np.asfortranarray(annotation_mask(ann, h, w), dtype=np.uint8))
                ann.setdefault("area", int(mask_utils.area(rle)))
                ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        ann.setdefault("iscrowd", 0)
    return gt


def load_coco_gt(path: str | os.PathLike) -> dict:
    """Read and validate a COCO GT JSON file (see validate_coco_gt)."""
    return validate_coco_gt(read_json(path, "COCO GT file"), str(path))


def write_coco_gt(gt: dict, out: str | os.PathLike, force: bool = False) -> Path:
    """Write GT JSON atomically; refuses an existing file unless force (OutputExistsError)."""
    return atomic_write_json(out, gt, force=force)


def coco_dataset_images(gt: dict, image_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(image_id, image_dir / file_name)] in GT order; every file must exist."""
    image_dir = Path(image_dir)
    out = []
    for img in gt["images"]:
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise DataError(f"{path}: image of COCO image id {img['id']} not found")
        out.append((int(img["id"]), path))
    return out
