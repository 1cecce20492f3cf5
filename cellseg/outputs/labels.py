"""Label images: an instance image (uint32, 0 = background, k = the image's k-th result in
output order) and a class image (uint16, the category id), each a tiled pyramidal OME-TIFF.

The instances' RLEs are kept (the results themselves); at close the images are written tile by
tile (tifffile takes an iterator of tiles), each tile painted from the masks that meet it,
decoded box-locally: never a full-size array. Where masks overlap, the higher score wins.
Pyramid levels halve the size (nearest pixel) until the image fits in one tile."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cellseg.fileio import atomic_write, check_writable
from cellseg.outputs.masks import rle_crop, subsample

LABEL_TILE = 512
_BUCKET = 256  # px: the spatial index's cell side (full resolution)


class LabelImageWriter:
    def __init__(self, instances_path: Path, classes_path: Path, height: int, width: int,
                 force: bool = False) -> None:
        self.paths = (check_writable(instances_path, force), check_writable(classes_path, force))
        self.height, self.width = height, width
        self._masks: list[tuple[dict, int, float]] = []  # (rle, category id, score)
        self.count = 0

    def add(self, entries: Iterable[dict]) -> None:
        for e in entries:
            self._masks.append((e["segmentation"], int(e["category_id"]), float(e["score"])))
            self.count += 1

    def close(self) -> tuple[Path, Path]:
        painter = _Painter(self._masks, self.height, self.width)
        for path, kind in zip(self.paths, ("instances", "classes")):
            atomic_write(path, lambda p, k=kind: _write_pyramid(p, painter, k))
        return self.paths

    def abort(self) -> None:
        self._masks.clear()


def pyramid_steps(height: int, width: int, tile: int | None = None) -> list[int]:
    tile = tile or LABEL_TILE
    steps = [1]
    while max(math.ceil(height / steps[-1]), math.ceil(width / steps[-1])) > tile:
        steps.append(steps[-1] * 2)
    return steps


def _write_pyramid(path: Path, painter: "_Painter", kind: str) -> None:
    import tifffile

    dtype = np.uint32 if kind == "instances" else np.uint16
    steps = pyramid_steps(painter.height, painter.width)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level, step in enumerate(steps):
            shape = (math.ceil(painter.height / step), math.ceil(painter.width / step))
            options = {"subifds": len(steps) - 1, "metadata": {"axes": "YX", "Name": kind}} if level == 0 else {"subfiletype": 1}
            tif.write(painter.tiles(step, kind, dtype), shape=shape, dtype=dtype,
                      tile=(LABEL_TILE, LABEL_TILE), compression="zlib", **options)


class _Painter:
    """Paints label tiles from box-local masks found through a grid index of their boxes."""

    def __init__(self, masks: list[tuple[dict, int, float]], height: int, width: int) -> None:
        self.height, self.width = height, width
        order = sorted(range(len(masks)), key=lambda i: masks[i][2])  # low score first: high wins
        self._masks = masks
        self._order_rank = {i: r for r, i in enumerate(order)}
        self._boxes: dict[int, tuple[int, int, int, int]] = {}
        self._grid: dict[tuple[int, int], list[int]] = {}
        from pycocotools import mask as mask_util

        for i, (rle, _, _) in enumerate(masks):
            counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
            x, y, w, h = (int(v) for v in mask_util.toBbox({"size": rle["size"], "counts": counts}))
            if w == 0 or h == 0:
                continue
            self._boxes[i] = (y, x, y + h, x + w)
            for by in range(y // _BUCKET, (y + h - 1) // _BUCKET + 1):
                for bx in range(x // _BUCKET, (x + w - 1) // _BUCKET + 1):
                    self._grid.setdefault((by, bx), []).append(i)

    def tiles(self, step: int, kind: str, dtype) -> Iterator[np.ndarray]:
        rows, cols = math.ceil(self.height / step), math.ceil(self.width / step)
        for ty in range(0, rows, LABEL_TILE):
            for tx in range(0, cols, LABEL_TILE):
                yield self._tile(ty, tx, step, kind, dtype)

    def _tile(self, ty: int, tx: int, step: int, kind: str, dtype) -> np.ndarray:
        out = np.zeros((LABEL_TILE, LABEL_TILE), dtype)
        fy0, fx0 = ty * step, tx * step
        fy1, fx1 = fy0 + LABEL_TILE * step, fx0 + LABEL_TILE * step
        found: set[int] = set()
        for by in range(fy0 // _BUCKET, (fy1 - 1) // _BUCKET + 1):
            for bx in range(fx0 // _BUCKET, (fx1 - 1) // _BUCKET + 1):
                found.update(self._grid.get((by, bx), ()))
        for i in sorted(found, key=self._order_rank.__getitem__):
            y0, x0, y1, x1 = self._boxes[i]
            if y1 <= fy0 or y0 >= fy1 or x1 <= fx0 or x0 >= fx1:
                continue
            value = i + 1 if kind == "instances" else self._masks[i][1]
            self._paint(out, i, ty, tx, step, value)
        return out

    def _paint(self, out: np.ndarray, i: int, ty: int, tx: int, step: int, value: int) -> None:
        crop, y0, x0 = rle_crop(self._masks[i][0])
        crop, ly0, lx0 = subsample(crop, y0, x0, step)
        ry0, rx0 = max(ly0, ty), max(lx0, tx)
        ry1, rx1 = min(ly0 + crop.shape[0], ty + LABEL_TILE), min(lx0 + crop.shape[1], tx + LABEL_TILE)
        if ry1 <= ry0 or rx1 <= rx0:
            return
        part = crop[ry0 - ly0:ry1 - ly0, rx0 - lx0:rx1 - lx0]
        out[ry0 - ty:ry1 - ty, rx0 - tx:rx1 - tx][part] = value
