import copy
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils

from cellseg.data.coco import (
    annotation_mask,
    coco_dataset_images,
    decode_rle,
    encode_mask,
    hw3_to_coco,
    load_coco_gt,
    write_coco_gt,
)
from cellseg.data.hw3 import class_names_of, list_sample_dirs, read_sample
from cellseg.errors import DataError, OutputExistsError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _make_root(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, h, w in (("b", 10, 14), ("a", 9, 7)):
        d = root / "train" / name
        d.mkdir(parents=True)
        tifffile.imwrite(d / "image.tif", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), photometric="rgb")
        c2 = np.zeros((h, w), np.float64)
        c2[0, 0] = 4  # 1 pixel
        c2[2:5, 1:4] = 8
        c2[h - 1, w - 2 :] = 8  # second piece
        tifffile.imwrite(d / "class2.tif", c2)
        if name == "b":
            c1 = np.zeros((h, w), np.uint16)
            c1[6:9, 6:12] = 1
            tifffile.imwrite(d / "class1.tif", c1)


def test_encode_decode_roundtrip() -> None:
    mask = np.random.default_rng(0).random((13, 17)) > 0.6
    rle = encode_mask(mask)
    assert rle["size"] == [13, 17] and isinstance(rle["counts"], str)
    json.dumps(rle)
    np.testing.assert_array_equal(decode_rle(rle), mask)
    np.testing.assert_array_equal(decode_rle({"size": [13, 17], "counts": rle["counts"].encode()}), mask)
    # uncompressed RLE (column-major run lengths starting with background)
    small = np.zeros((3, 2), bool)
    small[1:, 0] = True
    np.testing.assert_array_equal(decode_rle({"size": [3, 2], "counts": [1, 2, 3]}), small)
    empty = np.zeros((4, 5), bool)
    np.testing.assert_array_equal(decode_rle(encode_mask(empty)), empty)


def test_annotation_mask_polygon() -> None:
    ann = {"segmentation": [[1, 1, 6, 1, 6, 4, 1, 4]]}
    mask = annotation_mask(ann, 8, 9)
    assert mask.shape == (8, 9) and mask.dtype == bool
    assert mask[2, 3] and not mask[6, 7]
    assert mask.sum() == int(mask_utils.area(mask_utils.frPyObjects(ann["segmentation"], 8, 9)).sum())


def test_hw3_to_coco_roundtrip(tmp_path: Path) -> None:
    _make_root(tmp_path)
    gt = hw3_to_coco(tmp_path)
    assert [img["file_name"] for img in gt["images"]] == ["a/image.tif", "b/image.tif"]
    assert [img["id"] for img in gt["images"]] == [1, 2]
    assert (gt["images"][0]["height"], gt["images"][0]["width"]) == (9, 7)
    assert gt["categories"] == [{"id": 1, "name": "class1"}, {"id": 2, "name": "class2"}]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 6))
    names = class_names_of(tmp_path)
    by_image: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
        assert ann["iscrowd"] == 0
    for image_id, sample_dir in enumerate(list_sample_dirs(tmp_path), start=1):
        sample = read_sample(sample_dir, names)
        anns = by_image[image_id]
        assert len(anns) == len(sample.labels)
        for ann, mask, label, box in zip(anns, sample.masks, sample.labels, sample.boxes):
            np.testing.assert_array_equal(decode_rle(ann["segmentation"]), mask)
            assert ann["category_id"] == label
            assert ann["area"] == int(mask.sum())
            assert ann["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    one_pixel = next(a for a in gt["annotations"] if a["area"] == 1)
    assert one_pixel["bbox"][2:] == [1, 1]

    out = tmp_path / "gt.json"
    write_coco_gt(gt, out)
    with pytest.raises(OutputExistsError):
        write_coco_gt(gt, out)
    write_coco_gt(gt, out, force=True)
    assert load_coco_gt(out) == json.loads(json.dumps(gt))
    pairs = coco_dataset_images(gt, tmp_path / "train")
    assert pairs == [(1, tmp_path / "train" / "a" / "image.tif"), (2, tmp_path / "train" / "b" / "image.tif")]
    with pytest.raises(DataError, match="image of COCO image id 1 not found"):
        coco_dataset_images(gt, tmp_path)


def _base_gt() -> dict:
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    return {
        "images": [{"id": 3, "file_name": "x.tif", "height": 6, "width": 8}],
        "categories": [{"id": 1, "name": "class1"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 1, "segmentation": encode_mask(mask), "area": 6, "bbox": [2, 1, 3, 2], "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": {"size": [6, 8], "counts": [10, 5, 33]}},
        ],
    }


def test_load_fills_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_base_gt()))
    gt = load_coco_gt(path)
    poly, uncompressed = gt["annotations"][1], gt["annotations"][2]
    assert poly["iscrowd"] == 0 and poly["area"] == int(annotation_mask(poly, 6, 8).sum()) > 0
    assert uncompressed["area"] == 5 and uncompressed["bbox"] == [1.0, 0.0, 2.0, 6.0]  # col 1 rows 4-5, col 2 rows 0-2


def test_load_rejects_malformed(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    with pytest.raises(DataError, match="gt.json: COCO GT file not found"):
        load_coco_gt(path)
    path.write_text("{oops")
    with pytest.raises(DataError, match="gt.json: not valid JSON"):
        load_coco_gt(path)

    def case(edit, message: str) -> None:
        gt = copy.deepcopy(_base_gt())
        edit(gt)
        path.write_text(json.dumps(gt))
        with pytest.raises(DataError, match=f"gt.json: .*{message}"):
            load_coco_gt(path)

    case(lambda g: g.pop("images"), "lacks a 'images' list")
    case(lambda g: g["images"][0].pop("height"), "positive integer height and width")
    case(lambda g: g["images"].append(dict(g["images"][0])), "duplicate image id 3")
    case(lambda g: g["categories"].append({"id": 1, "name": "again"}), "duplicate category id 1")
    case(lambda g: g["annotations"][0].update(image_id=99), "unknown image_id 99")
    case(lambda g: g["annotations"][0].update(category_id=5), "unknown category_id 5")
    case(lambda g: g["annotations"][1].update(id=1), "unique integer id")
    case(lambda g: g["annotations"][0].pop("segmentation"), "no segmentation")
    case(lambda g: g["annotations"][0]["segmentation"].update(size=[6, 9]), "RLE size")
    case(lambda g: g["annotations"][1].update(segmentation=[[0, 0, 4]]), "polygon must be")
    case(lambda g: g["annotations"][2]["segmentation"].update(counts=[1, 2]), "summing to h\\*w")
    case(lambda g: g["annotations"][0].update(bbox=[1, 2]), "bbox must be 4 numbers")
    path.write_text("[]")
    with pytest.raises(DataError, match="must be a JSON object"):
        load_coco_gt(path)


@pytest.mark.shared
def test_real_data_coco() -> None:
    if not SHARED.exists():
        pytest.skip("shared data absent")
    gt = hw3_to_coco(SHARED / "hw3_sample")
    assert len(gt["annotations"]) == 161
    assert sum(a["category_id"] == 1 for a in gt["annotations"]) == 2
    dsb = load_coco_gt(SHARED / "dsb_tiny" / "annotations.json")
    assert len(dsb["images"]) == 4 and len(dsb["annotations"]) == 137
