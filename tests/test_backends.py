"""Backends behind one interface: onnxruntime matches torch through the shared pipeline on several
image sizes (square, non-square, blank), artifacts with other weights are refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cellseg.errors import CheckpointError, InputError

torch.set_num_threads(1)


@pytest.fixture
def export_dir(tiny_export) -> Path:
    """conftest's session export (FP32 + FP16 graphs, model.pt); tests that change it copy it first."""
    return tiny_export


def assert_same_detections(a, b, box_atol: float, score_atol: float, mask_atol: float) -> None:
    assert a.boxes.shape == b.boxes.shape, f"{a.boxes.shape[0]} vs {b.boxes.shape[0]} detections"
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=box_atol)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=score_atol)
    torch.testing.assert_close(a.mask_probs, b.mask_probs, rtol=0, atol=mask_atol)


IMAGES = {"square": (96, 96), "nonsquare": (70, 133), "small_odd": (33, 47)}


def test_export_folder_prefers_onnxruntime_on_cpu(export_dir):
    from cellseg.pipeline import load_predictor

    predictor = load_predictor(export_dir, device="cpu")
    assert predictor.backend_name == "onnxruntime"
    settings = predictor.settings
    assert settings["providers"] == ["CPUExecutionProvider"]
    assert settings["graph_optimization_level"] == "ORT_ENABLE_ALL" and settings["intra_op_num_threads"] >= 1


@pytest.mark.parametrize("case", list(IMAGES) + ["blank"])
def test_onnxruntime_matches_torch(export_dir, case):
    from cellseg.pipeline import load_predictor

    ort_pred = load_predictor(export_dir, backend="onnxruntime", device="cpu")
    torch_pred = load_predictor(export_dir, backend="torch", device="cpu")
    if case == "blank":
        image = np.zeros((64, 64, 3), np.float32)
    else:
        image = np.random.default_rng(len(case)).random((*IMAGES[case], 3), dtype=np.float32)
    a, b = ort_pred.predict(image), torch_pred.predict(image)
    assert_same_detections(a, b, box_atol=1e-3, score_atol=1e-4, mask_atol=1e-4)


def test_onnxruntime_fp16_graphs_run_close_to_torch(export_dir):
    from cellseg.pipeline import load_predictor

    half = load_predictor(export_dir, backend="onnxruntime", device="cpu", precision="fp16")
    full = load_predictor(export_dir, backend="torch", device="cpu")
    assert half.settings["graphs"]["backbone"] == "backbone.fp16.onnx"
    image = np.random.default_rng(9).random((64, 96, 3), dtype=np.float32)
    a, b = half.predict(image), full.predict(image)
    # FP16 may flip near-tied NMS decisions; most top detections must agree closely.
    top = b.boxes[:10]
    dist = torch.cdist(top, a.boxes).min(dim=1).values
    assert (dist < 0.5).float().mean() >= 0.8


def test_onnx_graph_from_other_weights_is_refused(export_dir, tmp_path):
    from cellseg.pipeline import load_predictor

    folder = tmp_path / "mixed"
    shutil.copytree(export_dir, folder)
    proto = onnx.load(str(folder / "box_head.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["cellseg"])
    meta["weights_sha256"] = "f" * 64
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"cellseg": json.dumps(meta)})
    onnx.save(proto, str(folder / "box_head.onnx"))
    with pytest.raises(CheckpointError) as err:
        load_predictor(folder, backend="onnxruntime", device="cpu")
    assert "box_head.onnx" in str(err.value) and "hash" in str(err.value) and "\n" not in str(err.value)


def test_onnx_without_metadata_is_refused(export_dir, tmp_path):
    from cellseg.pipeline import load_predictor

    folder = tmp_path / "bare"
    shutil.copytree(export_dir, folder)
    proto = onnx.load(str(folder / "mask_head.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(folder / "mask_head.onnx"))
    with pytest.raises(CheckpointError, match="no cellseg metadata"):
        load_predictor(folder, backend="onnxruntime", device="cpu")


def test_backend_choice_follows_artifacts(export_dir, tmp_path):
    from cellseg.artifacts import artifacts_present
    from cellseg.pipeline import load_predictor

    folder = tmp_path / "onnx_only"
    shutil.copytree(export_dir, folder)
    (folder / "model.pt").unlink()
    assert set(artifacts_present(folder)) == {"onnxruntime"}
    with pytest.raises(InputError, match="no torch artifacts"):
        load_predictor(folder, backend="torch", device="cpu")
    with pytest.raises(InputError, match="no fp8 artifacts"):
        load_predictor(folder, backend="onnxruntime", device="cpu", precision="fp8")


def test_fpn_level_sizes_match_the_graph(export_dir):
    """IO binding pre-allocates outputs from fpn_level_sizes: check it against onnxruntime's own run."""
    import onnxruntime as ort

    from cellseg.backends.onnxruntime_backend import backbone_output_shapes

    session = ort.InferenceSession(str(export_dir / "backbone.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((64, 64), (96, 160), (32, 224)):
        x = np.zeros((1, 3, h, w), np.float32)
        got = [o.shape for o in session.run(None, {"images": x})]
        names = [o.name for o in session.get_outputs()]
        assert [tuple(s) for s in got] == backbone_output_shapes((1, 3, h, w), names, session)


def test_physical_cores_positive():
    from cellseg.device import physical_cores

    assert physical_cores() >= 1


# ------------------------------------------------------------------ damaged artifacts
def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"this is not an ONNX graph\n" * 40)


DAMAGES = [("empty", "box_head.onnx", "empty file"), ("truncated", "backbone.onnx", "corrupt or truncated"),
           ("garbage", "mask_head.onnx", "corrupt or truncated")]


@pytest.mark.parametrize("how, name, words", DAMAGES)
def test_damaged_onnx_graph_is_a_one_line_checkpoint_error(export_copy, how, name, words):
    from cellseg.pipeline import load_predictor

    damage(export_copy / name, how)
    with pytest.raises(CheckpointError) as err:
        load_predictor(export_copy, backend="onnxruntime", device="cpu")
    message = str(err.value)
    assert message.startswith(str(export_copy / name)) and words in message
    assert "\n" not in message and "ONNXRuntimeError" not in message


def test_graph_file_holding_another_graph_is_refused(export_copy):
    from cellseg.pipeline import load_predictor

    shutil.copy2(export_copy / "mask_head.onnx", export_copy / "box_head.onnx")
    with pytest.raises(CheckpointError, match="box_head.onnx: holds the mask_head graph, not the box_head graph"):
        load_predictor(export_copy, backend="onnxruntime", device="cpu")


def write_test_image(folder: Path) -> Path:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cells.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    return path


@pytest.mark.parametrize("how, name, words", DAMAGES)
def test_infer_cli_on_damaged_onnx_exits_3_in_one_line(export_copy, tmp_path, how, name, words):
    from typer.testing import CliRunner

    from cellseg.cli import app

    damage(export_copy / name, how)
    image = write_test_image(tmp_path / "images")
    out = tmp_path / "results.json"
    res = CliRunner().invoke(app, ["infer", str(export_copy), str(image), "--out", str(out), "--quiet",
                                   "--device", "cpu"])
    assert res.exit_code == 3, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cellseg: error:") and name in lines[0] and words in lines[0]
    assert not out.exists()


def test_bench_cli_on_damaged_onnx_exits_3_naming_the_file(export_copy, tmp_path):
    """The broken row is reported (the reference row still runs) and the run ends in one error line."""
    from typer.testing import CliRunner

    from cellseg.cli import app
    from cellseg.data.synth import synthesize

    damage(export_copy / "backbone.onnx", "truncated")
    data = synthesize(tmp_path / "data", n_train=1, n_test=1, seed=0, size=64)
    res = CliRunner().invoke(app, ["bench", str(export_copy), "--data", str(data), "--backends", "onnxruntime",
                                   "--device", "cpu", "--warmup", "0", "--iters", "1"])
    assert res.exit_code == 3 and isinstance(res.exception, SystemExit), res.output
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert last.startswith("cellseg: error:") and "backbone.onnx" in last and "corrupt or truncated" in last
    assert "Traceback" not in res.output and "ONNXRuntimeError" not in res.output
