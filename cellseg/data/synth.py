"""Synthetic data sets in the HW3 layout, with the awkward traits of the real files.

out/train/<id>/image.tif + class<k>.tif, out/test_release/<name>.tif,
out/test_image_name_to_ids.json, out/test_annotations.json (COCO GT of the test images) and
out/synth.json (parameters + which sample carries which trait, for tests and humans).

Four classes that differ visibly (shape, size, colour, texture):
  class1 small round dark nuclei      class2 large pale elongated ellipses
  class3 medium speckled blobs        class4 thin pointed spindles
Cells touch and overlap (a later-drawn cell owns the overlapping pixels; a cell left with no
pixel is dropped). Traits, by training sample index (i.e. generation order):
  0: RGBA LZW image.tif, float64 masks with sparse ids (not starting at 1, with gaps, continuing
     across classes as in the real sample), one instance made of two pieces, one 1-pixel instance
  1: 16-bit grayscale image.tif (12-bit values)      last (when n_train >= 3): empty, no class files
  even samples: float64 sparse-id masks;  odd samples: uint16 consecutive-id masks.
Test images have varied sizes: size x size, a non-square one, a ~40 px one, then random sizes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from cellseg.data.coco import CocoImage, build_coco_gt
from cellseg.errors import InputError, OutputExistsError
from cellseg.fileio import ensure_writable_folder, make_temp_dir

GENERATOR = "cellseg-synth-v1"
CLASS_NAMES = ("class1", "class2", "class3", "class4")
MANIFEST = "synth.json"
# cells per 256 x 256 pixels (cells keep their pixel size; counts scale with the area)
DENSITY = {False: 30, True: 80}
_OUR_ENTRIES = ("train", "test_release", "test_image_name_to_ids.json", "test_annotations.json", MANIFEST)


@dataclass(frozen=True)
class _CellClass:
    colour: tuple[float, float, float]
    long_axis: tuple[float, float]
    short_axis: tuple[float, float]  # as a fraction of the long axis for round shapes: see _shape
    wobble: float  # radial perturbation amplitude
    spindle: bool = False
    speckle: float = 0.0


_CLASSES = {
    1: _CellClass((0.28, 0.12, 0.40), (3.0, 5.0), (0.85, 1.0), 0.05),
    2: _CellClass((0.90, 0.62, 0.74), (10.0, 15.0), (0.40, 0.55), 0.04),
    3: _CellClass((0.42, 0.44, 0.80), (6.0, 9.0), (0.75, 1.0), 0.18, speckle=0.3),
    4: _CellClass((0.55, 0.34, 0.10), (10.0, 18.0), (0.08, 0.14), 0.0, spindle=True),
}


@dataclass
class _Drawing:
    label_map: np.ndarray  # (H, W) int32, 0 = background, 1..M = drawn cell index
    classes: list[int]  # class of cell index i + 1


def _shape(rng: np.random.Generator, cls: _CellClass) -> tuple[np.ndarray, int]:
    """A cell as a small bool mask centred on its centre pixel, plus its radius."""
    a = rng.uniform(*cls.long_axis)
    b = a * rng.uniform(*cls.short_axis)
    r = int(math.ceil(a * (1 + cls.wobble))) + 1
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if cls.spindle:  # width tapers to points at both ends
        return (np.abs(u) <= a) & (np.abs(v) <= max(b, 0.6) * (1 - (u / a) ** 2) + 0.5), r
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    theta = np.arctan2(v / b, u / a)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += cls.wobble / 2 * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return radius <= boundary, r


def _paint(label_map: np.ndarray, mask: np.ndarray, cy: int, cx: int, r: int, index: int) -> None:
    h, w = label_map.shape
    y0, x0 = max(cy - r, 0), max(cx - r, 0)
    y1, x1 = min(cy + r + 1, h), min(cx + r + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    local = mask[y0 - (cy - r) : y1 - (cy - r), x0 - (cx - r) : x1 - (cx - r)]
    label_map[y0:y1, x0:x1][local] = index


def _draw_cells(rng: np.random.Generator, h: int, w: int, n_cells: int, crowded: bool) -> _Drawing:
    label_map = np.zeros((h, w), np.int32)
    weights = rng.dirichlet(np.full(4, 0.8))
    classes: list[int] = []
    centres: list[tuple[float, float, int]] = []
    touch_p = 0.6 if crowded else 0.35
    for _ in range(n_cells):
        k = int(rng.choice(4, p=weights)) + 1
        mask, r = _shape(rng, _CLASSES[k])
        if centres and rng.random() < touch_p:  # next to an earlier cell: touching / overlapping
            py, px, pr = centres[int(rng.integers(len(centres)))]
            dist = (pr + r) * rng.uniform(0.45, 0.9)
            phi = rng.uniform(0, 2 * math.pi)
            cy, cx = int(round(py + dist * math.sin(phi))), int(round(px + dist * math.cos(phi)))
        else:
            cy, cx = int(rng.integers(-2, h + 2)), int(rng.integers(-2, w + 2))
        classes.append(k)
        centres.append((cy, cx, r))
        _paint(label_map, mask, cy, cx, r, len(classes))
    return _compact(label_map, classes)


def _compact(label_map: np.ndarray, classes: list[int]) -> _Drawing:
    """Drop cells left with no pixel, renumber the rest 1..M in drawing order."""
    present = np.unique(label_map)
    present = present[present > 0]
    lut = np.zeros(len(classes) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return _Drawing(lut[label_map], [classes[i - 1] for i in present])


def _free_spot(rng: np.random.Generator, label_map: np.ndarray, margin: int) -> tuple[int, int] | None:
    h, w = label_map.shape
    for _ in range(200):
        y, x = int(rng.integers(margin, h - margin)), int(rng.integers(margin, w - margin))
        if not label_map[y - margin : y + margin + 1, x - margin : x + margin + 1].any():
            return y, x
    return None


def _add_special_instances(rng: np.random.Generator, drawing: _Drawing) -> dict[str, int]:
    """A second, separate piece for one cell and an isolated 1-pixel cell (drawn last, so both
    survive). Returns {"multi_piece": cell index, "one_pixel": cell index} for those placed."""
    placed: dict[str, int] = {}
    lm = drawing.label_map
    if drawing.classes:
        spot = _free_spot(rng, lm, 4)
        if spot is not None:
            index = len(drawing.classes)  # the last drawn cell
            yy, xx = np.mgrid[-2:3, -2:3]
            lm[spot[0] - 2 : spot[0] + 3, spot[1] - 2 : spot[1] + 3][yy**2 + xx**2 <= 4] = index
            placed["multi_piece"] = index
    spot = _free_spot(rng, lm, 2)
    if spot is not None:
        drawing.classes.append(1)
        lm[spot] = len(drawing.classes)
        placed["one_pixel"] = len(drawing.classes)
    return placed


def _render(rng: np.random.Generator, drawing: _Drawing) -> np.ndarray:
    """RGB uint8 image of the drawing: stained background, per-class colour and texture."""
    lm = drawing.label_map
    h, w = lm.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array([0.93, 0.82, 0.88]) + rng.normal(0, 0.02, 3)
    image = np.empty((h, w, 3), np.float32)
    image[:] = base
    for _ in range(3):  # smooth stain variation
        fy, fx = rng.uniform(-0.05, 0.05, 2)
        wave = 0.03 * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * math.pi))
        image += wave[:, :, None]
    if drawing.classes:
        classes = np.array([0, *drawing.classes])
        colours = np.zeros((len(classes), 3), np.float32)
        for i, k in enumerate(classes[1:], start=1):
            colours[i] = np.array(_CLASSES[k].colour) * rng.uniform(0.85, 1.1)
        inside = lm > 0
        image[inside] = colours[lm[inside]]
        speckle = np.array([0.0] + [_CLASSES[k].speckle for k in classes[1:]], np.float32)[lm]
        dots = rng.random((h, w)) < speckle
        image[dots] *= 0.55
        # darker rims so that touching cells stay distinguishable
        edge = np.zeros((h, w), bool)
        edge[1:, :] |= lm[1:, :] != lm[:-1, :]
        edge[:, 1:] |= lm[:, 1:] != lm[:, :-1]
        image[edge & inside] *= 0.8
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _cell_count(rng: np.random.Generator, h: int, w: int, crowded: bool) -> int:
    expected = DENSITY[crowded] * h * w / 256**2
    return max(1, int(round(expected * rng.uniform(0.8, 1.2))))


def _hex_name(rng: np.random.Generator) -> str:
    b = rng.bytes(16).hex()
    return f"{b[:8]}-{b[8:12]}-{b[12:16]}-{b[16:20]}-{b[20:]}"


def _class_label_images(
    rng: np.random.Generator, drawing: _Drawing, sparse: bool
) -> tuple[dict[int, np.ndarray], dict[int, tuple[int, int]]]:
    """{k: label image} for present classes, and {cell index: (k, id)}. Sparse ids start above 1,
    have gaps and continue across classes (like the real HW3 sample)."""
    next_id = int(rng.integers(2, 6)) if sparse else 1
    out: dict[int, np.ndarray] = {}
    ids: dict[int, tuple[int, int]] = {}
    classes = np.array([0, *drawing.classes])
    for k in range(1, 5):
        cells = np.flatnonzero(classes == k)
        if cells.size == 0:
            continue
        lut = np.zeros(len(classes), np.int64)
        for cell in cells:
            lut[cell] = next_id
            ids[int(cell)] = (k, next_id)
            next_id += int(rng.integers(1, 4)) if sparse else 1
        if not sparse:
            next_id = 1
        out[k] = lut[drawing.label_map]
    return out, ids


def _write_train_sample(rng: np.random.Generator, folder: Path, index: int, n_train: int, size: int, crowded: bool) -> dict:
    folder.mkdir(parents=True)
    empty = n_train >= 3 and index == n_train - 1
    n_cells = 0 if empty else _cell_count(rng, size, size, crowded)
    drawing = _draw_cells(rng, size, size, n_cells, crowded)
    special = _add_special_instances(rng, drawing) if index == 0 else {}
    rgb = _render(rng, drawing)
    traits: list[str] = []
    if index == 0:
        rgba = np.concatenate([rgb, np.full((size, size, 1), 255, np.uint8)], axis=2)
        tifffile.imwrite(folder / "image.tif", rgba, photometric="rgb", compression="lzw")
        traits.append("rgba_lzw")
    elif index == 1:
        luminance = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        gray = (luminance / 255 * 4095).round().astype(np.uint16)
        tifffile.imwrite(folder / "image.tif", gray, photometric="minisblack", compression="zlib")
        traits.append("gray16")
    else:
        tifffile.imwrite(folder / "image.tif", rgb, photometric="rgb", compression="zlib")
    if empty:
        traits.append("empty")
        return {"traits": traits, "instances": 0}
    sparse = index % 2 == 0
    labels, ids = _class_label_images(rng, drawing, sparse)
    for k, label_image in labels.items():
        if sparse:
            tifffile.imwrite(folder / f"class{k}.tif", label_image.astype(np.float64))
        else:
            tifffile.imwrite(folder / f"class{k}.tif", label_image.astype(np.uint16), compression="zlib")
    traits.append("float64_masks" if sparse else "uint16_masks")
    if sparse:
        traits.append("sparse_ids")
    info: dict = {"traits": traits, "instances": len(drawing.classes)}
    for name, cell in special.items():
        k, inst_id = ids[cell]
        info[name] = {"class": k, "id": inst_id}
        traits.append(name)
    return info


class _LabelMasks:
    """The masks of cells 1..n of a label map, made one at a time (a full (N, H, W) array of a
    crowded 1024 px image would need GBs)."""

    def __init__(self, label_map: np.ndarray, n: int) -> None:
        self.label_map, self.n = label_map, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(1, self.n + 1):
            yield self.label_map == i


def _test_sizes(rng: np.random.Generator, n_test: int, size: int) -> list[tuple[int, int]]:
    sizes = [(size, size), (max(32, size * 3 // 4), size + size // 3), (40, 44)]
    while len(sizes) < n_test:
        sizes.append((int(rng.integers(size // 2, size * 3 // 2)), int(rng.integers(size // 2, size * 3 // 2))))
    return sizes[:n_test]


def _check_args(n_train: int, n_test: int, size: int) -> None:
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise InputError(f"synthesize: need n_train >= 0, n_test >= 0 and at least one image (got {n_train}, {n_test})")
    if size < 32:
        raise InputError(f"synthesize: size must be >= 32 (got {size})")


def _generate(tmp: Path, n_train: int, n_test: int, seed: int, size: int, crowded: bool) -> None:
    rng = np.random.default_rng(seed)
    manifest: dict = {"generator": GENERATOR, "seed": seed, "n_train": n_train, "n_test": n_test,
                      "size": size, "crowded": crowded, "classes": list(CLASS_NAMES), "train": {}, "test": {}}
    (tmp / "train").mkdir()
    for i in range(n_train):
        sample_id = _hex_name(rng)
        manifest["train"][sample_id] = _write_train_sample(rng, tmp / "train" / sample_id, i, n_train, size, crowded)
    (tmp / "test_release").mkdir()
    id_map: list[dict] = []
    gt_images: list[CocoImage] = []
    for image_id, (h, w) in enumerate(_test_sizes(rng, n_test, size), start=1):
        name = f"{_hex_name(rng)}.tif"
        drawing = _draw_cells(rng, h, w, _cell_count(rng, h, w, crowded), crowded)
        tifffile.imwrite(tmp / "test_release" / name, _render(rng, drawing), photometric="rgb", compression="zlib")
        id_map.append({"file_name": name, "id": image_id, "height": h, "width": w})
        n = len(drawing.classes)
        masks = _LabelMasks(drawing.label_map, n)
        gt_images.append(CocoImage(image_id, name, h, w, masks, np.array(drawing.classes, np.int64)))
        manifest["test"][name] = {"id": image_id, "height": h, "width": w, "instances": n}
    (tmp / "test_image_name_to_ids.json").write_text(json.dumps(id_map, indent=1))
    (tmp / "test_annotations.json").write_text(json.dumps(build_coco_gt(gt_images, CLASS_NAMES)))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def synthesize(
    out: str | os.PathLike,
    n_train: int,
    n_test: int,
    seed: int,
    size: int = 256,
    crowded: bool = False,
    force: bool = False,
) -> Path:
    """Write a synthetic HW3-layout data set to `out` (deterministic for a given seed).

    Refuses a non-empty existing `out` unless force; with force only the entries this function
    writes (train/, test_release/, the JSON files) are replaced, nothing else in `out` is touched.
    The set is built in a temporary folder next to `out` and moved into place at the end.
    """
    _check_args(n_train, n_test, size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: folder exists and is not empty (pass --force to overwrite)")
    ensure_writable_folder(out.parent)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        _generate(tmp, n_train, n_test, seed, size, crowded)
        out.mkdir(exist_ok=True)
        for name in _OUR_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ large slides
SLIDE_IMAGE = "slide.tif"
SLIDE_GT = "slide_gt.json"
SLIDE_TILE = 512  # TIFF tile side; also the height of the bands the slide is rendered in
SLIDE_LEVEL_FACTOR = 4  # each pyramid level is 4x smaller, down to at most 1024 px a side


@dataclass(frozen=True)
class _SlideCell:
    cy: int
    cx: int
    r: int
    k: int  # class 1..4
    mask: np.ndarray  # (2r+1, 2r+1) bool, centred on (cy, cx)
    colour: np.ndarray


def _slide_cells(rng: np.random.Generator, side: int, crowded: bool) -> list[_SlideCell]:
    """Cells inside an elliptic tissue region covering ~60% of the slide (the rest is glass),
    some touching earlier ones as in _draw_cells."""
    n = _cell_count(rng, side, side, crowded) * 6 // 10
    weights = rng.dirichlet(np.full(4, 0.8))
    cells: list[_SlideCell] = []
    while len(cells) < n:
        k = int(rng.choice(4, p=weights)) + 1
        mask, r = _shape(rng, _CLASSES[k])
        if cells and rng.random() < (0.6 if crowded else 0.35):
            near = cells[int(rng.integers(len(cells)))]
            dist, phi = (near.r + r) * rng.uniform(0.45, 0.9), rng.uniform(0, 2 * math.pi)
            cy, cx = int(round(near.cy + dist * math.sin(phi))), int(round(near.cx + dist * math.cos(phi)))
        else:
            cy, cx = int(rng.integers(0, side)), int(rng.integers(0, side))
        if ((cy - side / 2) / (0.48 * side)) ** 2 + ((cx - side / 2) / (0.42 * side)) ** 2 > 1:
            continue
        colour = np.array(_CLASSES[k].colour, np.float32) * np.float32(rng.uniform(0.85, 1.1))
        cells.append(_SlideCell(cy, cx, r, k, mask, colour))
    return cells


def _band_labels(cells: list[_SlideCell], members: list[int], y0: int, h: int, w: int) -> np.ndarray:
    """Label map (cell index + 1) of rows y0..y0+h, later cells over earlier ones."""
    labels = np.zeros((h, w), np.int32)
    for i in members:
        c = cells[i]
        _paint(labels, c.mask, c.cy - y0, c.cx, c.r, i + 1)
    return labels


def _band_pixels(rng: np.random.Generator, cells: list[_SlideCell], labels: np.ndarray) -> np.ndarray:
    image = np.empty(labels.shape + (3,), np.float32)
    image[:] = np.array([0.93, 0.82, 0.88], np.float32)
    inside = labels > 0
    if inside.any():
        colours = np.array([np.zeros(3, np.float32)] + [c.colour for c in cells], np.float32)
        speckle = np.array([0.0] + [_CLASSES[c.k].speckle for c in cells], np.float32)
        image[inside] = colours[labels[inside]]
        image[(rng.random(labels.shape) < speckle[labels]) & inside] *= 0.55
        edge = np.zeros(labels.shape, bool)
        edge[1:, :] |= labels[1:, :] != labels[:-1, :]
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        image[edge & inside] *= 0.8
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class _SlideRender:
    """Renders the slide band by band, yielding TIFF tiles; keeps the small pyramid levels and
    every cell's final pixels (as box-local crops) for the GT."""

    def __init__(self, rng: np.random.Generator, side: int, cells: list[_SlideCell]) -> None:
        self.rng, self.side, self.cells = rng, side, cells
        self.steps = [SLIDE_LEVEL_FACTOR ** k for k in range(1, 8) if side / SLIDE_LEVEL_FACTOR ** (k - 1) > 1024]
        self.levels = [np.zeros((math.ceil(side / s), math.ceil(side / s), 3), np.uint8) for s in self.steps]
        self.crops: dict[int, np.ndarray] = {}
        self._by_band: dict[int, list[int]] = {}
        for i, c in enumerate(cells):
            for b in range(max(0, (c.cy - c.r) // SLIDE_TILE), min(side - 1, c.cy + c.r) // SLIDE_TILE + 1):
                self._by_band.setdefault(b, []).append(i)

    def tiles(self):
        t = SLIDE_TILE
        for b, y0 in enumerate(range(0, self.side, t)):
            h = min(t, self.side - y0)
            labels = _band_labels(self.cells, self._by_band.get(b, []), y0, h, self.side)
            pixels = _band_pixels(self.rng, self.cells, labels)
            self._keep_crops(labels, y0)
            for step, level in zip(self.steps, self.levels):
                oy = (-y0) % step
                level[(y0 + oy) // step:(y0 + oy) // step + len(range(oy, h, step))] = pixels[oy::step, ::step]
            for x0 in range(0, self.side, t):
                tile = np.zeros((t, t, 3), np.uint8)
                part = pixels[:, x0:x0 + t]
                tile[:part.shape[0], :part.shape[1]] = part
                yield tile

    def _keep_crops(self, labels: np.ndarray, y0: int) -> None:
        for i in np.unique(labels[labels > 0]) - 1:
            c = self.cells[i]
            crop = self.crops.setdefault(int(i), np.zeros_like(c.mask))
            ys = slice(max(0, c.cy - c.r - y0), min(labels.shape[0], c.cy + c.r + 1 - y0))
            xs = slice(max(0, c.cx - c.r), min(self.side, c.cx + c.r + 1))
            mine = labels[ys, xs] == i + 1
            crop[ys.start + y0 - (c.cy - c.r):ys.stop + y0 - (c.cy - c.r), xs.start - (c.cx - c.r):xs.stop - (c.cx - c.r)] |= mine


def crop_to_rle(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict:
    """A box-local bool mask at (y0, x0) -> COCO RLE of the full height x width frame, without
    allocating the frame. The crop must lie inside the frame."""
    from pycocotools import mask as mask_util

    h, w = crop.shape
    cols = np.zeros((w, h + 2), bool)
    cols[:, 1:-1] = crop.T
    flat = cols.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    rise, fall = edges[0::2], edges[1::2]
    col = rise // (h + 2)
    starts = (x0 + col) * height + y0 + (rise - col * (h + 2) - 1)
    ends = starts + (fall - rise)
    if starts.size:
        joined = ends[:-1] == starts[1:]
        starts, ends = starts[np.concatenate([[True], ~joined])], ends[np.concatenate([~joined, [True]])]
    bounds = np.stack([starts, ends], axis=1).reshape(-1)
    counts = np.diff(np.concatenate([[0], bounds, [height * width]])).astype(np.uint32)
    if counts.size > 1 and counts[-1] == 0:
        counts = counts[:-1]
    rle = mask_util.frPyObjects([{"size": [height, width], "counts": counts}], height, width)[0]
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _slide_gt(render: _SlideRender, side: int) -> dict:
    annotations = []
    for i in sorted(render.crops):
        c, crop = render.cells[i], render.crops[i]
        ys, xs = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
        if ys.size == 0:
            continue
        tight = crop[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
        y0, x0 = c.cy - c.r + int(ys[0]), c.cx - c.r + int(xs[0])
        annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": c.k,
                            "segmentation": crop_to_rle(tight, y0, x0, side, side), "area": int(tight.sum()),
                            "bbox": [x0, y0, tight.shape[1], tight.shape[0]], "iscrowd": 0})
    return {"images": [{"id": 1, "file_name": SLIDE_IMAGE, "height": side, "width": side}],
            "annotations": annotations,
            "categories": [{"id": k, "name": n} for k, n in enumerate(CLASS_NAMES, start=1)]}


def synthesize_slide(out: str | os.PathLike, side: int, seed: int = 0, crowded: bool = False,
                     force: bool = False) -> Path:
    """out/slide.tif: a side x side RGB uint8 tiled (512 px, zlib) pyramidal TIFF (levels 4x
    smaller as SubIFDs) of cells in an elliptic tissue region on glass, rendered in 512-row
    bands (never the whole image in memory); out/slide_gt.json: its COCO GT (image id 1)."""
    if side < 64:
        raise InputError(f"--slide {side}: must be at least 64")
    out = Path(out)
    image_path, gt_path = out / SLIDE_IMAGE, out / SLIDE_GT
    for p in (image_path, gt_path):
        if p.exists() and not force:
            raise OutputExistsError(f"{p}: already exists (pass --force to overwrite)")
    ensure_writable_folder(out)
    rng = np.random.default_rng(seed)
    render = _SlideRender(rng, side, _slide_cells(rng, side, crowded))
    from cellseg.fileio import atomic_write, atomic_write_json

    atomic_write(image_path, lambda p: _write_slide_tiff(p, render), force=True)
    atomic_write_json(gt_path, _slide_gt(render, side), force=True)
    return out


def _write_slide_tiff(path: Path, render: _SlideRender) -> None:
    tile = (SLIDE_TILE, SLIDE_TILE)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(render.tiles(), shape=(render.side, render.side, 3), dtype=np.uint8, tile=tile,
                  photometric="rgb", compression="zlib", subifds=len(render.levels))
        for level in render.levels:
            tif.write(level, tile=tile, photometric="rgb", compression="zlib", subfiletype=1)
