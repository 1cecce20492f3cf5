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
    recall = metrics["segm"]["per_class_recall"]
    assert all(r["found"] == r["named"] == 1.0 for r in recall.values() if r["gt"])
    assert sum(r["gt"] for r in recall.values()) == len(data["annotations"])
    assert "named (own class)" in res.output
    by_size = metrics["segm"]["per_size_recall"]
    assert sum(r["gt"] for r in by_size) == len(data["annotations"]) and all(r["found"] == 1.0 for r in by_size)
    assert "per object size" in res.output
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


TINY = ["--set", "rpn_pre_nms_top_n_train=64", "--set", "rpn_post_nms_top_n_train=64",
        "--set", "rpn_pre_nms_top_n_test=64", "--set", "rpn_post_nms_top_n_test=64",
        "--set", "box_batch_size_per_image=32", "--set", "rpn_batch_size_per_image=32",
        "--set", "box_detections_per_img=64"]


def test_train_infer_eval_end_to_end(synth_root, tmp_path):
    run = tmp_path / "run"
    res = invoke("train", synth_root, "--out", run, "--epochs", 1, "--max-iters-per-epoch", 2,
                 "--device", "cpu", "--val-fraction", 0.3, *TINY)
    assert res.exit_code == 0, res.output
    assert (run / "best.pt").exists() and (run / "last.pt").exists()
    # a second fresh run into the same folder is refused, and the checkpoint is kept
    before = (run / "last.pt").read_bytes()
    res = invoke("train", synth_root, "--out", run, "--epochs", 1, *TINY)
    assert res.exit_code == 4 and (run / "last.pt").read_bytes() == before

    results = tmp_path / "results.json"
    res = invoke("infer", run / "best.pt", synth_root / "test_release", "--out", results, "--quiet",
                 "--id-map", synth_root / "test_image_name_to_ids.json", "--overlays", tmp_path / "ov")
    assert res.exit_code == 0, res.output
    entries = json.loads(results.read_text())
    id_map = {e["file_name"]: e for e in json.loads((synth_root / "test_image_name_to_ids.json").read_text())}
    for e in entries:
        assert set(e) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert e["category_id"] in (1, 2, 3, 4) and len(e["bbox"]) == 4
    sizes = {v["id"]: [v["height"], v["width"]] for v in id_map.values()}
    assert all(e["segmentation"]["size"] == sizes[e["image_id"]] for e in entries)
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == sorted(Path(n).stem + ".png" for n in id_map)

    # never overwrite results silently; --force does
    res = invoke("infer", run / "best.pt", synth_root / "test_release", "--out", results, "--quiet")
    assert res.exit_code == 4 and "--force" in one_line_error(res)
    res = invoke("infer", run / "best.pt", synth_root / "test_release", "--out", results, "--quiet", "--force",
                 "--id-map", synth_root / "test_image_name_to_ids.json")
    assert res.exit_code == 0, res.output

    metrics = tmp_path / "metrics.json"
    res = invoke("eval", results, "--gt", synth_root / "test_annotations.json", "--json", metrics)
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert 0.0 <= m["segm"]["AP"] <= 1.0 and m["segm"]["max_dets"] >= 100

    # bad inputs: unknown backend, trt on a CPU machine, an id map that lacks a file, a corrupt image
    res = invoke("infer", run / "best.pt", synth_root / "test_release", "--out", tmp_path / "r2.json", "--backend", "tpu")
    assert res.exit_code == 2 and "onnxruntime" in one_line_error(res)
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps([{"file_name": "other.tif", "id": 1, "height": 5, "width": 5}]))
    res = invoke("infer", run / "best.pt", synth_root / "test_release", "--out", tmp_path / "r3.json", "--id-map", bad_map)
    assert res.exit_code == 2 and ".tif" in one_line_error(res)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage")
    res = invoke("infer", run / "best.pt", corrupt, "--out", tmp_path / "r4.json", "--quiet")
    assert res.exit_code == 2 and "corrupt.tif" in one_line_error(res)
    assert not (tmp_path / "r4.json").exists()
    res = invoke("train", synth_root, "--out", tmp_path / "run2", "--set", "no_such_setting=1")
    assert res.exit_code == 2 and "no_such_setting" in one_line_error(res)


def test_infer_as_subprocess_trt_missing_is_one_line(synth_root, tmp_path):
    run = tmp_path / "run"
    res = invoke("train", synth_root, "--out", run, "--epochs", 1, "--max-iters-per-epoch", 1,
                 "--device", "cpu", "--val-fraction", 0, *TINY)
    assert res.exit_code == 0, res.output
    out = subprocess.run([sys.executable, "-m", "cellseg", "infer", str(run / "best.pt"),
                          str(synth_root / "test_release"), "--out", str(tmp_path / "r.json"), "--backend", "trt"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 5, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "trt" in lines[0]


def test_demo_runs_the_whole_story(tmp_path):
    from cellseg.demo import DemoPlan, run_demo

    plan = DemoPlan(n_train=4, n_test=2, size=64, epochs=1, iters_per_epoch=1, progress=False,
                    model={k.split("=")[0]: int(k.split("=")[1]) for k in TINY[1::2]})
    lines: list[str] = []
    summary = run_demo(tmp_path / "demo", plan=plan, echo=lines.append)
    for key in ("synth", "train", "infer", "eval", "export", "bench", "total"):
        assert key in summary["timings"]
    assert (tmp_path / "demo" / "bench" / "report.md").exists()
    assert (tmp_path / "demo" / "export" / "backbone.onnx").exists()
    assert any("segm AP" in ln for ln in lines)
    with pytest.raises(Exception, match="--force"):
        run_demo(tmp_path / "demo", plan=plan, echo=lines.append)


def test_train_help_gives_the_plain_and_the_cpu_scratch_defaults():
    from cellseg.recipes import RECIPES

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    scratch = RECIPES["cpu-scratch"].train
    line = next(ln for ln in result.output.splitlines() if "--batch-size" in ln)
    assert f"default 2; cpu-scratch: {scratch['batch_size']}" in line
    line = next(ln for ln in result.output.splitlines() if "--lr" in ln)
    assert f"cpu-scratch: {scratch['lr']}" in line
