"""cellseg.postprocess: RLE strings identical to torchvision paste_masks_in_image + threshold +
pycocotools encode (numpy run finder and the torch run finder the CUDA path uses), edge cases,
area/bbox helper, detections_to_coco."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image

from cellseg.errors import InputError
from cellseg.postprocess import detections_to_coco, paste_and_encode, rle_area_bbox

torch.set_num_threads(1)
# pycocotools' decode under numpy 2 (test side only)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def reference(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
              threshold: float) -> list[dict]:
    """torchvision's full-canvas paste + `> threshold` + pycocotools encode of each mask."""
    if mask_probs.shape[0] == 0:
        return []
    pasted = paste_masks_in_image(mask_probs, boxes, image_size) > threshold
    return [encode(mask.numpy()) for mask in pasted[:, 0]]


def reference_or_none(mask_probs, boxes, image_size, threshold) -> list[dict | None]:
    """Per instance: the reference RLE, or None where torchvision raises (its negative slice
    indices for expanded integer boxes lying entirely outside the image)."""
    out: list[dict | None] = []
    for k in range(mask_probs.shape[0]):
        try:
            out.extend(reference(mask_probs[k:k + 1], boxes[k:k + 1], image_size, threshold))
        except RuntimeError:
            out.append(None)
    return out


def both_paths(mask_probs, boxes, image_size, threshold) -> tuple[list[dict], list[dict]]:
    return (paste_and_encode(mask_probs, boxes, image_size, threshold, device_runs=False),
            paste_and_encode(mask_probs, boxes, image_size, threshold, device_runs=True))


def assert_matches_reference(mask_probs, boxes, image_size, threshold) -> int:
    """Both paths equal the reference per instance (empty where the reference raises);
    returns how many instances the reference raised on."""
    expected = reference_or_none(mask_probs, boxes, image_size, threshold)
    host, device = both_paths(mask_probs, boxes, image_size, threshold)
    assert len(host) == len(device) == len(expected)
    for k, want in enumerate(expected):
        where = f"instance {k}, box {boxes[k].tolist()}, image {image_size}"
        assert device[k] == host[k], f"torch path differs from numpy path, {where}"
        if want is None:  # nothing pasted: the bare canvas, thresholded
            canvas = torch.zeros(image_size) > threshold
            assert host[k] == encode(canvas.numpy()), where
        else:
            assert host[k] == want, f"numpy path differs from the reference, {where}"
    return sum(want is None for want in expected)


# ---------------------------------------------------------------------------------------------
# hypothesis scenes

BOX_KINDS = ("inside", "inside", "partial", "touch_last", "subpixel", "huge", "integer")


@st.composite
def coord_box(draw, kind: str, h: int, w: int, huge_scale: float) -> list[float]:
    def interval(extent: int) -> tuple[float, float]:
        f = st.floats(0, 1, allow_nan=False)
        if kind == "inside":
            a = draw(f) * extent
            return a, a + draw(f) * (extent - a)
        if kind == "partial":
            a = (draw(f) * 1.5 - 0.5) * extent
            return a, a + draw(f) * extent
        if kind == "touch_last":
            end = extent - draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5]))
            return max(end - draw(f) * extent, -1.0), end
        if kind == "subpixel":
            a = draw(f) * extent
            return a, a + draw(f)
        if kind == "huge":
            return -draw(f) * huge_scale * extent, extent * (1 + draw(f) * huge_scale)
        a = draw(st.integers(-2, extent))  # integer: exact .0 coordinates at every boundary
        return float(a), float(a + draw(st.integers(0, extent + 2)))

    x1, x2 = interval(w)
    y1, y2 = interval(h)
    return [x1, y1, x2, y2]


@st.composite
def scenes(draw):
    tier = draw(st.sampled_from(["tiny", "tiny", "small", "small", "small", "large"]))
    if tier == "tiny":
        h, w, n_max, huge_scale = draw(st.integers(1, 4)), draw(st.integers(1, 4)), 6, 3.0
    elif tier == "small":
        h, w, n_max, huge_scale = draw(st.integers(5, 96)), draw(st.integers(5, 96)), 10, 2.0
    else:  # rare and with few masks: the reference pastes every mask into a full canvas
        h, w = draw(st.integers(1000, 2500)), draw(st.integers(1000, 2000))
        n_max, huge_scale = 3, 0.1
    n = draw(st.integers(0, n_max))
    event(f"tier {tier}")
    kinds = draw(st.lists(st.sampled_from(BOX_KINDS), min_size=n, max_size=n))
    boxes = [draw(coord_box(kind, h, w, huge_scale)) for kind in kinds]
    side = draw(st.sampled_from([28, 28, 28, 1, 2, 7]))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([0, 0, 2, 8]))  # quantised probabilities: ties with threshold
    threshold = draw(st.sampled_from([0.5, 0.5, 0.0, 0.25, 0.3, 0.999, 1.0, -0.1])
                     | st.floats(0, 1, allow_nan=False))
    box_dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand((n, 1, side, side), generator=generator)
    if levels:
        probs = torch.round(probs * levels) / levels
    return probs, torch.tensor(boxes, dtype=box_dtype).reshape(n, 4), (h, w), threshold


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_rle_strings_equal_reference(scene) -> None:
    raised = assert_matches_reference(*scene)
    event(f"threshold < 0: {scene[3] < 0}; reference raised on some: {raised > 0}")


@st.composite
def outside_scenes(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    side = draw(st.sampled_from(["left", "right", "above", "below"]))
    gap = draw(st.floats(0, 60, allow_nan=False))
    extent = draw(st.floats(0, 60, allow_nan=False))
    lo = draw(st.floats(-20, 60, allow_nan=False))
    along = (lo, lo + draw(st.floats(0, 40, allow_nan=False)))
    if side == "left":
        box = [-gap - extent, along[0], -gap, along[1]]
    elif side == "right":
        box = [w + gap, along[0], w + gap + extent, along[1]]
    elif side == "above":
        box = [along[0], -gap - extent, along[1], -gap]
    else:
        box = [along[0], h + gap, along[1], h + gap + extent]
    return torch.ones(1, 1, 28, 28), torch.tensor([box]), (h, w)


@settings(max_examples=200, deadline=None)
@given(outside_scenes())
def test_boxes_outside_image(scene) -> None:
    """Equal to the reference whenever torchvision's slicing does not raise. It raises (negative
    indices) only for expanded integer boxes entirely outside the image, and then we paste
    nothing."""
    event(f"reference raised: {assert_matches_reference(*scene, 0.5) > 0}")


# ---------------------------------------------------------------------------------------------
# explicit edge cases

def test_no_instances() -> None:
    empty = torch.zeros(0, 1, 28, 28), torch.zeros(0, 4)
    assert paste_and_encode(*empty, (10, 12), 0.5) == []
    assert paste_and_encode(*empty, (10, 12), 0.5, device_runs=True) == []
    assert detections_to_coco(3, empty[1], torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                              empty[0], (10, 12), [1], 0.5) == []


@pytest.mark.parametrize("device_runs", [False, True])
def test_empty_masks_are_all_zero_rles(device_runs: bool) -> None:
    probs = torch.zeros(3, 1, 28, 28)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 15.0], [0.0, 0.0, 30.0, 25.0], [5.0, 5.0, 5.5, 5.2]])
    out = paste_and_encode(probs, boxes, (25, 30), 0.5, device_runs=device_runs)
    assert out == [encode(np.zeros((25, 30), bool))] * 3
    assert out == reference(probs, boxes, (25, 30), 0.5)
    assert all(r["size"] == [25, 30] for r in out)


@pytest.mark.parametrize("device_runs", [False, True])
def test_full_frame_mask_merges_runs_across_columns(device_runs: bool) -> None:
    """A crop spanning the whole image height: runs continue from one column into the next,
    so an all-foreground image is the counts [0, h*w]."""
    probs = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[-20.0, -20.0, 60.0, 50.0], [-5.0, -40.0, 6.0, 70.0]])
    out = paste_and_encode(probs, boxes, (17, 23), 0.5, device_runs=device_runs)
    assert out == reference(probs, boxes, (17, 23), 0.5)
    full = mask_utils.decode({"size": [17, 23], "counts": out[0]["counts"].encode()})
    assert full.all()
    assert mask_utils.area({"size": [17, 23], "counts": out[1]["counts"].encode()}) > 17


@pytest.mark.parametrize("device_runs", [False, True])
def test_one_pixel_image(device_runs: bool) -> None:
    probs = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1).expand(2, 1, 28, 28).contiguous()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    out = paste_and_encode(probs, boxes, (1, 1), 0.2, device_runs=device_runs)
    assert out == reference(probs, boxes, (1, 1), 0.2)
    areas, _ = rle_area_bbox(out)
    assert areas.tolist() == [1, 0]


@pytest.mark.parametrize("device_runs", [False, True])
def test_many_same_size_boxes_share_one_resize(device_runs: bool) -> None:
    """Equal integer box sizes are resized in one batched call; values stay per instance."""
    generator = torch.Generator().manual_seed(1)
    probs = torch.rand(40, 1, 28, 28, generator=generator)
    corner = torch.randint(-5, 90, (40, 2), generator=generator).float()
    boxes = torch.cat([corner, corner + torch.tensor([13.0, 9.0])], 1)
    out = paste_and_encode(probs, boxes, (96, 100), 0.5, device_runs=device_runs)
    assert out == reference(probs, boxes, (96, 100), 0.5)


@pytest.mark.parametrize("threshold", [-0.1, -1e-30, float("-inf")])
def test_negative_threshold_makes_the_background_foreground(threshold: float) -> None:
    """`canvas > threshold` with threshold < 0 also marks every pixel outside the boxes."""
    generator = torch.Generator().manual_seed(5)
    probs = torch.rand(4, 1, 28, 28, generator=generator) - 0.5
    boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0], [-3.0, -3.0, 50.0, 40.0], [3.0, 3.0, 3.2, 3.1],
                          [-9.0, -9.0, -5.0, -5.0]])
    assert_matches_reference(probs, boxes, (20, 32), threshold)


def test_three_dim_masks_accepted() -> None:
    probs = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0], [3.0, 3.0, 30.0, 8.0]])
    assert paste_and_encode(probs, boxes, (20, 32), 0.5) == reference(probs[:, None], boxes,
                                                                      (20, 32), 0.5)


@pytest.mark.parametrize("bad", [
    dict(probs=torch.zeros(2, 2, 28, 28), boxes=torch.zeros(2, 4), size=(5, 5)),
    dict(probs=torch.zeros(2, 1, 28, 27), boxes=torch.zeros(2, 4), size=(5, 5)),
    dict(probs=torch.zeros(2, 1, 28, 28), boxes=torch.zeros(3, 4), size=(5, 5)),
    dict(probs=torch.zeros(2, 1, 28, 28), boxes=torch.zeros(2, 5), size=(5, 5)),
    dict(probs=torch.zeros(1, 1, 28, 28), boxes=torch.tensor([[0.0, 0.0, float("nan"), 1.0]]),
         size=(5, 5)),
    dict(probs=torch.zeros(1, 1, 28, 28), boxes=torch.zeros(1, 4), size=(0, 5)),
])
def test_bad_inputs_raise_input_error(bad: dict) -> None:
    with pytest.raises(InputError):
        paste_and_encode(bad["probs"], bad["boxes"], bad["size"], 0.5)


def test_rle_area_bbox_matches_decoded_masks() -> None:
    generator = torch.Generator().manual_seed(3)
    probs = torch.rand(6, 1, 28, 28, generator=generator)
    probs[2] = 0  # an empty mask
    boxes = torch.tensor([[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 40.0, 33.0], [5.0, 5.0, 9.0, 9.0],
                          [30.0, 20.0, 45.0, 40.0], [-4.0, 10.0, 3.0, 14.0],
                          [10.0, 1.0, 10.5, 1.5]])
    rles = paste_and_encode(probs, boxes, (33, 40), 0.4)
    area, bbox = rle_area_bbox(rles)
    assert area.dtype == np.int64 and bbox.shape == (6, 4)
    for k, rle in enumerate(rles):
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert area[k] == mask.sum()
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert bbox[k].tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                        ys.max() - ys.min() + 1]
        else:
            assert bbox[k].tolist() == [0, 0, 0, 0]
    empty_area, empty_bbox = rle_area_bbox([])
    assert empty_area.shape == (0,) and empty_bbox.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# detections_to_coco

def test_detections_to_coco_fields_types_and_categories() -> None:
    generator = torch.Generator().manual_seed(4)
    boxes = torch.tensor([[1.234, 2.345, 20.5, 30.25], [0.0, 0.0, 40.0, 33.0],
                          [5.0, 5.0, 9.0, 9.0]])
    scores = torch.tensor([0.9, 0.55, 0.123456])
    labels = torch.tensor([2, 1, 3])
    probs = torch.rand(3, 1, 28, 28, generator=generator)
    entries = detections_to_coco(7, boxes, scores, labels, probs, (33, 40), [11, 12, 15], 0.5)
    assert [e["category_id"] for e in entries] == [12, 11, 15]
    assert all(type(e["image_id"]) is int and e["image_id"] == 7 for e in entries)
    assert all(type(e["category_id"]) is int and type(e["score"]) is float for e in entries)
    assert all(all(type(v) is float for v in e["bbox"]) for e in entries)
    x1, y1, x2, y2 = (float(v) for v in boxes[0])
    assert entries[0]["bbox"] == [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
    assert entries[0]["bbox"] == [1.23, 2.35, 19.27, 27.9]
    assert entries[2]["score"] == pytest.approx(0.123456)
    rles = paste_and_encode(probs, boxes, (33, 40), 0.5)
    assert [e["segmentation"] for e in entries] == rles
    assert all(set(e) == {"image_id", "category_id", "bbox", "score", "segmentation"}
               for e in entries)
    assert all(isinstance(e["segmentation"]["counts"], str) for e in entries)


@pytest.mark.parametrize("labels", [torch.tensor([0]), torch.tensor([3])])
def test_detections_to_coco_rejects_unknown_labels(labels: torch.Tensor) -> None:
    with pytest.raises(InputError, match="label"):
        detections_to_coco(1, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([0.5]), labels,
                           torch.rand(1, 1, 28, 28), (8, 8), [1, 2], 0.5)


def test_detections_to_coco_rejects_mismatched_lengths() -> None:
    with pytest.raises(InputError):
        detections_to_coco(1, torch.zeros(2, 4), torch.zeros(3), torch.ones(2, dtype=torch.int64),
                           torch.rand(2, 1, 28, 28), (8, 8), [1], 0.5)
