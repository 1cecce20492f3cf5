"""Images in, COCO results out: one predictor (any backend), the shared postprocess, atomic JSON.

Image ids: from an HW3 `test_image_name_to_ids.json` id map when given (matched by file name),
otherwise 1..N in the sorted order of the input paths (folders expanded and sorted by name)."""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.data.images import read_image
from cellseg.errors import InputError
from cellseg.fileio import atomic_write_json, atomic_write_bytes, check_writable
from cellseg.postprocess import detections_to_coco

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted by name, not recursive),
    or, for an HW3 training layout, to its samples' image.tif files in sample order."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                # An HW3 training root (or its train/ folder): one image.tif per sample folder, in
                # the sorted sample order that cellseg.data.coco.hw3_to_coco numbers 1..N.
                root = p / "train" if (p / "train").is_dir() else p
                found = sorted(d / "image.tif" for d in root.iterdir() if (d / "image.tif").is_file())
            if not found:
                raise InputError(f"{p}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    unique: dict[Path, Path] = {}  # resolved path -> path as given; first occurrence wins
    for p in paths:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def assign_image_ids(paths: Sequence[Path], id_map: dict[str, int] | None) -> list[int]:
    if id_map is None:
        return list(range(1, len(paths) + 1))
    missing = [p.name for p in paths if p.name not in id_map]
    if missing:
        raise InputError(f"id map has no entry for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [int(id_map[p.name]) for p in paths]


@dataclass
class InferenceStats:
    images: int = 0
    instances: int = 0
    # "predict" covers the network and the shared paste + RLE (cellseg bench splits them).
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "predict": 0.0})


def predict_image(predictor, image: np.ndarray, image_id: int, score_thresh: float | None = None) -> list[dict]:
    """Run one image through a predictor and the shared postprocess -> COCO result entries."""
    det = predictor.predict(image)
    if score_thresh is not None:
        keep = det.scores >= score_thresh
        det = type(det)(boxes=det.boxes[keep], scores=det.scores[keep], labels=det.labels[keep],
                        mask_probs=det.mask_probs[keep])
    spec = predictor.spec
    return detections_to_coco(image_id, det.boxes, det.scores, det.labels, det.mask_probs,
                              image.shape[:2], spec.category_ids, spec.mask_thresh)


def run_inference(predictor, paths: Sequence[Path], image_ids: Sequence[int],
                  score_thresh: float | None = None, overlays: Path | None = None,
                  progress: bool = True) -> tuple[list[dict], InferenceStats]:
    stats = InferenceStats()
    results: list[dict] = []
    for path, image_id in _progress(list(zip(paths, image_ids)), "infer", progress):
        t0 = time.perf_counter()
        image = read_image(path)
        t1 = time.perf_counter()
        entries = predict_image(predictor, image, image_id, score_thresh)
        t2 = time.perf_counter()
        stats.seconds["read"] += t1 - t0
        stats.seconds["predict"] += t2 - t1
        stats.images += 1
        stats.instances += len(entries)
        results.extend(entries)
        if overlays is not None:
            write_overlay(image, entries, predictor.spec.class_names, predictor.spec.category_ids,
                          overlays / f"{path.stem}.png")
    return results, stats


def write_results(results: list[dict], out: Path, force: bool) -> Path:
    return atomic_write_json(out, results, force=force)


_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
                    dtype=np.float32)


OVERLAY_MIN_SCORE = 0.5  # overlays are for looking: the results JSON keeps every detection


def write_overlay(image: np.ndarray, entries: list[dict], class_names: Sequence[str],
                  category_ids: Sequence[int], out: Path, min_score: float = OVERLAY_MIN_SCORE) -> Path:
    """A PNG with each instance scoring >= min_score filled in its class colour (half
    transparent), outlined, and labelled with class and score at its box corner."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    canvas = (np.clip(image, 0, 1) * 255).astype(np.float32)
    names = dict(zip(category_ids, class_names))
    colour_of = {cid: _PALETTE[i % len(_PALETTE)] for i, cid in enumerate(category_ids)}
    entries = [e for e in entries if e["score"] >= min_score]
    for e in entries:
        m = mask_utils.decode(e["segmentation"]).astype(bool)
        canvas[m] = 0.5 * canvas[m] + 0.5 * colour_of.get(e["category_id"], _PALETTE[0])
    img = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for e in entries:
        x, y, w, h = e["bbox"]
        colour = tuple(int(c) for c in colour_of.get(e["category_id"], _PALETTE[0]))
        draw.rectangle([x, y, x + w, y + h], outline=colour)
        draw.text((x + 1, y + 1), f"{names.get(e['category_id'], e['category_id'])} {e['score']:.2f}", fill=colour)
    buf = _png_bytes(img)
    return atomic_write_bytes(out, buf, force=True)


def _png_bytes(img) -> bytes:
    import io

    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def _progress(items: list, label: str, enabled: bool) -> Iterable:
    if not enabled or len(items) < 2:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def load_id_map_if_any(path: Path | None) -> dict[str, int] | None:
    if path is None:
        return None
    from cellseg.data.hw3 import read_id_map

    return read_id_map(path)


def prepare_output(out: Path, force: bool) -> None:
    """Fail before any work if the results file exists (no silent overwrite)."""
    check_writable(out, force)


def results_summary(results: list[dict]) -> dict:
    by_cat: dict[int, int] = {}
    for r in results:
        by_cat[r["category_id"]] = by_cat.get(r["category_id"], 0) + 1
    return {"instances": len(results), "per_category": by_cat}
