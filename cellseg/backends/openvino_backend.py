"""The three graphs on OpenVINO's CPU plugin, read from the same ONNX files as onnxruntime (FP32,
FP16, or INT8 QDQ: OpenVINO turns the QuantizeLinear/DequantizeLinear pairs into int8 kernels).

Each graph is compiled once with dynamic shapes (the backbone takes any H,W, the heads any number
of RoIs). Recompiling per shape costs 0.25-1.5 s per graph; the first run of the dynamic model at
a new shape costs ~10-20% more than later ones, and the CPU plugin's runtime cache keeps the
shape-specific kernels, so repeated shapes run at full speed (measured on the light consep model)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cellseg.artifacts import METADATA_KEY, check_onnx_metadata
from cellseg.backends.base import split_backbone_outputs
from cellseg.device import physical_cores, resolve_device
from cellseg.errors import BackendUnavailableError, CheckpointError

OV_DEVICE = "CPU"


def compile_config(threads: int) -> dict[str, Any]:
    """CPU plugin properties. LATENCY: one stream using every core for one image at a time (what
    cellseg's single-image pipeline is). INFERENCE_PRECISION_HINT f32: on AMX / AVX-512-BF16 CPUs the
    plugin would otherwise run FP32 graphs in bf16, so "fp32" would not mean FP32; INT8 QDQ layers
    still run as int8."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, graph_paths: dict[str, Path], device: str = "auto", expected_hash: str | None = None,
                 threads: int | None = None, precision: str = "fp32") -> None:
        ok, reason = self.is_available()
        if not ok:
            raise BackendUnavailableError(reason)
        import openvino as ov

        self.device = _cpu_only(device)
        threads = threads or physical_cores()
        config = compile_config(threads)
        core = ov.Core()
        self.compiled: dict[str, Any] = {}
        self.requests: dict[str, Any] = {}
        self._outputs: dict[str, list[str]] = {}
        for graph, path in graph_paths.items():
            model = _read_model(core, graph, Path(path))
            check_onnx_metadata(Path(path), graph, _onnx_metadata(model), expected_hash)
            compiled = _compile(core, model, graph, Path(path), config)
            self.compiled[graph] = compiled
            self.requests[graph] = compiled.create_infer_request()
            self._outputs[graph] = [o.get_any_name() for o in compiled.outputs]
        backbone = self.compiled["backbone"]
        self.settings: dict[str, Any] = {
            "device": str(self.device), "ov_device": OV_DEVICE, "precision": precision, **config,
            "num_streams": str(backbone.get_property("NUM_STREAMS")),
            "cpu_pinning": bool(backbone.get_property("ENABLE_CPU_PINNING")),
            "dynamic_shapes": True, "isa_capabilities": list(core.get_property(OV_DEVICE, "OPTIMIZATION_CAPABILITIES")),
            "graphs": {g: Path(p).name for g, p in graph_paths.items()}, "openvino": ov.get_version()}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False, "openvino is not installed (pip install 'cellseg[openvino]', or pip install openvino)"
        return True, ""

    def _run(self, graph: str, x: Tensor) -> list[Tensor]:
        """One synchronous run. The input is shared with OpenVINO (no copy); the outputs are
        copied out, since the request reuses its output buffers on the next run."""
        array = x.to(self.device, torch.float32).contiguous().numpy()
        result = self.requests[graph].infer({0: array}, share_inputs=True, share_outputs=False)
        return [torch.from_numpy(result[i]).to(torch.float32) for i in range(len(self._outputs[graph]))]

    def run_backbone(self, images: Tensor) -> tuple["OrderedDict[str, Tensor]", list[Tensor], list[Tensor]]:
        return split_backbone_outputs(self._outputs["backbone"], self._run("backbone", images))

    def run_box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        logits, deltas = self._run("box_head", pooled)
        return logits, deltas

    def run_mask_head(self, pooled: Tensor) -> Tensor:
        return self._run("mask_head", pooled)[0]


def _cpu_only(device: str) -> torch.device:
    """OpenVINO's GPU plugin is for Intel GPUs, which torch does not drive: cellseg runs OpenVINO on
    the CPU. `auto` means the CPU; a CUDA device is refused in one line."""
    if device == "auto":
        return torch.device("cpu")
    chosen = resolve_device(device)  # unknown names: InputError; CUDA without a GPU: its own reason
    if chosen.type != "cpu":
        raise BackendUnavailableError(f"the openvino backend runs on the CPU only (got --device {device}); "
                                      "use --device cpu or auto")
    return chosen


def _read_model(core, graph: str, path: Path):
    """The ONNX file read by OpenVINO; a missing, empty or damaged file is one CheckpointError line
    (OpenVINO's own text is several lines of its internals)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"{path}: {graph} graph unreadable ({err.strerror or type(err).__name__})") from None
    if size == 0:
        raise CheckpointError(f"{path}: {graph} graph is an empty file; re-export it with `cellseg export`")
    try:
        return core.read_model(str(path))
    except Exception as err:  # OpenVINO raises plain RuntimeErrors for every kind of bad file
        raise CheckpointError(f"{path}: {graph} graph cannot be read by openvino "
                              f"({_first_line(err)}); re-export it with `cellseg export`") from None


def _compile(core, model, graph: str, path: Path, config: dict[str, Any]):
    try:
        return core.compile_model(model, OV_DEVICE, config)
    except Exception as err:  # as above: one line in cellseg's words
        raise CheckpointError(f"{path}: {graph} graph cannot be compiled by openvino ({_first_line(err)})") from None


def _onnx_metadata(model) -> str | None:
    """The ONNX metadata_props entry METADATA_KEY, which OpenVINO's ONNX reader keeps in the
    model's rt_info under "framework"."""
    if not model.has_rt_info(["framework", METADATA_KEY]):
        return None
    return str(model.get_rt_info(["framework", METADATA_KEY]).astype(str))


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return (lines[0] if lines else type(err).__name__)[:200]
