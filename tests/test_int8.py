"""cellseg.export.int8 through `cellseg export --int8`: QDQ graphs with per-channel weights,
calibrated on real pipeline inputs, verified by ΔAP on held-out images, refused beyond the gate,
run by onnxruntime through load_predictor.

The data: synthetic images whose ground truth is the tiny FP32 model's own confident detections,
so FP32 scores AP 1 on them and any INT8 loss shows as a drop (a random-init model scores ~0
against the synthetic cells, where a drop could not show)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from cellseg.cli import app

torch.set_num_threads(1)
runner = CliRunner()
GRAPHS = ("backbone", "box_head", "mask_head")
CALIB, HOLDOUT = 3, 3


@pytest.fixture(scope="module")
def self_labelled(tmp_path_factory, tiny_checkpoint) -> Path:
    """A COCO GT JSON next to 6 synthetic images: the tiny model's top 8 FP32 detections per image."""
    from cellseg.data.images import read_image
    from cellseg.data.synth import synthesize
    from cellseg.pipeline import load_predictor

    root = synthesize(tmp_path_factory.mktemp("int8_data") / "synth", n_train=CALIB + HOLDOUT, n_test=0,
                      seed=3, size=96)
    train = root / "train"
    predictor = load_predictor(tiny_checkpoint, "torch", "cpu")
    images, annotations = [], []
    for image_id, sample in enumerate(sorted(p for p in train.iterdir() if p.is_dir()), start=1):
        image = read_image(sample / "image.tif")
        images.append({"id": image_id, "file_name": f"{sample.name}/image.tif",
                       "height": image.shape[0], "width": image.shape[1]})
        entries = sorted(predictor.predict_coco(image, image_id), key=lambda r: -r["score"])[:8]
        for r in entries:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": r["category_id"],
                                "segmentation": r["segmentation"], "bbox": r["bbox"], "iscrowd": 0,
                                "area": float(max(1.0, r["bbox"][2] * r["bbox"][3]))})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 1, "name": "class1"}, {"id": 2, "name": "class2"}]}
    assert annotations, "the tiny model must detect something for these tests to mean anything"
    path = train / "self_gt.json"
    path.write_text(json.dumps(gt))
    return path


def _export_args(ckpt: Path, out: Path, data: Path, max_drop: float) -> list[str]:
    return ["export", str(ckpt), "--out", str(out), "--int8", "--calib", str(data), "--calib-images", str(CALIB),
            "--holdout-images", str(HOLDOUT), "--max-map-drop", str(max_drop)]


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, tiny_checkpoint, self_labelled) -> Path:
    out = tmp_path_factory.mktemp("int8_export") / "exp"
    result = runner.invoke(app, _export_args(tiny_checkpoint, out, self_labelled, 1.0))
    assert result.exit_code == 0, result.output
    return out


def test_int8_graphs_are_qdq_with_per_channel_weights(int8_export):
    for graph in GRAPHS:
        proto = onnx.load(str(int8_export / f"{graph}.int8.onnx"))
        ops = [n.op_type for n in proto.graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, graph
        inits = {i.name: i for i in proto.graph.initializer}
        weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")}
        per_channel = []
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear" and node.output[0] in weights:  # a layer's weight DQ
                scale = onnx.numpy_helper.to_array(inits[node.input[1]])
                weight = inits[node.input[0]]
                axis = {a.name: a.i for a in node.attribute}.get("axis", 1)
                channels = weight.dims[axis]
                per_channel.append(weight.data_type == onnx.TensorProto.INT8 and scale.shape == (channels,)
                                   and channels > 1)
        assert per_channel and all(per_channel), graph
        meta = json.loads({p.key: p.value for p in proto.metadata_props}["cellseg"])
        assert meta["precision"] == "int8" and meta["graph"] == graph


def test_delta_ap_and_settings_recorded(int8_export, self_labelled):
    info = json.loads((int8_export / "cellseg.json").read_text())
    assert info["graphs"]["int8"] == {g: f"{g}.int8.onnx" for g in GRAPHS}
    report = info["verification"]["int8"]
    held = report["held_out"]
    assert held["images"] == HOLDOUT and held["segm"]["fp32_AP"] > 0.5  # FP32 finds its own detections
    assert held["segm"]["delta_AP"] == pytest.approx(held["segm"]["int8_AP"] - held["segm"]["fp32_AP"])
    assert len(report["calibration"]["images"]) == CALIB
    assert not set(report["calibration"]["images"]) & set(held["image_files"])
    assert report["settings"]["per_channel"] is True and report["max_map_drop"] == 1.0
    kept = report["graphs"]["mask_head"]["kept_fp32"]
    assert kept == ["/mask_predictor/mask_fcn_logits/Conv"]
    assert "/backbone/body/conv1/Conv" in report["graphs"]["backbone"]["kept_fp32"]


def test_refused_beyond_max_map_drop_leaves_nothing(tmp_path, tiny_checkpoint, self_labelled, int8_export):
    held_out = json.loads((int8_export / "cellseg.json").read_text())["verification"]["int8"]["held_out"]
    drop = -held_out["segm"]["delta_AP"]
    assert drop > 0, "INT8 must lose some AP on these images for the gate to be tested"
    out = tmp_path / "refused"
    result = runner.invoke(app, _export_args(tiny_checkpoint, out, self_labelled, drop / 2))
    assert result.exit_code == 6, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "export refused" in lines[0] and "--max-map-drop" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_onnxruntime_runs_int8_through_load_predictor(int8_export):
    from cellseg.artifacts import artifacts_present
    from cellseg.pipeline import load_predictor

    assert artifacts_present(int8_export)["onnxruntime"][-1] == "int8"
    predictor = load_predictor(int8_export, "onnxruntime", "cpu", precision="int8")
    assert predictor.settings["precision"] == "int8"
    assert predictor.settings["graphs"] == {g: f"{g}.int8.onnx" for g in GRAPHS}
    image = np.random.default_rng(0).random((96, 128, 3), dtype=np.float32)
    det = predictor.predict(image)
    assert det.boxes.shape[0] == det.mask_probs.shape[0] > 0
    assert torch.isfinite(det.mask_probs).all()


@pytest.mark.parametrize("bad", ["missing_dir", "not_data.txt"])
def test_bad_calib_path_is_one_line(tmp_path, tiny_checkpoint, bad):
    calib = tmp_path / bad
    if bad.endswith(".txt"):
        calib.write_text("not a COCO file")
    out = tmp_path / "exp"
    result = runner.invoke(app, _export_args(tiny_checkpoint, out, calib, 0.01))
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(calib) in lines[0]
    assert not out.exists()


def test_int8_without_calib_is_refused(tmp_path, tiny_checkpoint):
    result = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--int8"])
    assert result.exit_code == 2 and "--calib" in result.output


def test_tensorrt_int8_plan_is_strongly_typed_without_int8_flag():
    from cellseg.export.tensorrt_build import builder_plan
    from test_tensorrt_backend import fake_tensorrt

    for version in ("10.8.0.43", "11.4.0"):
        plan = builder_plan(fake_tensorrt(version, []), "int8")
        assert plan.network_flag_names == ("STRONGLY_TYPED",) and plan.set_flags == ()
        assert plan.clear_flags == ("TF32",)  # the layers kept FP32 build as FP32


def test_tensorrt_refuses_int8_graphs_of_the_cpu_scheme(tmp_path, int8_export, tiny_weights_hash):
    import shutil

    from cellseg.errors import CheckpointError
    from cellseg.export.tensorrt_build import build_engines
    from helpers import tiny_spec
    from test_tensorrt_backend import fake_tensorrt

    folder = Path(shutil.copytree(int8_export, tmp_path / "copy"))
    with pytest.raises(CheckpointError, match="CPU scheme"):
        build_engines(folder, tiny_spec(), tiny_weights_hash, int8=True, trt=fake_tensorrt("10.8.0", []),
                      gpu=("g", (8, 0)), force=True)
    assert not list(folder.glob("*.engine"))


def test_group_norm_statistics_stay_fp32(tmp_path):
    """The group-averaging convs of an exported GroupNorm compute means, not features: they are
    never quantised, while an ordinary conv is, unless its own rule keeps it."""
    from cellseg.export.int8 import layers_kept_fp32
    from cellseg.export.onnx_graphs import with_exportable_norms

    net = with_exportable_norms(torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3), torch.nn.GroupNorm(4, 16),
                                                    torch.nn.Conv2d(16, 8, 1)))
    path = tmp_path / "gn.onnx"
    torch.onnx.export(net, (torch.rand(1, 4, 9, 9),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    proto = onnx.load(str(path))
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    kept = layers_kept_fp32(proto, ())
    assert len(convs) == 4 and len(kept) == 2
    assert all("/1/" in name for name in kept)  # the GroupNorm's two, not the feature convs
