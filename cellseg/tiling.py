"""Images of any size: overlapping tiles through one Predictor, merged without seams.

Plan. Along each axis, tiles of side `tile` start every `tile - overlap` px; the last one is
shifted back to end at the image edge (so its overlap with the one before may be wider). The
*cut* between two neighbouring tiles is the middle of their overlap; the cuts split the image
into disjoint *cores*, one per tile (a tile's core reaches the image edge where the tile does).

Ownership rule (every cell once and whole):
  1. A detection belongs to the tile whose core holds its box centre; every other tile's copy is
     dropped. The cores partition the image, so each object has exactly one owner.
  2. When the overlap is at least the object's size (+ EDGE_MARGIN on each side), the owner sees
     the object whole: from the centre to the owner's inner edges is at least overlap / 2.
     A detection owned by a tile but touching that tile's inner edge is therefore an object
     larger than the overlap, cut by the tile: it is kept (nothing is silently lost), counted
     and reported, with the overlap that would hold it.
  3. The same cell detected by two tiles with slightly different boxes can have its two centres
     on either side of a cut. Detections lying wholly inside a neighbouring tile are held back
     until that neighbour is done; two of the same class whose masks overlap with IoU >
     DUPLICATE_IOU are one cell, and the higher score is kept.
Masks are pasted box-locally into the full image frame by cellseg.postprocess (no full-size
canvas), so the results carry full-image coordinates and RLE sizes."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from cellseg.config import ModelSpec
from cellseg.errors import InputError

EDGE_MARGIN = 2  # px: a box this close to a tile's inner edge is taken as cut by it
DUPLICATE_IOU = 0.5
# On 3072^2 mosaics of real nuclei (consep), 2048 px tiles kept 0.993x the AP of the untiled
# 1024^2 mosaics where 1024 px tiles kept 0.967x: fewer tiles split the per-image detection
# budget less. Peak memory stays that of one 2048^2 tile, whatever the image size.
DEFAULT_TILE = 2048
MIN_TILE = 512


@dataclass(frozen=True)
class Tile:
    index: int
    row: int
    col: int
    y: int
    x: int
    h: int
    w: int
    core: tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


@dataclass(frozen=True)
class TilePlan:
    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.ys)

    @property
    def cols(self) -> int:
        return len(self.xs)

    def __len__(self) -> int:
        return self.rows * self.cols

    def tiles(self) -> list[Tile]:
        cy, cx = _cuts(self.ys, self.tile, self.height), _cuts(self.xs, self.tile, self.width)
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        return [Tile(r * self.cols + c, r, c, y, x, th, tw, (cy[r], cy[r + 1], cx[c], cx[c + 1]))
                for r, y in enumerate(self.ys) for c, x in enumerate(self.xs)]


def _origins(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return tuple(min(i * stride, length - tile) for i in range(n))


def _cuts(origins: Sequence[int], tile: int, length: int) -> list[int]:
    """Core boundaries: 0, the middle of each overlap, length."""
    middles = [(origins[i + 1] + origins[i] + tile) // 2 for i in range(len(origins) - 1)]
    return [0, *middles, length]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    if overlap < 0:
        raise InputError(f"--overlap {overlap}: must be >= 0")
    if tile <= overlap:
        raise InputError(f"--tile {tile} must be larger than --overlap {overlap}")
    return TilePlan(height, width, tile, overlap, _origins(height, tile, overlap), _origins(width, tile, overlap))


def default_overlap(spec: ModelSpec) -> int:
    """At least the largest training object plus the edge margins, rounded up to the model's
    size_divisible; without a recorded object size, the largest anchor (anchors are sized from
    the training objects)."""
    largest = spec.max_object_px if spec.max_object_px > 0 else max(spec.anchor_sizes)
    step = max(1, spec.size_divisible)
    return int(math.ceil((largest + 2 * EDGE_MARGIN) / step) * step)


def tile_settings(spec: ModelSpec, tile: int | None, overlap: int | None) -> tuple[int, int]:
    """(tile, overlap): the given values, else defaults from the checkpoint's spec."""
    ov = default_overlap(spec) if overlap is None else int(overlap)
    size = max(DEFAULT_TILE, 4 * ov) if tile is None else int(tile)
    if tile is None and overlap is not None and size <= ov:
        size = max(MIN_TILE, 4 * ov)
    return size, ov


# ---------------------------------------------------------------------------------- ownership
def owned_by(boxes: np.ndarray, tile: Tile, plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
    """(owned, cut): boxes (N,4 xyxy, full-image px) whose centre lies in the tile's core, and
    which of those touch one of the tile's inner edges (objects larger than the overlap)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    y0, y1, x0, x1 = tile.core
    owned = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    touch = np.zeros(len(boxes), bool)
    if tile.x > 0:
        touch |= boxes[:, 0] <= tile.x + EDGE_MARGIN
    if tile.x + tile.w < plan.width:
        touch |= boxes[:, 2] >= tile.x + tile.w - EDGE_MARGIN
    if tile.y > 0:
        touch |= boxes[:, 1] <= tile.y + EDGE_MARGIN
    if tile.y + tile.h < plan.height:
        touch |= boxes[:, 3] >= tile.y + tile.h - EDGE_MARGIN
    return owned, owned & touch


@dataclass
class TileResult:
    tile: Tile
    entries: list[dict]
    cut: int = 0  # owned detections cut by an inner tile edge (larger than the overlap)
    largest_cut: float = 0.0  # the largest such detection's box side
    skipped: bool = False  # judged to hold no tissue: not run


def predict_tile(predictor, source, tile: Tile, plan: TilePlan, image_id: int,
                 score_thresh: float | None) -> TileResult:
    """One tile through the predictor; its owned detections as full-image COCO entries."""
    image = source.read(tile.y, tile.x, tile.h, tile.w)
    det = predictor.predict(image, score_thresh)  # the floor: no mask head for what is dropped
    offset = torch.tensor([tile.x, tile.y, tile.x, tile.y], dtype=det.boxes.dtype)
    det = replace(det, boxes=det.boxes + offset)
    boxes = det.boxes
    keep, cut = owned_by(boxes.numpy(), tile, plan)
    if score_thresh is not None:
        keep &= det.scores.numpy() >= score_thresh
        cut &= keep
    entries = predictor.to_coco(det, image_id, (plan.height, plan.width), torch.from_numpy(keep), score_thresh)
    sides = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values.numpy()[cut] if cut.any() else np.zeros(0)
    return TileResult(tile, entries, int(cut.sum()), float(sides.max(initial=0.0)))


# ---------------------------------------------------------------------------- seam duplicates
class SeamMerger:
    """Streams owned entries out tile by tile (raster order), holding back only those that a
    neighbouring tile may also have seen whole, until that neighbour is done (rule 3 above)."""

    def __init__(self, plan: TilePlan, iou_thresh: float = DUPLICATE_IOU) -> None:
        self.plan, self.iou_thresh = plan, iou_thresh
        self._tiles = plan.tiles()
        self._pending: dict[int, list[dict]] = {}
        self._done = 0
        self.duplicates = 0

    def add(self, result: TileResult) -> list[dict]:
        """Take one tile's entries (tiles in index order); return the entries now final."""
        tile = result.tile
        if tile.index != self._done:
            raise ValueError(f"tile {tile.index} added out of order (expected {self._done})")
        neighbours = self._neighbours(tile)
        ready, held = [], []
        for entry in result.entries:
            inside = [n for n in neighbours if _box_inside(entry["bbox"], n)]
            if not inside:
                ready.append(entry)
            elif self._survives(entry, inside):
                held.append(entry)
        self._pending[tile.index] = held
        self._done += 1
        return ready + self._release()

    def finish(self) -> list[dict]:
        out = [e for index in sorted(self._pending) for e in self._pending[index]]
        self._pending.clear()
        return out

    def _neighbours(self, tile: Tile) -> list[Tile]:
        rows = range(max(0, tile.row - 1), min(self.plan.rows, tile.row + 2))
        cols = range(max(0, tile.col - 1), min(self.plan.cols, tile.col + 2))
        return [self._tiles[r * self.plan.cols + c] for r in rows for c in cols
                if (r, c) != (tile.row, tile.col)]

    def _survives(self, entry: dict, inside: list[Tile]) -> bool:
        """Compare with the held entries of the already done tiles it lies in; drop the loser."""
        from pycocotools import mask as mask_util

        for other in inside:
            held = self._pending.get(other.index, [])
            rivals = [e for e in held if e["category_id"] == entry["category_id"]
                      and _boxes_meet(e["bbox"], entry["bbox"])]
            if not rivals:
                continue
            ious = mask_util.iou([_rle(entry)], [_rle(e) for e in rivals], [0] * len(rivals))[0]
            for rival, iou in zip(rivals, np.atleast_1d(ious)):
                if iou <= self.iou_thresh:
                    continue
                self.duplicates += 1
                if rival["score"] >= entry["score"]:
                    return False
                held.remove(rival)
        return True

    def _release(self) -> list[dict]:
        out = []
        for index in sorted(self._pending):
            tile = self._tiles[index]
            last = min(tile.row + 1, self.plan.rows - 1) * self.plan.cols + min(tile.col + 1, self.plan.cols - 1)
            if last < self._done:
                out.extend(self._pending.pop(index))
        return out


def _box_inside(bbox: Sequence[float], tile: Tile) -> bool:
    x, y, w, h = bbox
    return (x >= tile.x + EDGE_MARGIN and x + w <= tile.x + tile.w - EDGE_MARGIN
            and y >= tile.y + EDGE_MARGIN and y + h <= tile.y + tile.h - EDGE_MARGIN)


def _boxes_meet(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _rle(entry: dict) -> dict:
    seg = entry["segmentation"]
    counts = seg["counts"]
    return {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


# --------------------------------------------------------------------------------- background
def tissue_tiles(thumb: np.ndarray, step: int, tiles: Sequence[Tile]) -> list[bool]:
    """Per tile: may it hold cells? Judged on the thumbnail (every `step`-th full-res pixel).
    Otsu's threshold splits the gray thumbnail; the class holding most of the thumbnail's border
    is background, so bright (brightfield) and dark (fluorescence) backgrounds both work. A tile
    is empty only when no foreground pixel (grown by 2 thumbnail px) falls in it. Without a
    clear two-class split (a uniform or evenly busy image), every tile is kept."""
    gray = thumb.mean(axis=2) if thumb.ndim == 3 else thumb
    threshold, separation = _otsu(gray)
    if separation < 0.05:
        return [True] * len(tiles)
    above = gray > threshold
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    foreground = ~above if border.mean() >= 0.5 else above
    grown = _grow(foreground, 2)
    keep = []
    for t in tiles:
        y0, x0 = t.y // step, t.x // step
        y1, x1 = math.ceil((t.y + t.h) / step), math.ceil((t.x + t.w) / step)
        keep.append(bool(grown[y0:y1 + 1, x0:x1 + 1].any()))
    return keep


def _otsu(gray: np.ndarray) -> tuple[float, float]:
    """Otsu's threshold on [0, 1] values, and the gap between the two class means."""
    hist, edges = np.histogram(gray, bins=256, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    k = int(np.argmax(between))
    if w0[k] <= 0 or w1[k] <= 0:
        return float(centres[k]), 0.0
    mean0, mean1 = m0[k] / w0[k], (total - m0[k]) / w1[k]
    return float(edges[k + 1]), float(abs(mean1 - mean0))


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def iter_tile_results(predictor, source, plan: TilePlan, image_id: int, score_thresh: float | None,
                      todo: Sequence[Tile], keep: Sequence[bool]) -> Iterator[TileResult]:
    for tile in todo:
        if keep[tile.index]:
            yield predict_tile(predictor, source, tile, plan, image_id, score_thresh)
        else:
            yield TileResult(tile, [], skipped=True)
