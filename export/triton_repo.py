"""`cellseg export-triton EXPORT REPO`: a Triton model repository for a GPU Triton container,
written from a verified export folder.

REPO/
  cellseg_backbone/   config.pbtxt + 1/model.onnx   (onnxruntime_onnx; or 1/model.plan, tensorrt_plan)
  cellseg_box_head/   config.pbtxt + 1/model.onnx
  cellseg_mask_head/  config.pbtxt + 1/model.onnx
  cellseg/            config.pbtxt + 1/model.py + 1/cellseg_model.json   (Python backend, BLS)

`cellseg` has the same interface as `cellseg serve`'s model (image BYTES, optional score_thresh
FP32 and image_id INT64, results BYTES; dynamic batching). Its model.py decodes each image with
cellseg's reader and runs cellseg's own Predictor glue (anchors, proposals, RoIAlign, detection
selection, paste + RLE) through a small Backend whose three calls are BLS requests to the dense
models, so the results are cellseg's by construction. The Python backend's environment needs
cellseg installed (CPU torch is enough: the glue is small next to the dense graphs).

The dense models have max_batch_size 0: their first dimension is the image batch (backbone) or
the RoI count (heads), both variable. Engines (tensorrt_plan) are used only when asked for with
--precision and present in the export folder, and must have been built with the TensorRT of the
Triton container that loads them.
What is checked here: config.pbtxt parses as Triton's ModelConfig protobuf, model.py imports, and
its BLS glue runs under the bundled Triton (tests). What is not: loading the onnxruntime_onnx /
tensorrt_plan models in a GPU Triton container (there is none here)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cellseg.artifacts import GRAPH_NAMES, artifacts_present, engine_paths, onnx_paths, read_export_json
from cellseg.errors import InputError, OutputExistsError
from cellseg.fileio import ensure_writable_folder, make_temp_dir

GLUE_MODEL = "cellseg"
DENSE_PREFIX = "cellseg_"
SPEC_FILE = "cellseg_model.json"
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32"}  # onnx TensorProto -> Triton
_MODEL_PY = Path(__file__).with_name("triton_model.py")


def dense_model_name(graph: str) -> str:
    return DENSE_PREFIX + graph


def _onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph: name, Triton data type, dims (-1 where dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "data_type": _TRITON_TYPES[t.elem_type], "dims": dims})
        return out

    return {"input": describe(graph.input), "output": describe(graph.output)}


def _tensor_block(kind: str, tensors: list[dict[str, Any]]) -> str:
    items = [f'  {{ name: "{t["name"]}" data_type: {t["data_type"]} dims: [ {", ".join(map(str, t["dims"]))} ] }}'
             for t in tensors]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def dense_config(graph: str, io: dict[str, list[dict[str, Any]]], platform: str) -> str:
    return (f'name: "{dense_model_name(graph)}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
            + _tensor_block("input", io["input"]) + _tensor_block("output", io["output"])
            + "instance_group [ { kind: KIND_GPU count: 1 } ]\n")


def glue_config(max_batch_size: int) -> str:
    inputs = [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]},
              {"name": "score_thresh", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
              {"name": "image_id", "data_type": "TYPE_INT64", "dims": [1], "optional": True}]
    items = [f'  {{ name: "{t["name"]}" data_type: {t["data_type"]} dims: [ 1 ]'
             + (" optional: true" if t.get("optional") else "") + " }" for t in inputs]
    return (f'name: "{GLUE_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
            "input [\n" + ",\n".join(items) + "\n]\n"
            + _tensor_block("output", [{"name": "results", "data_type": "TYPE_STRING", "dims": [1]}])
            + "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
            + "instance_group [ { kind: KIND_CPU count: 1 } ]\n")


def choose_artifacts(export_dir: Path, precision: str | None) -> tuple[str, str, dict[str, Path]]:
    """(platform, precision, graph -> file): TensorRT engines when asked for by --precision and
    present, else ONNX graphs of that precision (default fp32)."""
    present = artifacts_present(export_dir)
    if precision is not None and precision not in ("fp32", "fp16"):
        raise InputError(f"--precision {precision!r}: choose fp32 or fp16")
    if precision is not None and precision in present.get("trt", []):
        return "tensorrt_plan", precision, engine_paths(export_dir, precision)
    chosen = precision or "fp32"
    if chosen not in present.get("onnxruntime", []):
        raise InputError(f"{export_dir}: no {chosen} ONNX graphs to put in a Triton repository "
                         f"(present: {', '.join(f'{b} {p}' for b, ps in present.items() for p in ps) or 'none'})")
    return "onnxruntime_onnx", chosen, onnx_paths(export_dir, chosen)


def _fill_repo(folder: Path, export_dir: Path, info: dict[str, Any], platform: str, precision: str,
               files: dict[str, Path], max_batch_size: int) -> None:
    ios = {g: _onnx_io(onnx_paths(export_dir, precision)[g]) for g in GRAPH_NAMES}
    for graph in GRAPH_NAMES:
        model_dir = folder / dense_model_name(graph)
        (model_dir / "1").mkdir(parents=True)
        target = "model.plan" if platform == "tensorrt_plan" else "model.onnx"
        shutil.copy2(files[graph], model_dir / "1" / target)
        (model_dir / "config.pbtxt").write_text(dense_config(graph, ios[graph], platform))
    glue = folder / GLUE_MODEL
    (glue / "1").mkdir(parents=True)
    shutil.copy2(_MODEL_PY, glue / "1" / "model.py")
    spec = info["metadata"].get("model") if isinstance(info["metadata"], dict) else None
    described = {"model": spec, "weights_sha256": info["weights_sha256"], "precision": precision,
                 "platform": platform, "graphs": {g: {"model": dense_model_name(g), **ios[g]} for g in GRAPH_NAMES}}
    (glue / "1" / SPEC_FILE).write_text(json.dumps(described, indent=1))
    (glue / "config.pbtxt").write_text(glue_config(max_batch_size))


def write_triton_repo(export_dir: str | Path, repo: str | Path, precision: str | None = None,
                      max_batch_size: int = 8, force: bool = False) -> Path:
    """Write REPO (see the module docstring) from an export folder; all or nothing."""
    export_dir, repo = Path(export_dir), Path(repo)
    info = read_export_json(export_dir)
    if max_batch_size < 1:
        raise InputError(f"--max-batch-size {max_batch_size}: must be >= 1")
    platform, chosen, files = choose_artifacts(export_dir, precision)
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())) and not force:
        raise OutputExistsError(f"{repo}: already exists (pass --force to overwrite)")
    ensure_writable_folder(repo.parent)
    tmp = make_temp_dir(repo.parent, f".{repo.name}.")
    try:
        _fill_repo(tmp, export_dir, info, platform, chosen, files, max_batch_size)
        if repo.exists():
            shutil.rmtree(repo)
        tmp.rename(repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo
