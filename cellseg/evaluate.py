"""COCO evaluation of instance segmentation results, sized for crowded cell images.

Two traps this module avoids:
- `maxDets`: COCO's default [1, 10, 100] silently drops every detection past the 100th per image
  and category, so an image with 159 nuclei can never reach AP 1.0. We use [1, 10, M] with M
  sized from the ground truth (see `max_dets_for`).
- `summarize()`: pycocotools' summarize() reports AP at maxDets=100 whatever `maxDets` says
  (and -1 when 100 is not in the list); faster-coco-eval's uses maxDets[-1]. We read AP, AP50
  and AP75 straight from the accumulated precision array at the largest maxDets, area "all",
  identically for both libraries, so their numbers can be compared.

`evaluate_coco` uses faster-coco-eval (C++); `pycocotools_ap` is the reference implementation
used by the test that checks the two agree. `match_instances` measures backend parity.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.data.coco import rle_areas, rle_counts_problem
from cellseg.errors import InputError, foreign_errors
from cellseg.fileio import read_json

IOU_TYPES = ("segm", "bbox")
DEFAULT_MAX_DETS = 100  # COCO's; M is never below it


# ---------------------------------------------------------------------------------------------
# maxDets


def gt_instances_per_image(gt: dict) -> dict[int, int]:
    """Number of GT annotations per image id (images without annotations count 0)."""
    counts = Counter(int(a["image_id"]) for a in gt.get("annotations", []))
    return {int(img["id"]): counts.get(int(img["id"]), 0) for img in gt.get("images", [])}


def max_dets_for(gt: dict) -> int:
    """M for maxDets [1, 10, M]: 2x the most GT instances on any image (headroom for false
    positives ranked among the true ones), rounded up to a multiple of 100, at least 100."""
    most = max(gt_instances_per_image(gt).values(), default=0)
    return max(DEFAULT_MAX_DETS, int(math.ceil(2 * most / 100.0)) * 100)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_gt(gt: dict) -> None:
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) \
            or not isinstance(gt.get("annotations"), list) or not isinstance(gt.get("categories"), list):
        raise InputError("ground truth is not a COCO dict with 'images', 'annotations' and 'categories' lists")


def _check_results_against_gt(gt: dict, results: Sequence[dict], source: str = "results",
                              iou_types: Sequence[str] = IOU_TYPES) -> None:
    """Every result names a GT image and category, its mask has that image's size, and it has a
    mask when segm is evaluated; InputError "<source>: result #i: ..." for the first that does not."""
    image_ids = {int(img["id"]) for img in gt["images"]}
    cat_ids = {int(c["id"]) for c in gt["categories"]}
    sizes = {int(img["id"]): [img.get("height"), img.get("width")] for img in gt["images"]}
    for i, r in enumerate(results):
        where = f"{source}: result #{i}"
        if r["image_id"] not in image_ids:
            raise InputError(f"{where}: image id {r['image_id']} is not in the ground truth "
                             f"(ground-truth ids: {_id_range(image_ids)})")
        if r["category_id"] not in cat_ids:
            raise InputError(f"{where}: category id {r['category_id']} is not in the ground truth "
                             f"(ground-truth category ids: {sorted(cat_ids)})")
        seg = r.get("segmentation")
        if seg is None and "segm" in iou_types:
            raise InputError(f"{where}: has no 'segmentation' (mask); segm AP needs one in every result")
        if isinstance(seg, dict) and list(seg.get("size", [])) != sizes[r["image_id"]]:
            raise InputError(f"{where}: mask size {seg.get('size')} differs from image "
                             f"{r['image_id']}'s size {sizes[r['image_id']]} in the ground truth")


def _id_range(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    return f"{ids[0]}..{ids[-1]}" if ids else "none"


def _prepared_gt(gt: dict) -> dict:
    """A deep copy (both COCO libraries write into annotation dicts) with `iscrowd` and `area`
    filled where a hand-made GT lacks them; area only matters for the unused size ranges."""
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            bbox = ann.get("bbox") or [0, 0, 0, 0]
            ann["area"] = float(bbox[2]) * float(bbox[3])
    return gt


def _prepared_results(results: Sequence[dict], iou_type: str) -> list[dict]:
    """Deep copy, and drop the box from segm results: both libraries' loadRes would otherwise
    take the box branch and set the area from the box (harmless for area 'all', but the
    segm branch is the one meant for mask results)."""
    prepared = copy.deepcopy(list(results))
    if iou_type == "segm":
        for r in prepared:
            r.pop("bbox", None)
    return prepared


# ---------------------------------------------------------------------------------------------
# Reading the precision array


def summary_from_precision(precision: np.ndarray, iou_thrs: np.ndarray, cat_ids: Sequence[int],
                           cat_names: dict[int, str], max_dets: int) -> dict[str, Any]:
    """AP, AP50, AP75, per-class AP and AP50 from a COCO precision array [T, R, K, A, M], at area
    'all' (index 0) and the largest maxDets (index -1). -1 entries (no GT) are left out of the
    means; a class without GT gets None; no GT at all gives None."""
    p = np.asarray(precision)[:, :, :, 0, -1]  # [T, R, K]

    def mean_valid(a: np.ndarray) -> float | None:
        valid = a[a > -1]
        return float(valid.mean()) if valid.size else None

    def at_iou(thr: float) -> np.ndarray:
        hits = np.where(np.isclose(iou_thrs, thr))[0]
        return p[int(hits[0])]

    at50 = at_iou(0.5)
    return {
        "AP": mean_valid(p),
        "AP50": mean_valid(at50),
        "AP75": mean_valid(at_iou(0.75)),
        "per_class": {cat_names[int(c)]: mean_valid(p[:, :, k]) for k, c in enumerate(cat_ids)},
        "per_class_AP50": {cat_names[int(c)]: mean_valid(at50[:, k]) for k, c in enumerate(cat_ids)},
        "max_dets": int(max_dets),
    }


def _empty_summary(gt: dict, max_dets: int) -> dict[str, Any]:
    """Empty results: every class with GT scores 0.0, classes without GT None."""
    with_gt = {int(a["category_id"]) for a in gt["annotations"] if not a.get("iscrowd", 0)}
    per_class = {c["name"]: (0.0 if int(c["id"]) in with_gt else None)
                 for c in sorted(gt["categories"], key=lambda c: int(c["id"]))}
    ap = 0.0 if with_gt else None
    return {"AP": ap, "AP50": ap, "AP75": ap, "per_class": per_class, "per_class_AP50": dict(per_class),
            "max_dets": int(max_dets)}


def _cat_names(gt: dict) -> dict[int, str]:
    return {int(c["id"]): str(c["name"]) for c in gt["categories"]}


# ---------------------------------------------------------------------------------------------
# Public evaluation


def evaluate_coco(gt: dict, results: list[dict], iou_types: Sequence[str] = IOU_TYPES,
                  max_dets: int | None = None, source: str = "results") -> dict[str, dict[str, Any]]:
    """Score COCO `results` against the COCO ground-truth dict `gt` with faster-coco-eval.

    Returns {iou_type: {"AP", "AP50", "AP75", "per_class": {name: AP or None},
    "per_class_AP50": {name: AP50 or None}, "max_dets": M}}.
    maxDets is [1, 10, M], M = `max_dets` or `max_dets_for(gt)`. Raises InputError when a result
    names an image or category that is not in the GT, or lacks a mask when segm is evaluated;
    `source` (the results file) starts every message."""
    _check_gt(gt)
    _check_iou_types(iou_types)
    _check_results_against_gt(gt, results, source, iou_types)
    m = int(max_dets) if max_dets is not None else max_dets_for(gt)
    out: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        if not results:
            out[iou_type] = _empty_summary(gt, m)
            continue
        # Inputs are validated above; this turns anything the C++ evaluator still refuses into
        # one line naming the results file instead of a traceback.
        with foreign_errors(source, f"results for {iou_type} evaluation", InputError):
            out[iou_type] = _faster_coco_eval(gt, results, iou_type, m)
    return out


def _faster_coco_eval(gt: dict, results: list[dict], iou_type: str, max_dets: int) -> dict[str, Any]:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(_prepared_gt(gt))
    coco_dt = coco_gt.loadRes(_prepared_results(results, iou_type))
    ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type)
    ev.params.maxDets = [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    return summary_from_precision(ev.eval["precision"], ev.params.iouThrs, ev.params.catIds,
                                  _cat_names(gt), max_dets)


def pycocotools_ap(gt: dict, results: list[dict], iou_type: str, max_dets: int) -> dict[str, Any]:
    """The same figures as `evaluate_coco` computed with pycocotools' COCOeval (reference
    implementation), maxDets [1, 10, max_dets], read from the precision array the same way."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_gt(gt)
    _check_iou_types([iou_type])
    _check_results_against_gt(gt, results, iou_types=[iou_type])
    if not results:
        return _empty_summary(gt, max_dets)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = _prepared_gt(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(_prepared_results(results, iou_type))
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.maxDets = sorted({1, 10, int(max_dets)})
        ev.evaluate()
        ev.accumulate()
    return summary_from_precision(ev.eval["precision"], ev.params.iouThrs, ev.params.catIds,
                                  _cat_names(gt), max_dets)


def _check_iou_types(iou_types: Sequence[str]) -> None:
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise InputError(f"iou types {list(iou_types)!r}: each must be one of {IOU_TYPES}")


# ---------------------------------------------------------------------------------------------
# Results files


def load_results(path: str | Path) -> list[dict]:
    """Read and validate a COCO results JSON (a list of {"image_id", "category_id", "score",
    "segmentation" {"size": [h, w], "counts": str}, "bbox" [x, y, w, h]}; at least one of
    segmentation/bbox). Raises InputError naming the file and the first bad entry."""
    path = Path(path)
    data = read_json(path, "results file")
    if not isinstance(data, list):
        raise InputError(f"{path}: results must be a JSON list of detections, got {type(data).__name__}")
    for i, r in enumerate(data):
        problem = _result_problem(r)
        if problem:
            raise InputError(f"{path}: result #{i}: {problem}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _result_problem(r: Any) -> str | None:
    if not isinstance(r, dict):
        return f"not an object ({type(r).__name__})"
    for key in ("image_id", "category_id"):
        if not _is_int(r.get(key)):
            return f"'{key}' must be an integer, got {r.get(key)!r}"
    if not _is_num(r.get("score")):
        return f"'score' must be a finite number, got {r.get('score')!r}"
    if "segmentation" not in r and "bbox" not in r:
        return "has neither 'segmentation' nor 'bbox'"
    if "bbox" in r:
        b = r["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(_is_num(v) for v in b)):
            return f"'bbox' must be 4 numbers [x, y, w, h], got {b!r}"
    if "segmentation" in r:
        s = r["segmentation"]
        if not (isinstance(s, dict) and isinstance(s.get("counts"), str)
                and isinstance(s.get("size"), list) and len(s["size"]) == 2
                and all(_is_int(v) and v >= 0 for v in s["size"])):
            return "'segmentation' must be an RLE {\"size\": [h, w], \"counts\": str}"
        return rle_counts_problem(s["counts"], s["size"][0], s["size"][1])
    return None


# ---------------------------------------------------------------------------------------------
# Parity between two result sets


def match_instances(ref: list[dict], other: list[dict], iou: float = 0.95) -> dict[str, Any]:
    """How well `other` reproduces `ref` (e.g. an exported backend against torch).

    Per image and category, `ref` instances in descending score order each take the unmatched
    `other` instance of highest mask IoU, if that IoU >= `iou` (one-to-one, greedy by score);
    two empty masks count as IoU 1.
    Returns {"ref_count", "other_count", "matched", "matched_share" (matched / ref_count; 1.0
    when both are empty, 0.0 when only ref is), "other_matched_share", "mean_iou" (of matches,
    None without any), "max_score_diff" (|score difference| over matches, 0.0 without any)}."""
    import pycocotools.mask as mask_utils

    groups: dict[tuple[int, int], tuple[list[dict], list[dict]]] = defaultdict(lambda: ([], []))
    for r in ref:
        groups[(int(r["image_id"]), int(r["category_id"]))][0].append(r)
    for r in other:
        groups[(int(r["image_id"]), int(r["category_id"]))][1].append(r)

    matched_ious: list[float] = []
    score_diffs: list[float] = []
    for (image_id, _), (refs, others) in sorted(groups.items()):
        if not refs or not others:
            continue
        refs = sorted(refs, key=lambda r: -float(r["score"]))
        ref_rles = [_rle(r) for r in refs]
        other_rles = [_rle(r) for r in others]
        sizes = {tuple(x["size"]) for x in ref_rles + other_rles}
        if len(sizes) > 1:
            raise InputError(f"image {image_id}: results disagree on the mask size {sorted(sizes)}")
        ious = np.asarray(mask_utils.iou(other_rles, ref_rles, [0] * len(ref_rles)))  # [O, R]
        ious = ious.reshape(len(others), len(refs))
        # pycocotools gives two empty masks IoU 0; for parity they are the same mask.
        other_empty = rle_areas(other_rles) == 0
        ref_empty = rle_areas(ref_rles) == 0
        ious[np.outer(other_empty, ref_empty)] = 1.0
        taken = np.zeros(len(others), dtype=bool)
        for j, r in enumerate(refs):
            col = np.where(taken, -1.0, ious[:, j])
            best = int(np.argmax(col))
            if col[best] >= iou:
                taken[best] = True
                matched_ious.append(float(col[best]))
                score_diffs.append(abs(float(r["score"]) - float(others[best]["score"])))

    n_ref, n_other, n = len(ref), len(other), len(matched_ious)
    return {
        "ref_count": n_ref,
        "other_count": n_other,
        "matched": n,
        "matched_share": n / n_ref if n_ref else (1.0 if n_other == 0 else 0.0),
        "other_matched_share": n / n_other if n_other else (1.0 if n_ref == 0 else 0.0),
        "mean_iou": float(np.mean(matched_ious)) if matched_ious else None,
        "max_score_diff": float(max(score_diffs)) if score_diffs else 0.0,
    }


def _rle(r: dict) -> dict:
    seg = r.get("segmentation")
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise InputError(f"result for image {r.get('image_id')}: match_instances needs an RLE 'segmentation'")
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def gt_coverage(gt: dict, results: Sequence[dict], iou: float = 0.5) -> dict[str, np.ndarray]:
    """Per GT instance (in annotation order): "category", mask "area", "found" (some result covers
    it at mask IoU >= `iou`, whatever class it names) and "named" (a result of its own class
    does). Every result counts (no score cut), as HoVer-Net's detection / classification split."""
    import pycocotools.mask as mask_utils

    _check_gt(gt)
    _check_results_against_gt(gt, results, "results", ("segm",))
    coco_gt = _coco_gt(gt)
    dets_of: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        dets_of[int(r["image_id"])].append(r)
    anns_of: dict[int, list[dict]] = defaultdict(list)
    for ann in coco_gt.dataset["annotations"]:
        anns_of[int(ann["image_id"])].append(ann)
    rows = []
    for image_id, anns in anns_of.items():
        dets = dets_of.get(image_id, [])
        masks = [coco_gt.annToRLE(a) for a in anns]
        covers = np.zeros((len(dets), len(anns)), bool)
        if dets:
            ious = mask_utils.iou([_rle(d) for d in dets], masks, [0] * len(anns))
            covers = np.asarray(ious).reshape(len(dets), len(anns)) >= iou
        det_classes = np.array([int(d["category_id"]) for d in dets], np.int64)
        for j, ann in enumerate(anns):
            own = det_classes == int(ann["category_id"])
            rows.append((int(ann["category_id"]), float(mask_utils.area(masks[j])), bool(covers[:, j].any()),
                         bool((covers[:, j] & own).any())))
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return {"category": np.asarray(columns[0], np.int64), "area": np.asarray(columns[1], np.float64),
            "found": np.asarray(columns[2], bool), "named": np.asarray(columns[3], bool)}


def class_recall(gt: dict, results: Sequence[dict], iou: float = 0.5,
                 coverage: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Where a class's AP goes: per class, of its GT instances the share some result covers at
    mask IoU >= `iou` whatever class it names ("found": the nucleus was found and outlined), and
    the share a result naming the right class covers ("named"). found - named is what
    classification costs; 1 - found what detection and outlining cost (see gt_coverage).
    Returns {class name: {"gt", "found", "named"}} (shares None for a class without GT).
    `coverage`: gt_coverage(gt, results, iou) when the caller already has it."""
    cover = gt_coverage(gt, results, iou) if coverage is None else coverage
    names = _cat_names(gt)
    recall = {}
    for c in gt["categories"]:
        mine = cover["category"] == int(c["id"])
        n = int(mine.sum())
        recall[names[int(c["id"])]] = {"gt": n, "found": float(cover["found"][mine].mean()) if n else None,
                                       "named": float(cover["named"][mine].mean()) if n else None}
    return recall


def size_recall(gt: dict, results: Sequence[dict], iou: float = 0.5, bins: int = 4,
                coverage: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The same found / named shares per object size: GT instances split into `bins` groups at
    the quantiles of their mask areas (COCO's small / medium / large put every nucleus in
    "small"). Rows: {"area_from", "area_to" (pixels, inclusive), "gt", "found", "named"}.
    `coverage`: gt_coverage(gt, results, iou) when the caller already has it."""
    cover = gt_coverage(gt, results, iou) if coverage is None else coverage
    areas = cover["area"]
    if areas.size == 0:
        return []
    edges = np.unique(np.quantile(areas, np.linspace(0, 1, bins + 1)))
    group = np.clip(np.searchsorted(edges, areas, side="right") - 1, 0, max(len(edges) - 2, 0))
    rows = []
    for g in np.unique(group):
        mine = group == g
        rows.append({"area_from": float(areas[mine].min()), "area_to": float(areas[mine].max()),
                     "gt": int(mine.sum()), "found": float(cover["found"][mine].mean()),
                     "named": float(cover["named"][mine].mean())})
    return rows


def _coco_gt(gt: dict) -> Any:
    from faster_coco_eval import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(_prepared_gt(gt))
