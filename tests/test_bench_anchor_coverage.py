"""cellseg.bench.anchor_coverage: per object size, how many of the model's anchors reach the RPN's
foreground IoU, checked against boxes whose answer is known, and the report it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellseg.bench.anchor_coverage import anchors_for, best_and_counts, main, training_boxes
from cellseg.data.synth import synthesize
from cellseg.errors import OutputExistsError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("anchors") / "data", n_train=3, n_test=0, seed=3, size=64)


def test_a_box_equal_to_an_anchor_is_covered_and_an_off_grid_one_is_not():
    anchors = anchors_for(((8,), (16,), (32,), (64,), (128,)), (1.0,), 128)
    # an 8 px anchor of the stride-4 level is centred on a multiple of 4: [60, 68] is one
    on_grid, off_grid = np.array([[60.0, 60, 68, 68]]), np.array([[62.0, 62, 73, 73]])  # 11 px, shifted
    best, counts = best_and_counts(np.concatenate([on_grid, off_grid]), anchors, (0.7, 0.5))
    assert best[0] == pytest.approx(1.0) and counts[0].tolist() == [1, 1]
    assert best[1] < 0.7 and counts[1, 0] == 0
    two_scales = anchors_for(((8, 11), (16, 23), (32, 45), (64, 91), (128, 181)), (1.0,), 128)
    best2, counts2 = best_and_counts(off_grid, two_scales, (0.7, 0.5))
    assert best2[0] > best[1] and counts2[0, 1] >= counts[1, 1]  # more sizes never lose an anchor


def test_report_rows_grow_with_scales_and_no_silent_overwrite(data, tmp_path):
    sizes, names = training_boxes(data)
    assert sizes.shape[1] == 2 and len(sizes) > 0 and (sizes > 0).all() and names
    args = [str(data), "--scales", "1,2", "--fg", "0.7,0.5", "--objects", "200", "--out-dir", str(tmp_path),
            "--stem", "cover"]
    paths = main(args)
    assert [p.name for p in paths] == ["cover.json", "cover.md", "cover.png"] and all(p.stat().st_size for p in paths)
    rows = json.loads(paths[0].read_text())["rows"]
    one = {(r["size_from"], r["fg_iou"]): r for r in rows if r["scales_per_octave"] == 1}
    two = {(r["size_from"], r["fg_iou"]): r for r in rows if r["scales_per_octave"] == 2}
    assert one.keys() == two.keys() and one
    for key, row in one.items():  # the second scale adds anchors: coverage and positives never drop
        assert two[key]["covered"] >= row["covered"] and two[key]["mean_positives"] >= row["mean_positives"]
        assert 0.0 <= row["covered"] <= 1.0 and row["objects"] > 0
    assert sum(r["objects"] for r in rows if r["scales_per_octave"] == 1 and r["fg_iou"] == 0.5) == min(200, len(sizes))
    assert "| 2 | 0.5 |" in paths[1].read_text()
    with pytest.raises(OutputExistsError, match="cover.json"):
        main(args)


def test_bad_options_are_one_line_errors(data, tmp_path):
    run = subprocess.run([sys.executable, "-m", "cellseg.bench.anchor_coverage", str(data), "--scales", "0",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "--scales" in run.stderr
    assert not list(tmp_path.iterdir())
