"""cellseg.artifacts: the export folder's layout and checks, and that the exporter writes exactly
that layout (so what the backends read is what export/ wrote)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from cellseg.artifacts import (CHECKPOINT_COPY, END_TO_END_ONNX, EXPORT_FORMAT, EXPORT_JSON, GRAPH_NAMES, METADATA_KEY,
                               artifacts_present, check_onnx_metadata, check_weights_hash, engine_paths,
                               graph_io_for_levels, onnx_metadata, onnx_paths, read_export_json)
from cellseg.errors import CheckpointError

torch.set_num_threads(1)

HASH = "ab" * 32


def test_file_names_of_the_layout(tmp_path):
    assert {g: p.name for g, p in onnx_paths(tmp_path).items()} == {
        "backbone": "backbone.onnx", "box_head": "box_head.onnx", "mask_head": "mask_head.onnx"}
    assert onnx_paths(tmp_path, "fp16")["mask_head"] == tmp_path / "mask_head.fp16.onnx"
    assert engine_paths(tmp_path, "fp32")["backbone"] == tmp_path / "backbone.fp32.engine"
    assert list(engine_paths(tmp_path, "fp16")) == list(GRAPH_NAMES) == ["backbone", "box_head", "mask_head"]


def touch(paths) -> None:
    for p in paths:
        p.write_bytes(b"x")


def test_artifacts_present_needs_every_graph(tmp_path):
    assert artifacts_present(tmp_path) == {}
    touch(list(onnx_paths(tmp_path, "fp16").values())[:2])  # mask_head.fp16.onnx missing
    assert artifacts_present(tmp_path) == {}
    touch(onnx_paths(tmp_path, "fp16").values())
    touch(onnx_paths(tmp_path, "fp32").values())
    touch([tmp_path / CHECKPOINT_COPY])
    assert artifacts_present(tmp_path) == {"onnxruntime": ["fp32", "fp16"], "torch": ["fp32"]}
    touch(engine_paths(tmp_path, "fp32").values())
    touch(engine_paths(tmp_path, "fp16").values())
    assert artifacts_present(tmp_path)["trt"] == ["fp16", "fp32"]


@pytest.mark.parametrize("content, words", [
    (None, "not an export folder"), (b"", "unreadable"), (b"{oops", "unreadable"), (b"\xff\xfe\x00", "unreadable"),
    (b"[]", "lacks"), (b'{"metadata": {}}', "lacks"),
])
def test_read_export_json_refuses_in_one_line(tmp_path, content, words):
    if content is not None:
        (tmp_path / EXPORT_JSON).write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_export_json(tmp_path)
    assert words in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_read_export_json_returns_the_object(tmp_path):
    info = {"metadata": {"model": {}}, "weights_sha256": HASH, "format": EXPORT_FORMAT}
    (tmp_path / EXPORT_JSON).write_text(json.dumps(info))
    assert read_export_json(tmp_path) == info


def test_onnx_metadata_checks():
    path = Path("box_head.onnx")
    text = onnx_metadata({"model": {}}, HASH, "box_head", "fp32")
    check_onnx_metadata(path, "box_head", text, HASH)
    check_onnx_metadata(path, "box_head", text, None)  # no export hash to compare with: any hash passes
    for bad in (None, "", "{", "[]", json.dumps({"graph": "box_head"}), json.dumps({"weights_sha256": 3})):
        with pytest.raises(CheckpointError, match="box_head.onnx: no cellseg metadata"):
            check_onnx_metadata(path, "box_head", bad, HASH)
    with pytest.raises(CheckpointError, match="holds the box_head graph, not the mask_head graph"):
        check_onnx_metadata(Path("mask_head.onnx"), "mask_head", text, HASH)
    with pytest.raises(CheckpointError) as err:
        check_onnx_metadata(path, "box_head", text, "cd" * 32)
    assert str(err.value) == (f"box_head.onnx: weights hash {HASH[:12]}... differs from the export's "
                              f"cellseg.json ({'cd' * 6}...): it comes from another checkpoint")


def test_check_weights_hash():
    check_weights_hash(Path("model.pt"), HASH, HASH)
    check_weights_hash(Path("model.pt"), None, None)
    with pytest.raises(CheckpointError, match="model.pt: weights hash none differs"):
        check_weights_hash(Path("model.pt"), None, HASH)


def test_graph_io_names():
    io = graph_io_for_levels(("0", "1", "pool"))
    assert io["backbone"].inputs == ("images",)
    assert io["backbone"].outputs == ("feat_0", "feat_1", "feat_pool", "objectness_0", "objectness_1",
                                      "objectness_2", "deltas_0", "deltas_1", "deltas_2")
    assert io["box_head"].outputs == ("class_logits", "box_regression")
    assert io["mask_head"].inputs == ("mask_features",) and io["mask_head"].outputs == ("mask_logits",)


def test_exporter_writes_the_contract(tiny_export, tiny_weights_hash):
    """What export/ writes is what cellseg.artifacts describes, file by file and name by name."""
    info = read_export_json(tiny_export)
    assert info["format"] == EXPORT_FORMAT and info["weights_sha256"] == tiny_weights_hash
    assert info["checkpoint"] == CHECKPOINT_COPY and info["end_to_end"] == END_TO_END_ONNX
    for precision in ("fp32", "fp16"):
        paths = onnx_paths(tiny_export, precision)
        assert info["graphs"][precision] == {g: p.name for g, p in paths.items()}
        for graph, path in paths.items():
            proto = onnx.load(str(path), load_external_data=False)
            text = {p.key: p.value for p in proto.metadata_props}[METADATA_KEY]
            check_onnx_metadata(path, graph, text, tiny_weights_hash)
            assert json.loads(text)["precision"] == precision
            io = info["verification"]["io"][graph]
            assert [i.name for i in proto.graph.input] == io["inputs"]
            assert [o.name for o in proto.graph.output] == io["outputs"]
    levels = tuple(n[len("feat_"):] for n in info["verification"]["io"]["backbone"]["outputs"] if n.startswith("feat_"))
    expected = graph_io_for_levels(levels)
    assert {g: {"inputs": list(v.inputs), "outputs": list(v.outputs)} for g, v in expected.items()} \
        == info["verification"]["io"]
    assert set(artifacts_present(tiny_export)) == {"onnxruntime", "torch"}


def test_torch_graph_modules_match_the_names(tiny_checkpoint):
    from cellseg.checkpoint import load_checkpoint
    from cellseg.graphs import feature_keys, graph_io, graph_modules
    from cellseg.model import model_from_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(ckpt.state_dict, ckpt.spec).eval()
    keys = feature_keys(model)
    assert keys == ("0", "1", "2", "3", "pool")
    io = graph_io(model)
    assert io == graph_io_for_levels(keys)
    with torch.no_grad():
        outputs = graph_modules(model)["backbone"](torch.zeros(1, 3, 64, 96))
    assert len(outputs) == len(io["backbone"].outputs) == 3 * len(keys)
