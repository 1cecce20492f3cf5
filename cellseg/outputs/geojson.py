"""QuPath GeoJSON: a FeatureCollection of detections, one Polygon per cell, written as they come.

Each polygon traces the pixel edges of the cell's mask (decoded box-locally from its RLE) in
full-resolution pixel coordinates, so rasterised back (pixel centres inside) it gives the mask
again. A mask in several pieces keeps its largest piece (QuPath wants one Polygon per cell);
holes are kept. Rings are closed, exteriors counter-clockwise, and every polygon is valid
(shapely). A detection whose mask is empty has no outline and is counted in `empty`.
Needs shapely (extra `geojson`), imported only here."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cellseg.errors import InputError
from cellseg.outputs import class_colour
from cellseg.outputs.masks import rle_crop
from cellseg.outputs.stream import AtomicTextStream


def _shapely():
    try:
        import shapely
        from shapely.geometry import polygon
    except ImportError:
        raise InputError("--format geojson needs shapely: pip install 'cellseg[geojson]'") from None
    return shapely, polygon


def mask_polygon(crop: np.ndarray, y0: int, x0: int):
    """The pixel-edge outline of a box-local mask as one valid shapely Polygon (largest piece),
    or None when the mask is empty."""
    shapely, polygon = _shapely()
    boxes = []
    for r in range(crop.shape[0]):
        row = np.concatenate([[False], crop[r], [False]])
        edges = np.flatnonzero(row[1:] != row[:-1])
        boxes.extend(shapely.box(x0 + a, y0 + r, x0 + b, y0 + r + 1) for a, b in zip(edges[0::2], edges[1::2]))
    if not boxes:
        return None
    shape = shapely.make_valid(shapely.union_all(boxes)).simplify(0)
    pieces = [g for g in getattr(shape, "geoms", [shape]) if g.geom_type == "Polygon" and not g.is_empty]
    if not pieces:
        return None
    return polygon.orient(max(pieces, key=lambda g: g.area), sign=1.0)


class GeoJsonWriter:
    def __init__(self, path: Path, class_names: Sequence[str], category_ids: Sequence[int],
                 force: bool = False) -> None:
        _shapely()
        self._classes = {cid: (name, list(class_colour(i))) for i, (name, cid) in
                         enumerate(zip(class_names, category_ids))}
        self._out = AtomicTextStream(path, force)
        self._out.write('{"type": "FeatureCollection", "features": [')
        self.count = 0
        self.empty = 0

    @property
    def path(self) -> Path:
        return self._out.path

    def add(self, entries: Iterable[dict]) -> None:
        for entry in entries:
            feature = self._feature(entry)
            if feature is None:
                self.empty += 1
                continue
            self._out.write(("\n" if self.count == 0 else ",\n") + json.dumps(feature))
            self.count += 1

    def _feature(self, entry: dict) -> dict | None:
        crop, y0, x0 = rle_crop(entry["segmentation"])
        poly = mask_polygon(crop, y0, x0) if crop.size else None
        if poly is None:
            return None
        rings = [list(poly.exterior.coords), *(list(r.coords) for r in poly.interiors)]
        name, colour = self._classes.get(entry["category_id"], (str(entry["category_id"]), [128, 128, 128]))
        return {"type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in ring] for ring in rings]},
                "properties": {"objectType": "detection",
                               "classification": {"name": name, "color": colour},
                               "measurements": {"score": float(entry["score"])}}}

    def close(self) -> Path:
        self._out.write("\n]}\n")
        return self._out.commit()

    def abort(self) -> None:
        self._out.abort()
