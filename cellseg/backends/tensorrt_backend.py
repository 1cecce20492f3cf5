"""The three graphs as TensorRT engines (TensorRT 10.x / 11.x Python API).

Engines are deserialised after their sidecar JSON matches the running TensorRT version, the GPU's
compute capability and the export's weights hash. Torch CUDA tensors are bound by address
(set_input_shape, set_tensor_address) and run with execute_async_v3 on the current torch stream,
so no copies and no extra synchronisation. Image shapes outside the backbone's profile are refused
with a one-line error; RoI batches larger than a head's profile are split into chunks.
Unverified: the GPU path is written to the TensorRT docs and its test (tests/test_tensorrt_backend.py,
marked gpu) has not run on a GPU; the pure Python parts (profile selection, sidecar checks, RoI
chunking) are tested on the CPU."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cellseg.artifacts import (Profile, check_sidecar, gpu_identity, read_sidecar, select_profile, sidecar_path,
                               sidecar_profiles)
from cellseg.backends.base import split_backbone_outputs
from cellseg.device import resolve_device
from cellseg.errors import BackendUnavailableError, CheckpointError, InputError


class TensorRTBackend:
    name = "trt"

    def __init__(self, engine_paths: dict[str, Path], device: str = "auto", expected_hash: str | None = None) -> None:
        ok, reason = self.is_available()
        if not ok:
            raise BackendUnavailableError(reason)
        if device == "cpu":
            raise BackendUnavailableError("the trt backend runs on CUDA only (device cpu was asked for)")
        import tensorrt as trt

        self.device = resolve_device(device)
        with torch.cuda.device(self.device):
            gpu_name, capability = gpu_identity()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._profiles: dict[str, list[Profile]] = {}
        self._io: dict[str, tuple[str, list[str]]] = {}
        precision = None
        for graph, path in engine_paths.items():
            sidecar = self._load_engine(graph, Path(path), gpu_name, capability, expected_hash)
            precision = sidecar.get("precision")
        self.settings: dict[str, Any] = {"device": str(self.device), "gpu": gpu_name, "tensorrt": trt.__version__,
                                         "precision": precision,
                                         "engines": {g: Path(p).name for g, p in engine_paths.items()}}

    def _load_engine(self, graph: str, path: Path, gpu_name: str, capability: tuple[int, int],
                     expected_hash: str | None) -> dict[str, Any]:
        """Check `path`'s sidecar, then deserialise it; returns the sidecar."""
        trt = self._trt
        if not path.is_file():
            raise CheckpointError(f"{path}: {graph} engine missing")
        sidecar = read_sidecar(path)
        check_sidecar(sidecar, path, trt.__version__, gpu_name, capability, expected_hash)
        profiles = sidecar_profiles(sidecar, sidecar_path(path))
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(f"{path}: TensorRT could not deserialise the engine")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise CheckpointError(f"{path}: expected one input tensor, found {inputs}")
        self._engines[graph] = engine
        self._contexts[graph] = engine.create_execution_context()
        self._profiles[graph] = profiles
        self._io[graph] = (inputs[0], [n for n in names if n not in inputs])
        return sidecar

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False, "tensorrt is not installed (pip install tensorrt; needs an NVIDIA GPU)"
        if not torch.cuda.is_available():
            return False, "CUDA is not available (the trt backend needs an NVIDIA GPU)"
        return True, ""

    def _torch_dtype(self, trt_dtype) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool}
        return table[trt_dtype]

    def _execute(self, graph: str, x: Tensor) -> list[Tensor]:
        engine, context = self._engines[graph], self._contexts[graph]
        input_name, output_names = self._io[graph]
        stream = torch.cuda.current_stream(self.device)
        index = select_profile(self._profiles[graph], tuple(x.shape), f"trt {graph}")
        if index != context.active_optimization_profile:
            context.set_optimization_profile_async(index, stream.cuda_stream)
        x = x.to(self.device, self._torch_dtype(engine.get_tensor_dtype(input_name))).contiguous()
        if not context.set_input_shape(input_name, tuple(x.shape)):
            raise InputError(f"trt {graph}: TensorRT refused input shape {list(x.shape)}")
        context.set_tensor_address(input_name, x.data_ptr())
        outputs = []
        for name in output_names:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._torch_dtype(engine.get_tensor_dtype(name)), device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendUnavailableError(f"trt {graph}: execute_async_v3 failed (see TensorRT log)")
        return [o.float() for o in outputs]

    def _execute_rois(self, graph: str, pooled: Tensor) -> list[Tensor]:
        """Heads are per-RoI, so batches beyond the profile's maximum run in chunks."""
        limit = max(p.max[0] for p in self._profiles[graph])
        if pooled.shape[0] <= limit:
            return self._execute(graph, pooled)
        parts = [self._execute(graph, chunk) for chunk in pooled.split(limit)]
        return [torch.cat(outs) for outs in zip(*parts)]

    def run_backbone(self, images: Tensor) -> tuple["OrderedDict[str, Tensor]", list[Tensor], list[Tensor]]:
        return split_backbone_outputs(self._io["backbone"][1], self._execute("backbone", images))

    def run_box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        logits, deltas = self._execute_rois("box_head", pooled)
        return logits, deltas

    def run_mask_head(self, pooled: Tensor) -> Tensor:
        return self._execute_rois("mask_head", pooled)[0]
