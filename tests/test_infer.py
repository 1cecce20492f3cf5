"""`cellseg infer` on images of any size: formats, resume, overlays, bad settings (CLI)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from helpers import error_line, invoke

TILED = ["--tile", "128", "--overlap", "32", "--device", "cpu", "--quiet", "--score-thresh", "0.05"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("slide")
    res = invoke("data", "synth", out, "--slide", 320, "--seed", 1)
    assert res.exit_code == 0, res.output
    gt = json.loads((out / "slide_gt.json").read_text())
    assert gt["images"][0]["height"] == 320 and gt["annotations"]
    with tifffile.TiffFile(out / "slide.tif") as tif:
        assert tif.pages[0].is_tiled and tif.series[0].shape == (320, 320, 3)
    return out / "slide.tif"


def test_all_formats_in_one_run(tiny_checkpoint, slide, tmp_path):
    pytest.importorskip("shapely")
    res = invoke("infer", tiny_checkpoint, slide, "--out", tmp_path / "r.json", "--format", "coco,geojson,labels", *TILED)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "r.json").read_text())
    features = json.loads((tmp_path / "slide.geojson").read_text())["features"]
    empty = sum(1 for e in results if e["segmentation"]["counts"] in ("", ) or _area(e) == 0)
    assert len(features) + empty == len(results)
    assert all(e["segmentation"]["size"] == [320, 320] for e in results)
    instances = tifffile.imread(tmp_path / "slide.instances.ome.tif")
    assert instances.shape == (320, 320) and instances.max() <= len(results)
    assert not list(tmp_path.glob(".*"))  # no temp file, no work folder left


def _area(entry) -> int:
    from pycocotools import mask as mask_util

    return int(mask_util.area({"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}))


def test_resume_replays_finished_tiles(tiny_checkpoint, slide, tmp_path, monkeypatch):
    full = tmp_path / "full.json"
    assert invoke("infer", tiny_checkpoint, slide, "--out", full, *TILED).exit_code == 0
    import cellseg.tiling as tiling

    real, calls = tiling.predict_tile, []

    def dies_at_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "predict_tile", dies_at_fourth)
    out = tmp_path / "r.json"
    res = invoke("infer", tiny_checkpoint, slide, "--out", out, *TILED)
    assert res.exit_code == 130 and not out.exists()
    assert (tmp_path / ".r.json.work").is_dir()
    calls.clear()
    monkeypatch.setattr(tiling, "predict_tile", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    res = invoke("infer", tiny_checkpoint, slide, "--out", out, "--resume", *TILED)
    assert res.exit_code == 0, res.output
    n_tiles = len(tiling.plan_tiles(320, 320, 128, 32))
    assert len(calls) == n_tiles - 3
    assert json.loads(out.read_text()) == json.loads(full.read_text())
    assert not (tmp_path / ".r.json.work").exists()


def test_resume_with_other_settings_is_refused(tiny_checkpoint, slide, tmp_path):
    work = tmp_path / ".r.json.work"
    work.mkdir()
    (work / "image000000.jsonl").write_text(json.dumps({"path": "elsewhere"}) + "\n")
    res = invoke("infer", tiny_checkpoint, slide, "--out", tmp_path / "r.json", "--resume", *TILED)
    assert res.exit_code == 2 and "--resume" in error_line(res)


def test_tile_no_larger_than_overlap(tiny_checkpoint, slide, tmp_path):
    res = invoke("infer", tiny_checkpoint, slide, "--out", tmp_path / "r.json", "--tile", 64, "--overlap", 64,
                 "--device", "cpu", "--quiet")
    assert res.exit_code == 2 and "--tile 64" in error_line(res)
    assert not (tmp_path / "r.json").exists()


def test_unknown_format(tiny_checkpoint, slide, tmp_path):
    res = invoke("infer", tiny_checkpoint, slide, "--out", tmp_path / "r.json", "--format", "coco,svg")
    assert res.exit_code == 2 and "geojson" in error_line(res)


def test_overlays_of_same_named_images_do_not_collide(tiny_checkpoint, tmp_path):
    root = tmp_path / "train"
    for name in ("s1", "s2"):
        (root / name).mkdir(parents=True)
        tifffile.imwrite(root / name / "image.tif", np.full((40, 50, 3), 200, np.uint8), photometric="rgb")
    ov = tmp_path / "ov"
    args = ("infer", tiny_checkpoint, tmp_path, "--out", tmp_path / "r.json", "--overlays", ov, "--device", "cpu", "--quiet")
    assert invoke(*args).exit_code == 0
    assert sorted(p.name for p in ov.iterdir()) == ["s1_image.png", "s2_image.png"]
    before = (ov / "s1_image.png").stat().st_mtime_ns
    (tmp_path / "r.json").unlink()
    res = invoke(*args)
    assert res.exit_code == 4 and "s1_image.png" in error_line(res)
    assert (ov / "s1_image.png").stat().st_mtime_ns == before and not (tmp_path / "r.json").exists()
    assert invoke(*args, "--force").exit_code == 0


def test_failure_while_writing_leaves_no_file(tiny_checkpoint, slide, tmp_path, monkeypatch):
    import cellseg.outputs.stream as stream

    real_fdopen = stream.os.fdopen

    class FullDisk:
        def __init__(self, fh):
            self._fh, self.closed = fh, False

        def write(self, text):
            if len(text) > 2:
                raise OSError(28, "No space left on device")
            return self._fh.write(text)

        def close(self):
            self.closed = True
            self._fh.close()

    monkeypatch.setattr(stream.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    res = invoke("infer", tiny_checkpoint, slide, "--out", tmp_path / "r.json", *TILED)
    assert res.exit_code == 8 and "r.json: write failed (No space left on device)" in error_line(res)
    assert not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
