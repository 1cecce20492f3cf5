"""The export folder's contract: what `cellseg export` writes and the backends read.

DIR/
  cellseg.json                     EXPORT_JSON: checkpoint metadata, weights sha256, files, verification
  model.pt                         CHECKPOINT_COPY: the checkpoint (the torch backend runs the folder too)
  backbone.onnx box_head.onnx mask_head.onnx    FP32 dense graphs (onnx_paths(DIR, "fp32"))
  backbone.fp16.onnx ...           FP16 dense graphs (onnx_paths(DIR, "fp16"))
  backbone.int8.onnx ...           INT8 QDQ dense graphs (onnx_paths(DIR, "int8")): per-channel INT8
                                   weights, calibrated activations, some layers FP32 (cellseg.json says which)
  model.onnx                       END_TO_END_ONNX: the whole detector in one graph (not run by cellseg)
  backbone.fp32.engine ...         TensorRT engines (engine_paths), each with a sidecar JSON (sidecar_path)

Every ONNX file carries {"metadata", "weights_sha256", "graph", "precision"} as JSON under
METADATA_KEY in its metadata_props; every engine sidecar carries the TensorRT version, GPU and
weights hash it was built with. The graphs' tensor names are fixed here too, so the exporter and
every backend agree on them. The writers live in export/, which imports this module, never the reverse."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.errors import BackendUnavailableError, CheckpointError, InputError

# ---------------------------------------------------------------------------------- graphs
GRAPH_NAMES = ("backbone", "box_head", "mask_head")
# The backbone's outputs: FPN maps feat_<level key>, then RPN objectness_<i> and deltas_<i> per level.
FEATURE_PREFIX = "feat_"
OBJECTNESS_PREFIX = "objectness_"
DELTAS_PREFIX = "deltas_"
BACKBONE_INPUT = "images"
BOX_HEAD_INPUT = "box_features"
MASK_HEAD_INPUT = "mask_features"
BOX_HEAD_OUTPUTS = ("class_logits", "box_regression")
MASK_HEAD_OUTPUTS = ("mask_logits",)


@dataclass(frozen=True)
class GraphIO:
    """Input/output tensor names of one graph; the backbone's output names carry the FPN level keys."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_io_for_levels(level_keys: tuple[str, ...]) -> dict[str, GraphIO]:
    """Tensor names of the three graphs for an FPN whose levels are `level_keys`, in order."""
    levels = range(len(level_keys))
    backbone_out = (tuple(FEATURE_PREFIX + k for k in level_keys)
                    + tuple(f"{OBJECTNESS_PREFIX}{i}" for i in levels)
                    + tuple(f"{DELTAS_PREFIX}{i}" for i in levels))
    return {"backbone": GraphIO((BACKBONE_INPUT,), backbone_out),
            "box_head": GraphIO((BOX_HEAD_INPUT,), BOX_HEAD_OUTPUTS),
            "mask_head": GraphIO((MASK_HEAD_INPUT,), MASK_HEAD_OUTPUTS)}


# ---------------------------------------------------------------------------- folder layout
EXPORT_FORMAT = "cellseg-export-v1"
EXPORT_JSON = "cellseg.json"
CHECKPOINT_COPY = "model.pt"
END_TO_END_ONNX = "model.onnx"
METADATA_KEY = "cellseg"  # ONNX metadata_props key of the graph's {"metadata", "weights_sha256", ...}
PRECISIONS = ("fp32", "fp16", "int8")


def onnx_paths(folder: Path, precision: str = "fp32") -> dict[str, Path]:
    """Graph name -> its ONNX file: `g.onnx` for fp32, `g.<precision>.onnx` otherwise."""
    suffix = "" if precision == "fp32" else f".{precision}"
    return {g: Path(folder) / f"{g}{suffix}.onnx" for g in GRAPH_NAMES}


def engine_paths(folder: Path, precision: str) -> dict[str, Path]:
    """Graph name -> its TensorRT engine file `g.<precision>.engine`."""
    return {g: Path(folder) / f"{g}.{precision}.engine" for g in GRAPH_NAMES}


def artifacts_present(folder: Path) -> dict[str, list[str]]:
    """Backend name -> precisions whose artifacts are all in the export folder (best first)."""
    folder = Path(folder)
    found: dict[str, list[str]] = {}
    # INT8 is lossy (verified within a ΔAP gate, not to float rounding): only when asked for.
    for precision in ("fp16", "fp32", "int8"):
        if all(p.is_file() for p in engine_paths(folder, precision).values()):
            found.setdefault("trt", []).append(precision)
    for precision in ("fp32", "fp16", "int8"):  # fp32 first: onnxruntime's CPU kernels are fp32
        if all(p.is_file() for p in onnx_paths(folder, precision).values()):
            found.setdefault("onnxruntime", []).append(precision)
    if (folder / CHECKPOINT_COPY).is_file():
        found["torch"] = ["fp32"]
    return found


def read_export_json(folder: Path) -> dict[str, Any]:
    """The folder's cellseg.json; CheckpointError (one line) when it is missing or malformed."""
    path = Path(folder) / EXPORT_JSON
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an export folder ({EXPORT_JSON} missing)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__})") from None
    if not isinstance(info, dict) or "metadata" not in info or "weights_sha256" not in info:
        raise CheckpointError(f"{path}: lacks 'metadata' or 'weights_sha256'")
    return info


def onnx_metadata(metadata: dict[str, Any], weights_sha256: str, graph: str, precision: str) -> str:
    """The JSON text stored under METADATA_KEY in an ONNX file's metadata_props."""
    return json.dumps({"metadata": metadata, "weights_sha256": weights_sha256, "graph": graph,
                       "precision": precision}, sort_keys=True)


def check_onnx_metadata(path: Path, graph: str, text: str | None, expected_hash: str | None) -> None:
    """Refuse an ONNX graph whose METADATA_KEY text is missing, names another graph, or records
    other weights than the export's."""
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    found = meta.get("weights_sha256") if isinstance(meta, dict) else None
    if not isinstance(found, str):
        raise CheckpointError(f"{path}: no cellseg metadata in the ONNX file")
    written_as = meta.get("graph")
    if written_as is not None and written_as != graph:
        raise CheckpointError(f"{path}: holds the {written_as} graph, not the {graph} graph")
    check_weights_hash(path, found, expected_hash)


def check_weights_hash(path: Path, found: str | None, expected: str | None) -> None:
    """Refuse an artifact whose weights are not the export's (no check when `expected` is None)."""
    if expected is None or found == expected:
        return
    got = f"{found[:12]}..." if found else "none"
    raise CheckpointError(f"{path}: weights hash {got} differs from the export's {EXPORT_JSON} "
                          f"({expected[:12]}...): it comes from another checkpoint")


# ---------------------------------------------------------------------------- engine profiles
@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile of an engine's single input: shapes min..max."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return cls(str(d["input"]), tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def select_profile(profiles: list[Profile], shape: tuple[int, ...], what: str) -> int:
    """Index of the first profile that admits `shape`; InputError (one line) when none does."""
    for i, p in enumerate(profiles):
        if p.contains(tuple(shape)):
            return i
    ranges = "; ".join(f"{p.input} {list(p.min)}..{list(p.max)}" for p in profiles)
    raise InputError(f"{what}: input shape {list(shape)} is outside the engine's optimisation profile ({ranges}); "
                     f"re-export with --min-size/--max-size covering it")


# ---------------------------------------------------------------------------- engine sidecars
SIDECAR_FORMAT = "cellseg-trt-engine-v1"


def sidecar_path(engine_path: Path) -> Path:
    return Path(engine_path).with_suffix(".json")


def read_sidecar(engine_path: Path) -> dict[str, Any]:
    """The engine's sidecar JSON object; CheckpointError (one line) when missing or not an object."""
    path = sidecar_path(engine_path)
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: engine sidecar unreadable ({type(err).__name__})") from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{path}: engine sidecar is not a JSON object")
    return sidecar


def sidecar_profiles(sidecar: dict[str, Any], path: Path) -> list[Profile]:
    """The optimisation profiles a sidecar records; CheckpointError when there are none or they are malformed."""
    try:
        profiles = [Profile.from_dict(p) for p in sidecar["profiles"]]
    except (KeyError, TypeError, ValueError):
        profiles = []
    if not profiles:
        raise CheckpointError(f"{path}: engine sidecar has no valid optimisation profiles")
    return profiles


def check_sidecar(sidecar: dict[str, Any], path: Path, trt_version: str, gpu_name: str,
                  capability: tuple[int, int], expected_hash: str | None) -> None:
    """Refuse an engine built by another TensorRT, for another GPU, or from other weights."""
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path}: not a cellseg engine sidecar")
    if str(sidecar.get("tensorrt_version")) != str(trt_version):
        raise CheckpointError(f"{path}: engine built with TensorRT {sidecar.get('tensorrt_version')}, "
                              f"running {trt_version}; rebuild it (cellseg export --trt)")
    built_for = sidecar.get("compute_capability")
    if not isinstance(built_for, (list, tuple)) or tuple(built_for) != tuple(capability):
        raise CheckpointError(f"{path}: engine built for compute capability {built_for} "
                              f"({sidecar.get('gpu_name')}), this GPU is {list(capability)} ({gpu_name}); rebuild it")
    found = sidecar.get("weights_sha256")
    check_weights_hash(path, found if isinstance(found, str) else None, expected_hash)


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of the current CUDA device: what an engine is built for."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("CUDA is not available (TensorRT needs an NVIDIA GPU)")
    return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())
