"""cellseg.bench.train_step: training-iteration time per mask-head width and RoI pooler, on real
(synthetic) training crops, written as a report that is never silently overwritten."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from cellseg.bench.train_step import fixed_batches, main, variant_model
from cellseg.data.synth import synthesize
from cellseg.errors import OutputExistsError
from cellseg.roi_align import ParallelRoIAlign

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("train_step") / "data", n_train=4, n_test=0, seed=2, size=64)


def test_variants_differ_only_in_mask_head_and_pooler(data):
    batches, names = fixed_batches(data, batch_size=2, crop_size=48)
    assert len(batches) == 2 and all(len(images) == 2 for images, _ in batches)
    parallel, plain = variant_model(batches, names, 8, "parallel"), variant_model(batches, names, 16, "torchvision")
    assert isinstance(parallel.roi_heads.mask_roi_pool, ParallelRoIAlign)
    assert type(plain.roi_heads.mask_roi_pool) is MultiScaleRoIAlign and type(plain.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert parallel.roi_heads.mask_head[0][0].out_channels == 8 and plain.roi_heads.mask_head[0][0].out_channels == 16
    same = [k for k, v in parallel.backbone.state_dict().items() if torch.equal(v, plain.backbone.state_dict()[k])]
    assert len(same) == len(parallel.backbone.state_dict())  # same initial backbone


def test_report_files_and_no_silent_overwrite(data, tmp_path):
    args = [str(data), "--mask-heads", "8,4", "--batch-size", "2", "--crop-size", "48", "--iters", "1",
            "--out-dir", str(tmp_path), "--stem", "step"]
    paths = main(args)
    assert [p.name for p in paths] == ["step.json", "step.md", "step.png"] and all(p.stat().st_size for p in paths)
    report = json.loads(paths[0].read_text())
    assert [(r["mask_head"], r["pooler"]) for r in report["rows"]] == [(8, "torchvision"), (8, "parallel"),
                                                                         (4, "torchvision"), (4, "parallel")]
    assert all(r["median_s"] > 0 and len(r["seconds"]) == 1 for r in report["rows"])
    assert report["rows"][0]["speedup"] == 1.0 and "| 2x4 | parallel |" in paths[1].read_text()
    with pytest.raises(OutputExistsError, match="step.json"):
        main(args)


def test_bad_option_is_one_line_and_writes_nothing(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cellseg.bench.train_step", str(data), "--mask-heads", "wide",
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "cellseg: error: --mask-heads 'wide': expected comma-separated integers"
    assert not (tmp_path / "out").exists()
