"""cellseg.evaluate: maxDets sizing, precision-array AP, faster-coco-eval vs pycocotools,
results-file validation, instance matching for backend parity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from cellseg.errors import InputError
from cellseg.evaluate import (class_recall, evaluate_coco, gt_coverage, size_recall, load_results, match_instances, max_dets_for,
                              pycocotools_ap)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _square(h: int, w: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y:y + side, x:x + side] = True
    return m


def _make_gt(rng: np.random.Generator, crowded: int = 150) -> dict:
    """Three images: one crowded (`crowded` squares on a grid, > 100), one with a few instances
    of random size, one empty. Categories 1..3; category 3 ('class3') has no GT at all."""
    images, anns = [], []
    specs = {1: (128, 160), 2: (64, 80), 3: (40, 40)}
    for image_id, (h, w) in specs.items():
        images.append({"id": image_id, "file_name": f"s{image_id}/image.tif", "height": h, "width": w})
    positions = [(y, x) for y in range(0, 128 - 6, 8) for x in range(0, 160 - 6, 8)][:crowded]
    masks = [(1, 1 + (i % 2), _square(128, 160, y, x, 6)) for i, (y, x) in enumerate(positions)]
    for _ in range(6):
        side = int(rng.integers(4, 14))
        y, x = int(rng.integers(0, 64 - side)), int(rng.integers(0, 80 - side))
        masks.append((2, 1 + int(rng.integers(0, 2)), _square(64, 80, y, x, side)))
    for ann_id, (image_id, cat, m) in enumerate(masks, start=1):
        rle = _rle(m)
        anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": rle,
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "area": float(m.sum()), "iscrowd": 0})
    cats = [{"id": k, "name": f"class{k}"} for k in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}


def _gt_as_results(gt: dict, rng: np.random.Generator) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "segmentation": dict(a["segmentation"]), "score": float(rng.uniform(0.5, 1.0))}
            for a in gt["annotations"]]


def _perturbed_results(gt: dict, rng: np.random.Generator) -> list[dict]:
    """Drop some GT, shift others by a pixel or two, swap some classes, add false positives."""
    out = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        img = next(i for i in gt["images"] if i["id"] == a["image_id"])
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        if rng.random() < 0.5:  # IoU of a 6 px square shifted by 1 px: 30/42
            m = np.roll(m, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
        cat = a["category_id"] if rng.random() > 0.1 else 3 - a["category_id"]
        rle = _rle(m)
        out.append({"image_id": img["id"], "category_id": cat, "segmentation": rle,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": float(rng.uniform(0.05, 1.0))})
    for _ in range(40):  # false positives, including the class without GT
        h, w = 128, 160
        m = _square(h, w, int(rng.integers(0, 120)), int(rng.integers(0, 150)), int(rng.integers(3, 8)))
        rle = _rle(m)
        out.append({"image_id": 1, "category_id": int(rng.integers(1, 4)), "segmentation": rle,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": float(rng.uniform(0.05, 1.0))})
    return out


@pytest.fixture
def gt() -> dict:
    return _make_gt(np.random.default_rng(0))


def test_max_dets_sized_from_gt(gt):
    assert max(sum(a["image_id"] == i for a in gt["annotations"]) for i in (1, 2, 3)) == 150
    assert max_dets_for(gt) == 300
    assert max_dets_for({"images": [{"id": 1}], "annotations": [], "categories": []}) == 100


def test_gt_against_itself_is_ap_1_with_more_than_100_instances(gt):
    results = _gt_as_results(gt, np.random.default_rng(1))
    scores = evaluate_coco(gt, results)
    for iou_type in ("segm", "bbox"):
        s = scores[iou_type]
        assert s["max_dets"] >= 150
        assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0)
        assert s["AP75"] == pytest.approx(1.0)
        assert s["per_class"] == {"class1": pytest.approx(1.0), "class2": pytest.approx(1.0),
                                  "class3": None}
    # The silent default: at 100 detections per image and class the crowded image is cut short.
    capped = pycocotools_ap(gt, results, "segm", max_dets=60)
    assert capped["AP"] < 0.9
    full = pycocotools_ap(gt, results, "segm", max_dets=max_dets_for(gt))
    assert full["AP"] == pytest.approx(1.0)


def test_pycocotools_at_100_misses_crowded_image():
    gt = _make_gt(np.random.default_rng(0), crowded=250)  # 125 per class on the crowded image
    results = _gt_as_results(gt, np.random.default_rng(1))
    assert evaluate_coco(gt, results, iou_types=("segm",))["segm"]["AP"] == pytest.approx(1.0)
    assert pycocotools_ap(gt, results, "segm", max_dets=100)["AP"] < 0.99


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_faster_coco_eval_equals_pycocotools(gt, iou_type):
    results = _perturbed_results(gt, np.random.default_rng(2))
    fast = evaluate_coco(gt, results, iou_types=(iou_type,))[iou_type]
    ref = pycocotools_ap(gt, results, iou_type, max_dets=fast["max_dets"])
    assert 0.1 < fast["AP"] < 0.95  # a non-trivial score, not 0 or 1
    for key in ("AP", "AP50", "AP75"):
        assert fast[key] == pytest.approx(ref[key], abs=1e-6)
    assert fast["per_class"].keys() == ref["per_class"].keys()
    for name, ap in ref["per_class"].items():
        assert (ap is None and fast["per_class"][name] is None) or fast["per_class"][name] == pytest.approx(ap, abs=1e-6)
    assert fast["per_class"]["class3"] is None


def test_empty_results_score_zero(gt):
    scores = evaluate_coco(gt, [])
    assert scores["segm"]["AP"] == 0.0 and scores["bbox"]["AP75"] == 0.0
    assert scores["segm"]["per_class"] == {"class1": 0.0, "class2": 0.0, "class3": None}
    assert pycocotools_ap(gt, [], "segm", 100)["AP"] == 0.0


def test_results_with_unknown_image_or_category_rejected(gt):
    good = _gt_as_results(gt, np.random.default_rng(1))[:3]
    with pytest.raises(InputError, match="image id"):
        evaluate_coco(gt, good + [{**good[0], "image_id": 99}])
    with pytest.raises(InputError, match="category id"):
        evaluate_coco(gt, good + [{**good[0], "category_id": 7}])
    with pytest.raises(InputError, match=r"result #3: mask size \[40, 40\] differs"):
        evaluate_coco(gt, good + [{**good[0], "segmentation": _rle(np.zeros((40, 40), bool))}])


def test_load_results_validates(tmp_path, gt):
    good = _gt_as_results(gt, np.random.default_rng(1))[:2]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(good))
    assert load_results(path) == good
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"a": 1}): "JSON list",
        json.dumps([{**good[0], "score": "high"}]): "result #0: 'score'",
        json.dumps([good[0], {**good[1], "image_id": 1.5}]): "result #1: 'image_id'",
        json.dumps([{k: v for k, v in good[0].items() if k not in ("bbox", "segmentation")}]): "neither",
        json.dumps([{**good[0], "segmentation": [[1, 2, 3]]}]): "RLE",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(InputError, match=message) as err:
            load_results(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="not found"):
        load_results(tmp_path / "missing.json")


def _det(image_id: int, cat: int, mask: np.ndarray, score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "segmentation": _rle(mask), "score": score}


def test_match_instances_basic():
    a = _square(40, 40, 2, 2, 10)
    b = _square(40, 40, 20, 20, 10)
    b_shifted = _square(40, 40, 20, 21, 10)  # IoU 90/110 = 0.818
    ref = [_det(1, 1, a, 0.9), _det(1, 1, b, 0.8), _det(2, 2, a, 0.7)]
    same = [_det(1, 1, a, 0.91), _det(1, 1, b, 0.8), _det(2, 2, a, 0.7)]
    r = match_instances(ref, same)
    assert r["matched"] == 3 and r["matched_share"] == 1.0 and r["mean_iou"] == pytest.approx(1.0)
    assert r["max_score_diff"] == pytest.approx(0.01)

    r = match_instances(ref, [_det(1, 1, a, 0.9), _det(1, 1, b_shifted, 0.8), _det(2, 1, a, 0.7)])
    assert r["matched"] == 1 and r["matched_share"] == pytest.approx(1 / 3)  # shifted; wrong class
    r = match_instances(ref, [_det(1, 1, a, 0.9), _det(1, 1, b_shifted, 0.8)], iou=0.8)
    assert r["matched"] == 2 and r["mean_iou"] == pytest.approx((1 + 90 / 110) / 2)

    # One-to-one: two ref copies of the same mask cannot share one `other` instance.
    r = match_instances([_det(1, 1, a, 0.9), _det(1, 1, a, 0.5)], [_det(1, 1, a, 0.9)])
    assert r["matched"] == 1 and r["other_matched_share"] == 1.0

    assert match_instances([], [])["matched_share"] == 1.0
    assert match_instances(ref, [])["matched_share"] == 0.0
    assert match_instances([], ref)["matched_share"] == 0.0
    with pytest.raises(InputError, match="mask size"):
        match_instances(ref, [_det(1, 1, np.zeros((30, 40), bool), 0.9)])


def test_class_recall_splits_finding_from_naming():
    masks = [_square(40, 40, 2, 2, 10), _square(40, 40, 20, 20, 10), _square(40, 40, 2, 25, 8),
             _square(40, 40, 25, 2, 8)]
    gt = {"images": [{"id": 1, "height": 40, "width": 40}, {"id": 2, "height": 40, "width": 40}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "segmentation": _rle(m), "area": int(m.sum()),
                           "bbox": [0, 0, 1, 1]} for i, (c, m) in enumerate(zip((1, 1, 2, 2), masks))]}
    gt["annotations"].append({**gt["annotations"][0], "id": 9, "image_id": 2})  # an image nobody detects in
    results = [_det(1, 1, masks[0], 0.9),                     # a: found, named
               _det(1, 2, masks[1], 0.8),                     # a: found, named b
               _det(1, 2, _square(40, 40, 2, 29, 8), 0.7),    # b: IoU 32/96 < 0.5, not found
               _det(1, 1, masks[3], 0.2), _det(1, 2, masks[3], 0.1)]  # b: found, named (second label)
    r = class_recall(gt, results)
    assert r["a"] == {"gt": 3, "found": pytest.approx(2 / 3), "named": pytest.approx(1 / 3)}
    assert r["b"] == {"gt": 2, "found": 0.5, "named": 0.5}
    assert r["c"] == {"gt": 0, "found": None, "named": None}
    assert class_recall(gt, [])["a"]["found"] == 0.0
    with pytest.raises(InputError, match="image"):
        class_recall(gt, [_det(7, 1, masks[0], 0.9)])


def test_size_recall_splits_found_and_named_by_mask_area_quantiles():
    """Four nuclei per size (3, 5, 7, 9 px squares): the small ones missed, one medium one named
    wrong; every group holds one size, and the shares agree with a per-instance count."""
    sides, masks, anns = (3, 5, 7, 9), [], []
    for i, side in enumerate(sides):
        for k in range(4):
            m = _square(60, 60, 2 + 14 * k, 2 + 14 * i, side)
            masks.append(m)
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "segmentation": _rle(m),
                         "area": int(m.sum()), "bbox": [0, 0, 1, 1]})
    gt = {"images": [{"id": 1, "height": 60, "width": 60}], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": anns}
    results = [_det(1, 2 if j == 4 else 1, m, 0.9) for j, m in enumerate(masks) if j >= 4]
    rows = size_recall(gt, results)
    assert [(r["area_from"], r["area_to"], r["gt"]) for r in rows] == [(s * s, s * s, 4) for s in sides]
    assert [r["found"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["named"] for r in rows] == [0.0, 0.75, 1.0, 1.0]
    assert size_recall(gt, [])[0]["found"] == 0.0 and len(size_recall(gt, results, bins=2)) == 2
    coverage = gt_coverage(gt, results)  # given once, both splits read the same coverage
    assert size_recall(gt, results, coverage=coverage) == rows
    assert class_recall(gt, results, coverage=coverage) == class_recall(gt, results)
    assert size_recall({**gt, "annotations": []}, []) == []


def test_pycocotools_summarize_ignores_large_max_dets(gt):
    """Why AP is read from the precision array: pycocotools' summarize() asks for maxDets=100,
    which is not in [1, 10, 300], and reports -1 for AP instead of the AP at 300."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = _gt_as_results(gt, np.random.default_rng(1))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), iouType="segm")
        ev.params.maxDets = [1, 10, 300]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == -1
    assert evaluate_coco(gt, results, iou_types=("segm",))["segm"]["AP"] == pytest.approx(1.0)


def test_match_instances_empty_masks_match_each_other():
    empty = np.zeros((20, 20), bool)
    r = match_instances([_det(1, 1, empty, 0.3)], [_det(1, 1, empty, 0.3)])
    assert r["matched"] == 1 and r["mean_iou"] == 1.0
    assert match_instances([_det(1, 1, empty, 0.3)], [_det(1, 1, _square(20, 20, 0, 0, 3), 0.3)])["matched"] == 0


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.shared
def test_hw3_sample_gt_against_itself_needs_max_dets_above_100():
    """The real HW3 sample: 159 class2 nuclei on one image. AP 1.0 only with maxDets >= 159."""
    root = SHARED / "hw3_sample"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    from cellseg.data.coco import hw3_to_coco

    gt = hw3_to_coco(root)
    results = _gt_as_results(gt, np.random.default_rng(3))
    scores = evaluate_coco(gt, results)
    assert scores["segm"]["max_dets"] >= 159
    assert scores["segm"]["AP"] == pytest.approx(1.0) and scores["bbox"]["AP"] == pytest.approx(1.0)
    assert pycocotools_ap(gt, results, "segm", max_dets=scores["segm"]["max_dets"])["AP"] == pytest.approx(1.0)
    assert pycocotools_ap(gt, results, "segm", max_dets=100)["AP"] < 0.9


def test_match_instances_with_more_than_255_instances_per_image():
    """pycocotools' area() overflows on lists of > 255 RLEs; crowded images have ~1000."""
    from pycocotools import mask as mask_utils

    masks = np.zeros((40, 40, 300), np.uint8, order="F")
    for i in range(300):
        r, c = divmod(i, 20)
        masks[r * 2:(r * 2) + 2, c * 2:(c * 2) + 2, i] = 1
    rles = mask_utils.encode(masks)
    results = [{"image_id": 1, "category_id": 1, "score": 1.0, "bbox": [0, 0, 2, 2],
                "segmentation": {"size": r["size"], "counts": r["counts"].decode()}} for r in rles]
    match = match_instances(results, results, iou=0.95)
    assert match["matched"] == 300 and match["matched_share"] == 1.0


def _write(tmp_path: Path, obj) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("counts, reason", [
    ("!!garbage~~", "outside the compressed-RLE alphabet"),
    ("3", "cover 3 pixels"),
    ("", "RLE counts are empty"),
    ("0o", "end in the middle of a number"),
])
def test_garbage_rle_counts_are_refused_with_file_and_index(tmp_path, gt, counts, reason):
    good = _gt_as_results(gt, np.random.default_rng(2))[:2]
    bad = dict(good[1], segmentation={"size": good[1]["segmentation"]["size"], "counts": counts})
    path = _write(tmp_path, [good[0], bad])
    with pytest.raises(InputError, match=f"results.json: result #1: .*{reason}"):
        load_results(path)


def test_result_problems_name_the_file_and_entry(tmp_path, gt):
    good = _gt_as_results(gt, np.random.default_rng(3))[:3]
    for change, message in [({"image_id": 999}, "result #2: image id 999 is not in the ground truth"),
                            ({"category_id": 77}, "result #2: category id 77 is not in the ground truth")]:
        results = good[:2] + [dict(good[2], **change)]
        with pytest.raises(InputError, match=f"run.json: {message}"):
            evaluate_coco(gt, results, source="run.json")
    no_mask = good[:2] + [{k: v for k, v in good[2].items() if k != "segmentation"}]
    with pytest.raises(InputError, match="run.json: result #2: has no 'segmentation'"):
        evaluate_coco(gt, no_mask, source="run.json")
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in good]
    assert set(evaluate_coco(gt, boxes_only, iou_types=("bbox",))) == {"bbox"}
