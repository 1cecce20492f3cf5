"""The score floor (ModelSpec.score_floor: no mask head below it, nothing output below it),
mask-overlap suppression (ModelSpec.mask_nms_thresh, cellseg.postprocess.suppress_mask_overlaps)
and the score decay after it (ModelSpec.mask_score_decay, decay_overlap_scores) on the one
detections -> COCO path."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_util

from cellseg.config import ModelSpec
from cellseg.errors import CheckpointError
from cellseg.pipeline import Detections, Predictor, load_predictor
from cellseg.postprocess import apply_output_rules, decay_overlap_scores, duplicate_pairs, suppress_mask_overlaps
from helpers import tiny_spec

torch.set_num_threads(1)


def count_mask_rois(predictor: Predictor) -> list[int]:
    """Wrap the backend's mask head: the RoI count of every call is appended to the list."""
    calls: list[int] = []
    run = predictor.backend.run_mask_head

    def counted(pooled):
        calls.append(int(pooled.shape[0]))
        return run(pooled)

    predictor.backend.run_mask_head = counted
    return calls


@pytest.fixture
def predictor(tiny_checkpoint) -> Predictor:
    return load_predictor(tiny_checkpoint, device="cpu")


IMAGE = np.random.default_rng(5).random((80, 96, 3), dtype=np.float32)


# ------------------------------------------------------------------------------------ floor
def test_floor_keeps_exactly_the_unfloored_detections_above_it(predictor):
    """A score cut commutes with torchvision's NMS and top-k: the floored run's detections are
    the unfloored run's that score at least the floor, and the mask head sees only those."""
    calls = count_mask_rois(predictor)
    full = predictor.predict(IMAGE, 0.0)
    floor = float(full.scores.median())
    floored = predictor.predict(IMAGE, floor)
    keep = full.scores >= floor
    assert 0 < int(keep.sum()) < full.scores.numel()
    assert torch.equal(floored.scores, full.scores[keep]) and torch.equal(floored.labels, full.labels[keep])
    assert torch.equal(floored.boxes, full.boxes[keep])
    torch.testing.assert_close(floored.mask_probs, full.mask_probs[keep], rtol=1e-5, atol=1e-6)
    assert calls == [full.scores.numel(), int(keep.sum())]


def test_spec_floor_is_the_default_and_a_call_overrides_it(predictor):
    full = predictor.predict(IMAGE, 0.0)
    floor = float(full.scores.max()) - 1e-6  # only the best detection passes
    predictor.spec = dataclasses.replace(predictor.spec, score_floor=floor)
    assert predictor.predict(IMAGE).scores.numel() == 1
    assert len(predictor.predict_coco(IMAGE, 1)) == 1
    assert predictor.predict(IMAGE, 0.0).scores.numel() == full.scores.numel()


def test_floor_above_every_score_skips_the_mask_head(predictor):
    calls = count_mask_rois(predictor)
    det = predictor.predict(IMAGE, 1.0)
    assert det.boxes.shape == (0, 4) and det.mask_probs.shape == (0, 1, 28, 28) and calls == []
    assert predictor.predict_coco(IMAGE, 1, 1.0) == []


def test_old_metadata_without_the_fields_gets_the_defaults():
    d = tiny_spec().to_dict()
    del d["score_floor"], d["mask_nms_thresh"], d["mask_score_decay"]
    spec = ModelSpec.from_dict(d)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    assert spec.score_floor == defaults["score_floor"] and spec.mask_nms_thresh == defaults["mask_nms_thresh"]
    assert spec.mask_score_decay == defaults["mask_score_decay"] == "matrix"


@pytest.mark.parametrize("field,value", [("score_floor", -0.1), ("score_floor", 1.5), ("score_floor", "high"),
                                         ("mask_nms_thresh", -1.0), ("mask_nms_thresh", None),
                                         ("mask_score_decay", "gaussian"), ("mask_score_decay", None)])
def test_bad_values_in_metadata_are_refused(field, value):
    with pytest.raises(CheckpointError, match=field):
        ModelSpec.from_dict({**tiny_spec().to_dict(), field: value})


def test_export_metadata_carries_the_settings(tiny_export):
    from cellseg.artifacts import read_export_json

    model = read_export_json(tiny_export)["metadata"]["model"]
    assert model["score_floor"] == tiny_spec().score_floor and model["mask_nms_thresh"] == tiny_spec().mask_nms_thresh


# ------------------------------------------------------------------------------ suppression
def disc_entry(cy: float, cx: float, r: float, score: float, cat: int = 1, size=(64, 64)) -> dict:
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    mask = np.asfortranarray(((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8))
    rle = mask_util.encode(mask)
    return {"image_id": 1, "category_id": cat, "bbox": [cx - r, cy - r, 2 * r, 2 * r], "score": score,
            "segmentation": {"size": list(size), "counts": rle["counts"].decode("ascii")}}


def brute_force(entries: list[dict], thresh: float) -> list[dict]:
    """Greedy by score over every pair, no pre-filter: what suppress_mask_overlaps must equal."""
    rles = [dict(e["segmentation"], counts=e["segmentation"]["counts"].encode()) for e in entries]
    order = sorted(range(len(entries)), key=lambda i: -entries[i]["score"])
    kept: list[int] = []
    for i in order:
        if not any(entries[j]["category_id"] == entries[i]["category_id"]
                   and mask_util.iou([rles[i]], [rles[j]], [0])[0][0] > thresh for j in kept):
            kept.append(i)
    return [entries[i] for i in sorted(kept)]


def test_duplicate_of_the_same_class_is_dropped_the_better_kept():
    a, b = disc_entry(30, 30, 10, 0.6), disc_entry(30, 31, 10, 0.9)
    assert suppress_mask_overlaps([a, b], 0.5) == [b]
    assert suppress_mask_overlaps([a, b], 1.0) == [a, b]  # off


def test_other_class_or_small_overlap_is_kept():
    a = disc_entry(30, 30, 10, 0.9)
    other = disc_entry(30, 31, 10, 0.8, cat=2)
    assert suppress_mask_overlaps([a, other], 0.5) == [a, other]
    side = disc_entry(30, 42, 10, 0.8)  # IoU about 0.2
    assert suppress_mask_overlaps([a, side], 0.5) == [a, side]
    assert suppress_mask_overlaps([a, side], 0.1) == [a]


def test_empty_masks_are_kept_and_suppress_nothing():
    empty = [disc_entry(30.5, 30.5, 0.1, s) for s in (0.9, 0.8)]  # between pixel centres: no pixel
    assert mask_util.area([dict(e["segmentation"], counts=e["segmentation"]["counts"].encode())
                           for e in empty]).tolist() == [0, 0]
    assert suppress_mask_overlaps(empty, 0.5) == empty and duplicate_pairs(empty, 0.5) == 0


def test_a_suppressed_entry_suppresses_nothing():
    """Greedy: c overlaps b but not a; b is dropped by a, so c survives."""
    a, b, c = disc_entry(30, 26, 10, 0.9), disc_entry(30, 31, 10, 0.8), disc_entry(30, 37, 10, 0.7)
    assert suppress_mask_overlaps([c, b, a], 0.5) == [c, a]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(8, 56), st.integers(8, 56), st.integers(2, 9), st.floats(0.05, 1.0),
                          st.integers(1, 2)), min_size=0, max_size=40),
       st.sampled_from([0.0, 0.3, 0.5, 0.8]))
def test_suppression_equals_brute_force(discs, thresh):
    entries = [disc_entry(cy, cx, r, s, cat) for cy, cx, r, s, cat in discs]
    assert suppress_mask_overlaps(entries, thresh) == brute_force(entries, thresh)


def test_duplicate_pairs_counts_every_same_class_pair_above_the_threshold():
    rng = np.random.default_rng(2)
    entries = [disc_entry(*rng.uniform(6, 58, 2), rng.uniform(2, 8), float(rng.random()), int(rng.integers(1, 3)))
               for _ in range(80)]
    rles = [dict(e["segmentation"], counts=e["segmentation"]["counts"].encode()) for e in entries]
    expected = sum(entries[i]["category_id"] == entries[j]["category_id"]
                   and mask_util.iou([rles[i]], [rles[j]], [0])[0][0] > 0.5
                   for i in range(80) for j in range(i + 1, 80))
    assert expected > 0 and duplicate_pairs(entries, 0.5) == expected
    assert duplicate_pairs(suppress_mask_overlaps(entries, 0.5), 0.5) == 0


def test_suppression_blocks_give_the_same_answer(monkeypatch):
    """Entries go against their x-neighbours in blocks; the block size changes nothing."""
    import cellseg.postprocess as pp

    rng = np.random.default_rng(1)
    entries = [disc_entry(*rng.uniform(6, 58, 2), rng.uniform(2, 8), float(rng.random()), int(rng.integers(1, 3)))
               for _ in range(120)]
    expected = brute_force(entries, 0.5)
    for rows in (1, 7, 500):
        monkeypatch.setattr(pp, "_PAIR_ROWS", rows)
        assert suppress_mask_overlaps(entries, 0.5) == expected


def test_to_coco_applies_the_spec_threshold():
    """The one detections -> COCO path drops a same-class duplicate mask unless it is turned off."""

    class Bare:
        to_coco = Predictor.to_coco

        def __init__(self, spec):
            self.spec, self.stage_seconds = spec, {"paste_rle": 0.0, "mask_nms": 0.0}

    yy, xx = np.mgrid[0:28, 0:28]
    disc = torch.tensor(((yy - 13.5) ** 2 + (xx - 13.5) ** 2 <= 100).astype(np.float32))[None, None]
    det = Detections(boxes=torch.tensor([[10.0, 10, 40, 40], [11.0, 10, 41, 40], [10.0, 10, 40, 40]]),
                     scores=torch.tensor([0.9, 0.8, 0.7]), labels=torch.tensor([1, 1, 2]),
                     mask_probs=disc.repeat(3, 1, 1, 1))
    on = Bare(tiny_spec(mask_nms_thresh=0.5)).to_coco(det, 1, (64, 64))
    off = Bare(tiny_spec(mask_nms_thresh=1.0, mask_score_decay="none")).to_coco(det, 1, (64, 64))
    decay_only = Bare(tiny_spec(mask_nms_thresh=1.0)).to_coco(det, 1, (64, 64))
    assert [(e["score"], e["category_id"]) for e in on] == [(pytest.approx(0.9), 1), (pytest.approx(0.7), 2)]
    assert len(off) == 3
    # without suppression the identical duplicate's score decays to ~0, under the floor: dropped
    assert [(e["score"], e["category_id"]) for e in decay_only] == [(e["score"], e["category_id"]) for e in on]
    assert len(Bare(tiny_spec(mask_nms_thresh=1.0)).to_coco(det, 1, (64, 64), score_floor=0.0)) == 3


# ------------------------------------------------------------------------------- score decay
def mask_ious(entries: list[dict]) -> np.ndarray:
    rles = [dict(e["segmentation"], counts=e["segmentation"]["counts"].encode()) for e in entries]
    return np.asarray(mask_util.iou(rles, rles, [0] * len(rles))).reshape(len(rles), len(rles))


def matrix_nms_reference(entries: list[dict]) -> list[float]:
    """SOLOv2's Matrix NMS (linear kernel) written densely over every pair: the decayed scores."""
    n = len(entries)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: -entries[i]["score"])  # stable: ties keep input order
    iou = mask_ious(entries)[np.ix_(order, order)]
    same = np.array([[entries[i]["category_id"] == entries[j]["category_id"] for j in order] for i in order])
    upper = np.triu(np.ones((n, n), bool), 1) & same  # [j, i]: j ranked before i, same class
    pair = np.where(upper, iou, 0.0)
    best_above = pair.max(0)
    ratio = np.where(upper, (1 - pair) / np.maximum(1 - best_above[:, None], 1e-6), np.inf)
    decay = np.minimum(1.0, ratio.min(0))
    scores = [0.0] * n
    for rank, i in enumerate(order):
        scores[i] = entries[i]["score"] * float(decay[rank])
    return scores


def test_a_fragment_inside_a_nucleus_drops_by_its_overlap():
    whole, part = disc_entry(30, 30, 10, 0.9), disc_entry(30, 36, 4, 0.8)
    iou = mask_ious([whole, part])[0, 1]
    assert 0.05 < iou < 0.5  # kept by mask NMS at 0.5
    out = decay_overlap_scores([part, whole])
    assert [e["category_id"] for e in out] == [1, 1] and out[1] is whole  # order kept, top untouched
    assert out[0]["score"] == pytest.approx(0.8 * (1 - iou)) and out[0]["segmentation"] == part["segmentation"]
    assert part["score"] == 0.8  # the input is not changed


def test_no_decay_without_overlap_or_across_classes():
    entries = [disc_entry(15, 15, 6, 0.5), disc_entry(45, 45, 6, 0.9), disc_entry(15, 16, 6, 0.7, cat=2)]
    assert decay_overlap_scores(entries) == entries


def test_an_entry_already_decayed_decays_the_next_one_less():
    """Compensation: c overlaps b as much as b overlaps a, so c keeps its score."""
    a, b, c = disc_entry(30, 20, 8, 0.9), disc_entry(30, 30, 8, 0.8), disc_entry(30, 40, 8, 0.7)
    iou = mask_ious([a, b, c])
    assert iou[0, 2] == 0 and iou[0, 1] == pytest.approx(iou[1, 2])
    out = decay_overlap_scores([a, b, c])
    assert out[1]["score"] == pytest.approx(0.8 * (1 - iou[0, 1])) and out[2]["score"] == pytest.approx(0.7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(8, 56), st.integers(8, 56), st.integers(2, 9), st.floats(0.05, 1.0),
                          st.integers(1, 2)), min_size=0, max_size=40))
def test_decay_equals_dense_matrix_nms(discs):
    entries = [disc_entry(cy, cx, r, s, cat) for cy, cx, r, s, cat in discs]
    got = [e["score"] for e in decay_overlap_scores(entries)]
    np.testing.assert_allclose(got, matrix_nms_reference(entries), rtol=1e-9, atol=1e-12)


def test_decay_equals_dense_matrix_nms_on_a_crowded_image(monkeypatch):
    """120 overlapping discs of two classes, in blocks of every size against their neighbours."""
    import cellseg.postprocess as pp

    rng = np.random.default_rng(3)
    entries = [disc_entry(*rng.uniform(6, 58, 2), rng.uniform(2, 8), float(rng.random()), int(rng.integers(1, 3)))
               for _ in range(120)]
    expected = matrix_nms_reference(entries)
    assert sum(e["score"] != x for e, x in zip(entries, expected)) > 30
    for rows in (1, 7, 500):
        monkeypatch.setattr(pp, "_PAIR_ROWS", rows)
        np.testing.assert_allclose([e["score"] for e in decay_overlap_scores(entries)], expected, rtol=1e-9)


def test_output_rules_suppress_then_decay():
    a, dup, part = disc_entry(30, 30, 10, 0.9), disc_entry(30, 31, 10, 0.85), disc_entry(30, 37, 5, 0.8)
    kept = suppress_mask_overlaps([a, dup, part], 0.5)
    assert kept == [a, part]
    assert apply_output_rules([a, dup, part], 0.5, "none") == kept
    assert apply_output_rules([a, dup, part], 0.5, "matrix") == decay_overlap_scores(kept)
    assert apply_output_rules([a, dup, part], 0.5, "matrix")[1]["score"] < 0.8
    assert apply_output_rules([a, dup, part], 0.5, "matrix", 0.9) == [a]  # decayed below the floor: dropped
    assert apply_output_rules([a, dup, part], 0.5, "none", 0.9) == kept  # undecayed scores passed the floor already


def test_tiled_inference_with_suppression_still_merges_seams(tmp_path):
    """Two detections of one disc inside a tile are one; a disc on a seam still comes out once."""
    from test_tiling import run

    discs = [(40, 40, 6, 1), (40, 41, 6, 1), (64, 120, 7, 2)]  # a same-tile duplicate, a seam-straddling cell
    entries, _ = run(discs, 128, 256, 128, 32, tmp_path, jitter=1.0)
    assert sorted(e["category_id"] for e in entries) == [1, 2]
