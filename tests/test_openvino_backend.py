"""The openvino backend: same detections as onnxruntime from the same ONNX graphs (FP32, FP16 and
INT8 QDQ), refuses artifacts of other weights and damaged graphs in one line, and a missing
openvino package is exit 5 with one line."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cellseg.errors import BackendUnavailableError, CheckpointError

torch.set_num_threads(1)
needs_openvino = pytest.mark.skipif(not __import__("importlib").util.find_spec("openvino"),
                                    reason="openvino is not installed")


def assert_close_detections(a, b, box_atol: float, score_atol: float, mask_atol: float) -> None:
    assert a.boxes.shape == b.boxes.shape, f"{a.boxes.shape[0]} vs {b.boxes.shape[0]} detections"
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=box_atol)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=score_atol)
    torch.testing.assert_close(a.mask_probs, b.mask_probs, rtol=0, atol=mask_atol)


def _image(case: str) -> np.ndarray:
    if case == "blank":
        return np.zeros((64, 64, 3), np.float32)
    shape = {"square": (96, 96), "nonsquare": (70, 133), "small_odd": (33, 47)}[case]
    return np.random.default_rng(len(case)).random((*shape, 3), dtype=np.float32)


@needs_openvino
def test_openvino_matches_onnxruntime_on_every_image_shape(tiny_export):
    """One predictor runs several shapes in turn: the dynamic-shape graphs are compiled once."""
    from cellseg.pipeline import load_predictor

    ov_pred = load_predictor(tiny_export, backend="openvino", device="cpu")
    ort_pred = load_predictor(tiny_export, backend="onnxruntime", device="cpu")
    for case in ("square", "nonsquare", "small_odd", "blank", "square"):
        image = _image(case)
        assert_close_detections(ov_pred.predict(image), ort_pred.predict(image),
                                box_atol=1e-3, score_atol=1e-4, mask_atol=1e-4)
    s = ov_pred.settings
    assert s["precision"] == "fp32" and s["graphs"]["backbone"] == "backbone.onnx"
    assert s["PERFORMANCE_HINT"] == "LATENCY" and s["INFERENCE_NUM_THREADS"] >= 1
    assert s["INFERENCE_PRECISION_HINT"] == "f32" and s["openvino"]


@needs_openvino
def test_openvino_runs_the_fp16_graphs(tiny_export):
    from cellseg.pipeline import load_predictor

    half = load_predictor(tiny_export, backend="openvino", device="cpu", precision="fp16")
    full = load_predictor(tiny_export, backend="torch", device="cpu")
    assert half.settings["graphs"]["mask_head"] == "mask_head.fp16.onnx"
    image = np.random.default_rng(9).random((64, 96, 3), dtype=np.float32)
    a, b = half.predict(image), full.predict(image)
    assert a.boxes.dtype == torch.float32 and a.mask_probs.dtype == torch.float32
    # FP16 weights may flip near-tied NMS decisions; most top detections must agree closely.
    dist = torch.cdist(b.boxes[:10], a.boxes).min(dim=1).values
    assert (dist < 0.5).float().mean() >= 0.8


def _quantize_to_qdq(folder: Path) -> None:
    """int8 QDQ graphs beside the FP32 ones (onnx_paths(folder, "int8")), calibrated on random
    inputs, keeping each graph's cellseg metadata: a stand-in for `cellseg export --int8`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from cellseg.artifacts import onnx_paths

    shapes = {"backbone": (1, 3, 64, 64), "box_head": None, "mask_head": None}

    class Reader(CalibrationDataReader):
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{name: rng.random(shape, dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    for graph, src in onnx_paths(folder, "fp32").items():
        proto = onnx.load(str(src))
        inp = proto.graph.input[0]
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        shape = shapes[graph] or (8, *dims[1:])
        dst = onnx_paths(folder, "int8")[graph]
        quantize_static(str(src), str(dst), Reader(inp.name, shape), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
        out = onnx.load(str(dst))
        del out.metadata_props[:]
        out.metadata_props.extend(proto.metadata_props)
        onnx.save(out, str(dst))


@needs_openvino
def test_openvino_runs_int8_qdq_graphs_like_onnxruntime(export_copy):
    from cellseg.backends.base import backend_artifacts
    from cellseg.pipeline import load_predictor

    _quantize_to_qdq(export_copy)
    assert "int8" in backend_artifacts(export_copy)["openvino"]
    ov_pred = load_predictor(export_copy, backend="openvino", device="cpu", precision="int8")
    ort_pred = load_predictor(export_copy, backend="onnxruntime", device="cpu", precision="int8")
    fp32 = load_predictor(export_copy, backend="openvino", device="cpu")
    assert ov_pred.settings["precision"] == "int8"
    assert ov_pred.settings["graphs"]["box_head"] == "box_head.int8.onnx"
    image = _image("square")
    a, b, c = ov_pred.predict(image), ort_pred.predict(image), fp32.predict(image)
    assert a.boxes.shape[0] > 0
    # Two int8 runtimes round differently; both approximate the same FP32 model, so their
    # top detections lie close to each other, and the int8 graphs differ from FP32.
    top = b.boxes[:10]
    assert (torch.cdist(top, a.boxes).min(dim=1).values < 2.0).float().mean() >= 0.8
    assert not (a.boxes.shape == c.boxes.shape and torch.equal(a.boxes, c.boxes))


@needs_openvino
def test_shared_artifacts_and_preference(tiny_export, tmp_path):
    from cellseg.backends.base import BACKEND_PREFERENCE, backend_artifacts
    from cellseg.pipeline import load_predictor

    present = backend_artifacts(tiny_export)
    assert present["openvino"] == present["onnxruntime"] == ["fp32", "fp16"]
    assert BACKEND_PREFERENCE.index("onnxruntime") < BACKEND_PREFERENCE.index("openvino")
    folder = tmp_path / "no_onnx"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("*.onnx"))
    assert "openvino" not in backend_artifacts(folder)
    with pytest.raises(Exception, match="no openvino artifacts"):
        load_predictor(folder, backend="openvino", device="cpu")


@needs_openvino
def test_openvino_refuses_other_weights_and_damaged_graphs(export_copy):
    import json

    import onnx

    from cellseg.pipeline import load_predictor

    proto = onnx.load(str(export_copy / "box_head.onnx"))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["cellseg"])
    meta["weights_sha256"] = "f" * 64
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"cellseg": json.dumps(meta)})
    onnx.save(proto, str(export_copy / "box_head.onnx"))
    with pytest.raises(CheckpointError) as err:
        load_predictor(export_copy, backend="openvino", device="cpu")
    assert "box_head.onnx" in str(err.value) and "hash" in str(err.value) and "\n" not in str(err.value)

    data = (export_copy / "mask_head.onnx").read_bytes()
    (export_copy / "mask_head.onnx").write_bytes(data[: len(data) // 3])
    (export_copy / "box_head.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_predictor(export_copy, backend="openvino", device="cpu")
    assert "box_head.onnx" in str(err.value) and "empty" in str(err.value)
    shutil.copy(export_copy / "box_head.fp16.onnx", export_copy / "box_head.onnx")
    with pytest.raises(CheckpointError) as err:  # the truncated mask head
        load_predictor(export_copy, backend="openvino", device="cpu")
    assert "mask_head.onnx" in str(err.value) and "\n" not in str(err.value)


@needs_openvino
def test_openvino_on_cuda_is_refused_in_one_line(tiny_export):
    from cellseg.pipeline import load_predictor

    with pytest.raises(BackendUnavailableError) as err:
        load_predictor(tiny_export, backend="openvino", device="cuda")
    assert "\n" not in str(err.value)


def test_missing_openvino_is_exit_5_in_one_line(tiny_export, tmp_path, monkeypatch):
    """Without the package (an import of it fails), `--backend openvino` says so and exits 5."""
    import tifffile

    from cellseg.cli import app
    from cellseg.pipeline import backend_class

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    ok, reason = backend_class("openvino").is_available()
    assert not ok and "openvino" in reason and "\n" not in reason
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    result = CliRunner().invoke(app, ["infer", str(tiny_export), str(image), "--backend", "openvino", "--quiet",
                                      "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 5, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cellseg: error:") and "openvino" in lines[0]
    assert not (tmp_path / "r.json").exists()
