"""Tiled inference at the seams, with a fake predictor that 'detects' known discs in each tile
(knowing the tile from pixels that encode their own coordinates), and with a real tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg import tiling
from cellseg.config import ModelSpec
from cellseg.data.slides import ArraySource
from cellseg.errors import InputError
from cellseg.infer import InferSettings, infer_to_outputs, plan_outputs
from cellseg.pipeline import Detections, Predictor

SPEC = ModelSpec(arch="maskrcnn_resnet18_fpn", class_names=("a", "b"), category_ids=(1, 2))


def coded_image(h: int, w: int) -> np.ndarray:
    """Channels 0 and 1 hold each pixel's own row and column (/ 1e5), so a tile knows where it is."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([yy / 1e5, xx / 1e5, np.zeros_like(yy)], axis=2)


class FakePredictor:
    """Detects each disc (cy, cx, r, label) clipped to the tile; `jitter` shifts boxes by a
    tile-dependent amount so that two tiles see the same cell slightly differently."""

    def __init__(self, discs, jitter: float = 0.0) -> None:
        self.discs, self.jitter, self.spec = discs, jitter, SPEC
        self.stage_seconds = {"paste_rle": 0.0, "mask_nms": 0.0}

    to_coco = Predictor.to_coco  # the real detections -> COCO path; it needs only spec and stage_seconds

    def predict(self, image: np.ndarray, score_floor: float | None = None) -> Detections:
        y0, x0 = round(float(image[0, 0, 0]) * 1e5), round(float(image[0, 0, 1]) * 1e5)
        h, w = image.shape[:2]
        shift = self.jitter * (1 if (x0 // 16) % 2 else -1)
        boxes, labels, masks = [], [], []
        for cy, cx, r, label in self.discs:
            box = np.array([max(cx - r, x0), max(cy - r, y0), min(cx + r, x0 + w), min(cy + r, y0 + h)], np.float32)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            gy, gx = np.meshgrid(np.linspace(box[1], box[3], 28), np.linspace(box[0], box[2], 28), indexing="ij")
            masks.append(((gy - cy) ** 2 + (gx - cx) ** 2 <= r * r).astype(np.float32))
            boxes.append(box - [x0 - shift, y0, x0 - shift, y0])
            labels.append(label)
        n = len(boxes)
        return Detections(boxes=torch.tensor(np.array(boxes).reshape(n, 4)), scores=torch.linspace(0.9, 0.8, n),
                          labels=torch.tensor(labels, dtype=torch.int64),
                          mask_probs=torch.tensor(np.array(masks).reshape(n, 1, 28, 28)))


def run(discs, h, w, tile, overlap, tmp_path, jitter=0.0):
    from cellseg.infer import _Bar, _run_tiles, InferenceStats

    predictor = FakePredictor(discs, jitter)
    plan = plan_outputs([tmp_path / "img.tif"], tmp_path / "r.json", ("coco",), None, None, False)
    plan.work.mkdir()
    stats = InferenceStats()

    class Sink:
        entries: list = []

        def add(self, entries):
            self.entries.extend(entries)

    sink = Sink()
    sink.entries = []
    source = ArraySource(tmp_path / "img.tif", coded_image(h, w))
    settings = InferSettings(tile=tile, overlap=overlap, progress=False, skip_background=False)
    tile_plan = tiling.plan_tiles(h, w, tile, overlap)
    with _Bar(False, 1) as bar:
        _run_tiles(predictor, source, 1, 0, tile_plan, plan, settings, [sink], None, stats, bar)
    return sink.entries, stats


def whole_box(entry, cy, cx, r, jitter=0.0):
    x, y, w, h = entry["bbox"]
    return np.allclose([x, y, x + w, y + h], [cx - r, cy - r, cx + r, cy + r], atol=1.01 + jitter)


def test_plan_cores_partition_the_image():
    plan = tiling.plan_tiles(1000, 700, 256, 64)
    cover = np.zeros((1000, 700), int)
    for t in plan.tiles():
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        assert t.y <= y0 and y1 <= t.y + t.h and t.x <= x0 and x1 <= t.x + t.w
        assert t.y + t.h <= 1000 and t.x + t.w <= 700
    assert (cover == 1).all()
    assert plan.xs[-1] == 700 - 256 and plan.ys[-1] == 1000 - 256


@pytest.mark.parametrize("tile,overlap", [(64, 64), (32, 64)])
def test_tile_no_larger_than_overlap_is_refused(tile, overlap):
    with pytest.raises(InputError, match="--tile"):
        tiling.plan_tiles(500, 500, tile, overlap)


def test_defaults_from_the_checkpoint():
    spec = ModelSpec(arch="maskrcnn_resnet18_fpn", class_names=("a",), category_ids=(1,), max_object_px=70)
    tile, overlap = tiling.tile_settings(spec, None, None)
    assert overlap >= 70 + 2 * tiling.EDGE_MARGIN and overlap % spec.size_divisible == 0 and tile > overlap
    assert tiling.tile_settings(ModelSpec(arch="maskrcnn_resnet18_fpn", class_names=("a",), category_ids=(1,)),
                                None, None)[1] >= 512  # unknown: the largest anchor


def seam_of(h, w, tile, overlap):
    plan = tiling.plan_tiles(h, w, tile, overlap)
    return plan.tiles()[0].core[3], plan.tiles()[0].core[1]  # first vertical cut x, horizontal cut y


@pytest.mark.parametrize("jitter", [0.0, 1.5])
def test_object_on_a_seam_comes_out_once_and_whole(tmp_path, jitter):
    cut_x, _ = seam_of(300, 300, 128, 48)
    discs = [(60, cut_x, 12, 1), (60, cut_x + 0.5, 10, 2), (200, cut_x - 1, 15, 1)]
    entries, stats = run(discs, 300, 300, 128, 48, tmp_path, jitter)
    assert len(entries) == 3
    for cy, cx, r, label in discs:
        assert sum(e["category_id"] == label and whole_box(e, cy, cx, r, jitter) for e in entries) == 1
    assert stats.cut_objects == 0
    assert (stats.duplicates > 0) == (jitter > 0)  # jittered copies straddle the cut: merged


def test_object_on_a_four_tile_corner_comes_out_once(tmp_path):
    cut_x, cut_y = seam_of(300, 300, 128, 48)
    for jitter in (0.0, 1.5):
        entries, _ = run([(cut_y, cut_x, 14, 2)], 300, 300, 128, 48, tmp_path / str(jitter), jitter)
        assert len(entries) == 1 and whole_box(entries[0], cut_y, cut_x, 14, jitter)


def test_every_cell_once_on_a_random_field(tmp_path):
    rng = np.random.default_rng(0)
    discs = [(int(rng.integers(10, 590)), int(rng.integers(10, 490)), int(rng.integers(3, 18)), int(rng.integers(1, 3)))
             for _ in range(150)]
    discs = [d for d in discs if d[0] - d[2] >= 0 and d[1] - d[2] >= 0 and d[0] + d[2] <= 600 and d[1] + d[2] <= 500]
    entries, stats = run(discs, 600, 500, 128, 48, tmp_path, jitter=0.0)
    assert len(entries) == len(discs) and stats.cut_objects == 0
    boxes = sorted(tuple(np.round(e["bbox"], 0)) for e in entries)
    expected = sorted((float(cx - r), float(cy - r), float(2 * r), float(2 * r)) for cy, cx, r, _ in discs)
    assert np.allclose(boxes, expected, atol=1.01)


def test_object_larger_than_the_overlap_is_reported(tmp_path):
    cut_x, _ = seam_of(300, 300, 128, 48)
    entries, stats = run([(64, cut_x, 40, 1)], 300, 300, 128, 48, tmp_path)
    assert stats.cut_objects >= 1 and stats.largest_cut >= 40
    assert entries  # kept (a fragment at least), never silently dropped
    from cellseg.infer import _final_notes

    _final_notes(stats, None)
    assert any("larger than the tile overlap" in n and "--overlap" in n for n in stats.notes)


def test_background_tiles_are_found_on_bright_and_dark_backgrounds():
    plan = tiling.plan_tiles(512, 512, 128, 32)
    for glass, cell in ((0.9, 0.3), (0.02, 0.7)):
        thumb = np.full((128, 128, 3), glass, np.float32)
        thumb[10:20, 10:20] = cell  # cells only in the top-left corner (thumbnail step 4)
        keep = tiling.tissue_tiles(thumb, 4, plan.tiles())
        assert keep[0] and not keep[-1]
    assert all(tiling.tissue_tiles(np.full((64, 64, 3), 0.5, np.float32), 8, plan.tiles()))


def test_one_tile_equals_predict_coco_with_a_real_model(tiny_checkpoint, tmp_path):
    """An image no larger than the tile takes the tiling path and gives predict_coco's entries."""
    import tifffile

    from cellseg.pipeline import load_predictor

    predictor = load_predictor(tiny_checkpoint, backend="torch", device="cpu")
    rng = np.random.default_rng(0)
    image = (rng.random((120, 150, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", image, photometric="rgb")
    expected = predictor.predict_coco(image.astype(np.float32) / 255, 1, 0.0)
    plan = plan_outputs([tmp_path / "a.tif"], tmp_path / "r.json", ("coco",), None, None, False)
    infer_to_outputs(predictor, [tmp_path / "a.tif"], [1], plan, InferSettings(score_thresh=0.0, progress=False))
    import json

    got = json.loads((tmp_path / "r.json").read_text())
    assert got == expected and not plan.work.exists()


def test_tiled_real_model_gives_full_frame_results(tiny_checkpoint, tmp_path):
    import json

    import tifffile

    from cellseg.pipeline import load_predictor

    predictor = load_predictor(tiny_checkpoint, backend="torch", device="cpu")
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "b.tif", (rng.random((300, 260, 3)) * 255).astype(np.uint8), photometric="rgb",
                     tile=(64, 64))
    plan = plan_outputs([tmp_path / "b.tif"], tmp_path / "r.json", ("coco",), None, None, False)
    stats = infer_to_outputs(predictor, [tmp_path / "b.tif"], [7], plan,
                             InferSettings(score_thresh=0.0, tile=128, overlap=32, progress=False))
    got = json.loads((tmp_path / "r.json").read_text())
    assert stats.tiles == len(tiling.plan_tiles(300, 260, 128, 32)) > 1
    assert all(e["segmentation"]["size"] == [300, 260] and e["image_id"] == 7 for e in got)
    assert len(got) == stats.instances
