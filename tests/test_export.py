"""cellseg.export: the three dense graphs (FP32 and FP16) and model.onnx are written, verified,
carry the checkpoint metadata, contain only TensorRT-parser-native ops; failures leave nothing."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import onnx
import pytest
import torch

from cellseg.errors import BackendUnavailableError, OutputExistsError, VerificationError
from helpers import tiny_spec

torch.set_num_threads(1)

GRAPHS = ("backbone", "box_head", "mask_head")

# ONNX ops the TensorRT ONNX parser imports natively (no plugin), from onnx-tensorrt's
# docs/operators.md ("Supported ONNX Operators", TensorRT 10.x, column Supported = Y):
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
# Only the ops a conv/FPN/MLP network plausibly needs are listed; anything else must be reviewed.
TENSORRT_NATIVE_OPS = frozenset({
    "Abs", "Add", "And", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor",
    "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "Identity", "LeakyRelu", "Less", "Log",
    "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Not", "Pad", "Pow", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Softmax", "Split",
    "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})
# Dynamic / data-dependent ops the dense graphs must not contain (they stay in torchvision's code,
# run by the pipeline): TensorRT rejects or restricts them (If with different-rank branches, growing
# Loop outputs, TopK K >= 3840, ...).
FORBIDDEN_OPS = frozenset({"Loop", "If", "NonZero", "NonMaxSuppression", "RoiAlign", "TopK"})
# Resize modes the parser supports (operators.md, Resize row).
TRT_RESIZE_MODES = {"nearest", "linear"}
TRT_RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}


@pytest.fixture
def exported(tiny_checkpoint, tiny_export) -> tuple[Path, Path]:
    """(checkpoint, its export folder): conftest's session export, written with fp16=True."""
    return tiny_checkpoint, tiny_export


def test_export_writes_every_file_with_metadata(exported):
    from cellseg.checkpoint import load_checkpoint, weights_hash

    ckpt_path, out = exported
    ckpt = load_checkpoint(ckpt_path)
    digest = weights_hash(ckpt.state_dict)
    names = {p.name for p in out.iterdir()}
    expected = {f"{g}{s}.onnx" for g in GRAPHS for s in ("", ".fp16")} | {"model.onnx", "model.pt", "cellseg.json"}
    assert names == expected  # and no temporary leftovers
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    info = json.loads((out / "cellseg.json").read_text())
    assert info["weights_sha256"] == digest and info["metadata"] == ckpt.metadata
    for name in expected - {"model.pt", "cellseg.json"}:
        proto = onnx.load(str(out / name), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        meta = json.loads(props["cellseg"])
        assert meta["weights_sha256"] == digest and meta["metadata"] == ckpt.metadata
        onnx.checker.check_model(proto)


def test_verification_report_within_stated_tolerances(exported):
    from cellseg.export.verify import FP16_TOLERANCE, FP32_TOLERANCE

    info = json.loads((exported[1] / "cellseg.json").read_text())
    report = info["verification"]
    assert report["fp32"]["tolerance"] == FP32_TOLERANCE and report["fp16"]["tolerance"] == FP16_TOLERANCE
    for precision, tol in (("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)):
        for graph in GRAPHS:
            entry = report[precision]["graphs"][graph]
            assert 0 <= entry["max_error"] <= tol
            cases = " ".join(entry["cases"])
            assert "nonsquare" in cases and "blank" in cases and "square" in cases
    assert report["end_to_end"]["max_error"] <= report["end_to_end"]["tolerance"]


def test_a_narrow_fpn_exports_and_verifies(tmp_path):
    from cellseg.export.exporter import export_model
    from helpers import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "narrow.pt", tiny_spec(fpn_channels=32))
    out = export_model(ckpt, tmp_path / "export")
    report = json.loads((out / "cellseg.json").read_text())["verification"]
    assert all(report["fp32"]["graphs"][g]["max_error"] <= report["fp32"]["tolerance"] for g in GRAPHS)
    assert report["end_to_end"]["max_error"] <= report["end_to_end"]["tolerance"]


@pytest.mark.parametrize("shape", [(0, 32, 14, 14), (3, 64, 7, 5), (1, 16, 1, 1)])
def test_reshape_free_group_norm_is_group_norm(shape):
    from cellseg.export.onnx_graphs import ReshapeFreeGroupNorm

    ref = torch.nn.GroupNorm(8, shape[1])
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    swapped = ReshapeFreeGroupNorm(8, shape[1])
    swapped.load_state_dict(ref.state_dict())  # the group-average buffer is not part of the state
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    torch.testing.assert_close(swapped(x), ref(x), atol=1e-5, rtol=1e-5)


def test_group_norm_model_runs_on_an_image_without_detections(tmp_path):
    """GroupNorm in the mask head meets zero RoIs on an image without detections; the ONNX graphs
    must run there (onnxruntime's optimiser makes torch's GroupNorm reshape fail on N = 0)."""
    import numpy as np
    import onnxruntime as ort

    from cellseg.export.exporter import export_model
    from helpers import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "gn.pt", tiny_spec(norm="gn", fpn_channels=32, box_score_thresh=0.999))
    out = export_model(ckpt, tmp_path / "export")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    boxes, labels, scores, masks = session.run(None, {"image": np.zeros((3, 64, 80), np.float32)})
    assert boxes.shape == (0, 4) and masks.shape[0] == 0
    mask_head = ort.InferenceSession(str(next(out.glob("mask_head*.onnx"))), providers=["CPUExecutionProvider"])
    name = mask_head.get_inputs()[0].name
    channels = mask_head.get_inputs()[0].shape[1]
    assert mask_head.run(None, {name: np.zeros((0, channels, 14, 14), np.float32)})[0].shape[0] == 0


def test_graphs_have_dynamic_axes(exported):
    out = exported[1]
    backbone = onnx.load(str(out / "backbone.onnx"))
    dims = backbone.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    for graph in ("box_head", "mask_head"):
        proto = onnx.load(str(out / f"{graph}.onnx"))
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "rois"


@pytest.mark.parametrize("precision", ["", ".fp16"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_dense_graphs_use_only_tensorrt_native_ops(exported, graph, precision):
    proto = onnx.load(str(exported[1] / f"{graph}{precision}.onnx"))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert not set(ops) & FORBIDDEN_OPS, f"forbidden ops {set(ops) & FORBIDDEN_OPS}"
    assert set(ops) <= TENSORRT_NATIVE_OPS, f"ops outside the TensorRT allow-list: {set(ops) - TENSORRT_NATIVE_OPS}"
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # no custom (plugin) domains
    for node in proto.graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("mode", b"nearest").decode() in TRT_RESIZE_MODES
            assert attrs.get("coordinate_transformation_mode", b"half_pixel").decode() in TRT_RESIZE_TRANSFORMS
    if precision:
        convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
        weights = {i.name: i.data_type for i in proto.graph.initializer}
        assert convs and all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


def test_end_to_end_graph_has_no_paste_loop(exported):
    proto = onnx.load(str(exported[1] / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert "Loop" not in ops
    assert [o.name for o in proto.graph.output] == ["boxes", "labels", "scores", "mask_probs"]


def test_end_to_end_graph_runs_on_other_sizes(exported):
    import onnxruntime as ort

    from cellseg.export.end_to_end import EndToEnd, match_detections
    from cellseg.model import model_from_checkpoint
    from cellseg.checkpoint import load_checkpoint

    ckpt = load_checkpoint(exported[0])
    model = model_from_checkpoint(ckpt.state_dict, ckpt.spec)
    session = ort.InferenceSession(str(exported[1] / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 77, 50, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = [t.numpy() for t in EndToEnd(model)(x)]
    assert got[3].shape[1:] == (1, 28, 28) and got[0].shape[0] == ref[0].shape[0] > 0
    matched, worst = match_detections(got, ref, 1e-3)
    assert matched >= 0.99 * len(ref[0]) and worst <= 1e-3
    shuffled = [a[::-1] for a in got]  # the matching is order-free, and not trivially true:
    assert match_detections(shuffled, ref, 1e-3)[0] == matched
    assert match_detections([got[0] + 5.0, *got[1:]], ref, 1e-3)[0] == 0


def test_existing_output_refused_without_force(exported):
    from cellseg.export.exporter import export_model

    ckpt, out = exported
    with pytest.raises(OutputExistsError, match="--force"):
        export_model(ckpt, out)


def test_failed_verification_leaves_nothing(exported, tmp_path, monkeypatch):
    import cellseg.export.exporter as exporter

    monkeypatch.setattr(exporter, "FP32_TOLERANCE", -1.0)  # every graph now "disagrees"
    out = tmp_path / "bad"
    with pytest.raises(VerificationError) as err:
        exporter.export_model(exported[0], out)
    assert "\n" not in str(err.value) and "tolerance" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verification_detects_a_wrong_graph(exported):
    """The checker is real: a mask head graph from other weights is caught."""
    from cellseg.export.verify import FP32_TOLERANCE, OnnxRunner, check_graph
    from cellseg.graphs import graph_io, graph_modules
    from cellseg.model import build_model

    torch.manual_seed(123)
    other = build_model(tiny_spec()).eval()
    runner = OnnxRunner((exported[1] / "mask_head.onnx").read_bytes())
    cases = [("random", torch.randn(2, 256, 14, 14))]
    with pytest.raises(VerificationError, match="mask_head"):
        check_graph("mask_head", graph_modules(other)["mask_head"], runner, cases,
                    graph_io(other)["mask_head"].outputs, FP32_TOLERANCE)


def test_trt_export_without_tensorrt_keeps_onnx(exported, tmp_path):
    from cellseg.export.exporter import export_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "trt"
    with pytest.raises(BackendUnavailableError) as err:
        export_model(exported[0], out, trt=True)
    assert "\n" not in str(err.value) and "ONNX export" in str(err.value)
    assert (out / "backbone.onnx").is_file() and (out / "cellseg.json").is_file()
