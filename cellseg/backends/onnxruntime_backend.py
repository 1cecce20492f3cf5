"""The three graphs on onnxruntime. CPUExecutionProvider by default; CUDAExecutionProvider when
onnxruntime-gpu is installed and the device is CUDA. Tensors are bound by IO binding (on CUDA they
stay on the GPU; on the CPU ORT reads/writes torch's buffers directly, no numpy copies)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cellseg.artifacts import FEATURE_PREFIX, METADATA_KEY, check_onnx_metadata
from cellseg.backends.base import split_backbone_outputs
from cellseg.device import physical_cores, resolve_device
from cellseg.errors import BackendUnavailableError, CheckpointError, InputError


def _torch_to_ort_dtype(dtype: torch.dtype):
    import numpy as np
    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, graph_paths: dict[str, Path], device: str = "auto", expected_hash: str | None = None,
                 intra_op_threads: int | None = None, precision: str = "fp32") -> None:
        ok, reason = self.is_available()
        if not ok:
            raise BackendUnavailableError(reason)
        import onnxruntime as ort

        for graph, path in graph_paths.items():
            if not Path(path).is_file():
                raise CheckpointError(f"{path}: {graph} graph missing")
        self.device = _session_device(device, ort.get_available_providers())
        threads = intra_op_threads or physical_cores()
        options = _session_options(ort, threads)
        if self.device.type == "cuda":
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                                    "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.sessions = {g: _open_session(ort, g, Path(p), options, providers) for g, p in graph_paths.items()}
        for graph, session in self.sessions.items():
            check_onnx_metadata(graph_paths[graph], graph,
                                session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), expected_hash)
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self._inputs = {g: s.get_inputs()[0].name for g, s in self.sessions.items()}
        self.settings: dict[str, Any] = {
            "providers": self.sessions["backbone"].get_providers(), "device": str(self.device),
            "precision": precision, "graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL",
            "intra_op_num_threads": threads, "inter_op_num_threads": 1, "allow_spinning": False, "io_binding": True,
            "graphs": {g: Path(p).name for g, p in graph_paths.items()}, "onnxruntime": ort.__version__}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
        return True, ""

    def _run(self, graph: str, x: Tensor, output_shapes: list[tuple[int, ...]]) -> list[Tensor]:
        """One IO-bound run: input and outputs are torch tensors on self.device, bound by address."""
        session = self.sessions[graph]
        x = x.to(self.device, torch.float32).contiguous()
        binding = session.io_binding()
        dev_type = "cuda" if self.device.type == "cuda" else "cpu"
        dev_id = self.device.index or 0 if dev_type == "cuda" else 0
        binding.bind_input(self._inputs[graph], dev_type, dev_id, _torch_to_ort_dtype(x.dtype),
                           tuple(x.shape), x.data_ptr())
        outputs = [torch.empty(s, dtype=torch.float32, device=self.device) for s in output_shapes]
        for name, out in zip(self._outputs[graph], outputs):
            binding.bind_output(name, dev_type, dev_id, _torch_to_ort_dtype(out.dtype), tuple(out.shape),
                                out.data_ptr())
        if dev_type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch must be ready
        session.run_with_iobinding(binding)
        return outputs

    def run_backbone(self, images: Tensor) -> tuple["OrderedDict[str, Tensor]", list[Tensor], list[Tensor]]:
        names = self._outputs["backbone"]
        shapes = backbone_output_shapes(tuple(images.shape), names, self.sessions["backbone"])
        return split_backbone_outputs(names, self._run("backbone", images, shapes))

    def run_box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        outs = self.sessions["box_head"].get_outputs()
        r = pooled.shape[0]
        shapes = [(r, _require_static(o.shape[1], o.name)) for o in outs]
        logits, deltas = self._run("box_head", pooled, shapes)
        return logits, deltas

    def run_mask_head(self, pooled: Tensor) -> Tensor:
        out = self.sessions["mask_head"].get_outputs()[0]
        shape = (pooled.shape[0], *(_require_static(d, out.name) for d in out.shape[1:]))
        return self._run("mask_head", pooled, [shape])[0]


def _session_device(device: str, providers: list[str]) -> torch.device:
    """`auto` takes CUDA only when onnxruntime has its CUDA provider too; an explicit CUDA device
    without that provider is refused."""
    has_cuda_ep = "CUDAExecutionProvider" in providers
    if device == "auto" and not has_cuda_ep:
        return torch.device("cpu")
    chosen = resolve_device(device)
    if chosen.type == "cuda" and not has_cuda_ep:
        raise BackendUnavailableError("onnxruntime on CUDA needs onnxruntime-gpu "
                                      f"(providers here: {', '.join(providers)})")
    return chosen


def _session_options(ort, threads: int):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's idle threads otherwise busy-wait after each run and take the cores from the torch glue
    # (RPN, RoIAlign) that runs between the graphs: 14% of the time per image on 2 CPU cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _open_session(ort, graph: str, path: Path, options, providers: list[Any]):
    """An InferenceSession for `path`; a file onnxruntime cannot load is a one-line CheckpointError
    in cellseg's words (onnxruntime's own text is several lines of internals)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"{path}: {graph} graph unreadable ({err.strerror or type(err).__name__})") from None
    if size == 0:
        raise CheckpointError(f"{path}: {graph} graph is an empty file; re-export it with `cellseg export`")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own pybind classes, not a common base
        raise CheckpointError(f"{path}: {graph} graph {_load_failure(err)}; "
                              f"re-export it with `cellseg export`") from None


def _load_failure(err: Exception) -> str:
    kind = type(err).__name__
    if kind == "InvalidProtobuf":
        return "is not a valid ONNX file (corrupt or truncated)"
    if kind == "InvalidArgument" and "no graph" in str(err).lower():
        return "holds no ONNX graph (corrupt or truncated)"
    if kind in ("InvalidGraph", "Fail"):
        return "is a damaged ONNX graph that onnxruntime cannot load"
    return f"cannot be loaded by onnxruntime ({kind})"


def _require_static(dim, name: str) -> int:
    if not isinstance(dim, int):
        raise InputError(f"ONNX output {name} has a dynamic dimension {dim!r} where a fixed one is expected")
    return dim


def backbone_output_shapes(image_shape: tuple[int, ...], names: list[str], session) -> list[tuple[int, ...]]:
    """Output shapes of the backbone graph for an input [B,3,H,W], computed from the graph's static
    channel counts and the FPN strides (each level halves the previous one, rounding up, as the
    stride-2 convs / poolings do); IO binding needs the output buffers before the run."""
    b, _, h, w = image_shape
    level_sizes = fpn_level_sizes(h, w, sum(1 for n in names if n.startswith(FEATURE_PREFIX)))
    shapes = []
    per_kind_index: dict[str, int] = {}
    for out in session.get_outputs():
        kind = out.name.rsplit("_", 1)[0]
        i = per_kind_index.get(kind, 0)
        per_kind_index[kind] = i + 1
        channels = _require_static(out.shape[1], out.name)
        shapes.append((b, channels, *level_sizes[i]))
    return shapes


def fpn_level_sizes(h: int, w: int, levels: int, first_stride_log2: int = 2) -> list[tuple[int, int]]:
    """Spatial sizes of FPN levels P2.. (stride 4, 8, ...; the last 'pool' level is P5 halved)."""
    def halve(n: int, times: int) -> int:
        for _ in range(times):
            n = (n + 1) // 2
        return n
    sizes = [(halve(h, first_stride_log2 + i), halve(w, first_stride_log2 + i)) for i in range(levels)]
    return sizes
