"""COCO RLE -> the mask's pixels in its own bounding box, without decoding the full frame
(pycocotools' decode allocates H x W per mask, which a whole slide cannot afford)."""
from __future__ import annotations

import math

import numpy as np


def rle_counts(counts: str | bytes) -> np.ndarray:
    """COCO's compressed counts string -> uncompressed run lengths (pycocotools' rleFrString)."""
    text = counts.encode("ascii") if isinstance(counts, str) else counts
    values: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = text[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(values) > 2:
            x += values[-2]
        values.append(x)
    return np.asarray(values, dtype=np.int64)


def rle_crop(rle: dict) -> tuple[np.ndarray, int, int]:
    """(mask cropped to its foreground's bounding box as bool h x w, y0, x0). An empty mask
    gives a 0 x 0 crop at (0, 0)."""
    im_h = int(rle["size"][0])
    counts = rle_counts(rle["counts"]) if isinstance(rle["counts"], (str, bytes)) else np.asarray(rle["counts"], np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    starts, ends = starts[1::2], ends[1::2]
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    if starts.size == 0:
        return np.zeros((0, 0), bool), 0, 0
    x0, x1 = int(starts[0] // im_h), int((ends[-1] - 1) // im_h) + 1
    spans_columns = (starts // im_h) != ((ends - 1) // im_h)
    if spans_columns.any():
        y0, y1 = 0, im_h
    else:
        y0, y1 = int((starts % im_h).min()), int(((ends - 1) % im_h).max()) + 1
    crop = np.zeros((x1 - x0, y1 - y0), bool)  # column-major: one row per image column
    flat = crop.reshape(-1)
    for s, e in zip(starts.tolist(), ends.tolist()):
        while s < e:
            col, row = divmod(s, im_h)
            stop = min(e, (col + 1) * im_h)
            base = (col - x0) * (y1 - y0) - y0
            flat[base + row:base + row + (stop - s)] = True
            s = stop
    return crop.T, y0, x0


def subsample(crop: np.ndarray, y0: int, x0: int, step: int) -> tuple[np.ndarray, int, int]:
    """The crop's pixels at full-res positions that are multiples of `step`, in level px."""
    if step == 1:
        return crop, y0, x0
    ry, rx = (-y0) % step, (-x0) % step
    return crop[ry::step, rx::step], math.ceil(y0 / step), math.ceil(x0 / step)
