"""The CLI as a user runs it: CliRunner for the commands, a subprocess for the entry points."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from cellseg.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("cellseg: error:"), result.output
    return lines[-1]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "synth"
    res = invoke("data", "synth", root, "--n-train", 4, "--n-test", 2, "--size", 96, "--seed", 3)
    assert res.exit_code == 0, res.output
    return root


def test_entry_points_run_as_subprocess():
    for cmd in ([sys.executable, "-m", "cellseg", "--help"],):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for name in ("train", "infer", "eval", "export", "bench", "demo", "data"):
            assert name in out.stdout


def test_subprocess_error_is_one_line_with_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cellseg", "data", "convert", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "gt.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    err = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "nope" in err[0], out.stderr
    assert not (tmp_path / "gt.json").exists()


def test_synth_refuses_existing_folder(synth_root):
    res = invoke("data", "synth", synth_root, "--n-train", 2, "--n-test", 1)
    assert res.exit_code == 4
    assert str(synth_root) in one_line_error(res)


def test_convert_then_eval_gt_against_itself_is_perfect(synth_root, tmp_path):
    gt = tmp_path / "gt.json"
    res = invoke("data", "convert", synth_root, "--out", gt)
    assert res.exit_code == 0, res.output
    data = json.loads(gt.read_text())
    assert len(data["images"]) == 4 and data["annotations"]
    # converting again without --force refuses and keeps the file
    before = gt.read_bytes()
    res = invoke("data", "convert", synth_root, "--out", gt)
    assert res.exit_code == 4 and gt.read_bytes() == before
    # GT as results (score 1) scores AP 1.0
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in data["annotations"]]
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(results))
    metrics_path = tmp_path / "metrics.json"
    res = invoke("eval", res_path, "--gt", gt, "--json", metrics_path)
    assert res.exit_code == 0, res.output
    metrics = json.loads(metrics_path.read_text())
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    # the HW3 root works as --gt too
    res = invoke("eval", res_path, "--gt", synth_root / "train")
    assert res.exit_code == 0, res.output


def test_bad_inputs_exit_non_zero_with_the_file_named(tmp_path, synth_root):
    bad = tmp_path / "bad" / "train" / "s1"
    bad.mkdir(parents=True)
    tifffile.imwrite(bad / "image.tif", np.zeros((8, 9, 3), np.uint8))
    tifffile.imwrite(bad / "class1.tif", np.ones((8, 8), np.uint16))
    res = invoke("data", "convert", tmp_path / "bad", "--out", tmp_path / "gt.json")
    assert res.exit_code == 2
    assert "class1.tif" in one_line_error(res)
    assert not (tmp_path / "gt.json").exists()

    res = invoke("eval", tmp_path / "missing.json", "--gt", synth_root)
    assert res.exit_code == 2 and "missing.json" in one_line_error(res)

    (tmp_path / "broken.json").write_text("[{")
    res = invoke("eval", tmp_path / "broken.json", "--gt", synth_root)
    assert res.exit_code == 2 and "broken.json" in one_line_error(res)

    res = invoke("train", synth_root, "--out", tmp_path / "run", "--arch", "resnet9000")
    assert res.exit_code == 2 and "resnet9000" in one_line_error(res)
