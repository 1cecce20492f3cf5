"""Streaming writers: atomic COCO JSON, valid QuPath GeoJSON, pyramidal label OME-TIFFs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_util

from cellseg.data.synth import crop_to_rle
from cellseg.errors import OutputExistsError
from cellseg.outputs.coco import CocoResultsWriter
from cellseg.outputs.masks import rle_crop

shapely = pytest.importorskip("shapely")


def blob_entries(h: int, w: int, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        ch, cw = rng.integers(3, 30, 2)
        y0, x0 = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
        yy, xx = np.mgrid[0:ch, 0:cw]
        crop = ((yy - ch / 2) / (ch / 2)) ** 2 + ((xx - cw / 2) / (cw / 2)) ** 2 <= 1 + 0.3 * rng.random((ch, cw))
        entries.append({"image_id": 1, "category_id": int(rng.integers(1, 3)), "bbox": [x0, y0, int(cw), int(ch)],
                        "score": float(rng.random()), "segmentation": crop_to_rle(crop, y0, x0, h, w)})
    return entries


def test_coco_writer_is_atomic(tmp_path):
    out = tmp_path / "r.json"
    writer = CocoResultsWriter(out)
    writer.add(blob_entries(100, 100, 3))
    assert not out.exists()
    writer.close()
    assert json.loads(out.read_text()) == blob_entries(100, 100, 3)
    with pytest.raises(OutputExistsError):
        CocoResultsWriter(out)
    writer = CocoResultsWriter(out, force=True)
    writer.add(blob_entries(100, 100, 1))
    writer.abort()
    assert len(json.loads(out.read_text())) == 3 and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_rle_crop_matches_pycocotools():
    for e in blob_entries(60, 80, 20, seed=3):
        crop, y0, x0 = rle_crop(e["segmentation"])
        full = mask_util.decode({"size": [60, 80], "counts": e["segmentation"]["counts"].encode()}).astype(bool)
        ys, xs = np.nonzero(full)
        assert (y0, x0) == (ys.min(), xs.min()) and crop.sum() == full.sum()
        assert (full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] == crop).all()


def test_geojson_polygons_are_valid_and_rasterise_back(tmp_path):
    from shapely import contains_xy

    from cellseg.outputs.geojson import GeoJsonWriter

    entries = blob_entries(120, 90, 25)
    writer = GeoJsonWriter(tmp_path / "a.geojson", ("a", "b"), (1, 2))
    writer.add(entries)
    writer.close()
    doc = json.loads((tmp_path / "a.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(entries)
    ious = []
    for f, e in zip(doc["features"], entries):
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == ("a", "b")[e["category_id"] - 1]
        assert len(f["properties"]["classification"]["color"]) == 3
        assert f["properties"]["measurements"]["score"] == e["score"]
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        poly = shapely.geometry.shape(f["geometry"])
        assert poly.is_valid
        yy, xx = np.mgrid[0:120, 0:90]
        raster = contains_xy(poly, xx + 0.5, yy + 0.5)
        mask = mask_util.decode({"size": [120, 90], "counts": e["segmentation"]["counts"].encode()}).astype(bool)
        ious.append((raster & mask).sum() / (raster | mask).sum())
    assert np.median(ious) >= 0.99


def test_label_images_are_pyramidal_ome_tiffs(tmp_path, monkeypatch):
    import cellseg.outputs.labels as labels

    monkeypatch.setattr(labels, "LABEL_TILE", 64)
    entries = blob_entries(150, 200, 30)
    writer = labels.LabelImageWriter(tmp_path / "i.ome.tif", tmp_path / "c.ome.tif", 150, 200)
    writer.add(entries)
    writer.close()
    expected = np.zeros((150, 200), np.uint32)
    for k in sorted(range(len(entries)), key=lambda k: entries[k]["score"]):
        m = mask_util.decode({"size": [150, 200], "counts": entries[k]["segmentation"]["counts"].encode()}).astype(bool)
        expected[m] = k + 1
    with tifffile.TiffFile(tmp_path / "i.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 3
        got = tif.series[0].asarray()
        assert got.dtype == np.uint32 and (got == expected).all()
        assert (tif.series[0].levels[1].asarray() == expected[::2, ::2]).all()
    classes = tifffile.imread(tmp_path / "c.ome.tif")
    lut = np.array([0] + [e["category_id"] for e in entries])
    assert (classes == lut[expected]).all()
