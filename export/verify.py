"""Export-time verification: every ONNX graph is run (onnxruntime CPU, or onnx's reference
evaluator where onnxruntime lacks a kernel) on the same inputs as its PyTorch module.

Error measure per output: max|onnx - torch| / max(1, max|torch|) (absolute below magnitude 1,
relative above it, so one number covers logits and large FPN activations).
  FP32 graphs: <= FP32_TOLERANCE (1e-4; measured ~1e-6 on ResNet-18/50 FPN).
  FP16 graphs: <= FP16_TOLERANCE (3e-2; FP16 keeps ~3 significant digits, errors add up over
  ~50 conv layers; measured ~1e-3 on random-init ResNet-18 FPN).
Inputs: the images in `verification_images` (square, non-square, blank) through the torch
pipeline, whose head inputs are recorded, plus random RoI batches of 1 and 5 for each head."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cellseg.backends.torch_backend import TorchBackend
from cellseg.errors import VerificationError
from cellseg.pipeline import Predictor

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 3e-2
END_TO_END_TOLERANCE = 1e-3  # model.onnx boxes (pixels, relative above 1) and scores
# model.onnx mask probabilities: onnxruntime's RoiAlign samples bins slightly differently from
# torchvision's roi_align (measured up to 7e-3 on a random-init R50); 0.5-thresholded masks agree.
END_TO_END_MASK_TOLERANCE = 2e-2


@dataclass(frozen=True)
class CaseResult:
    graph: str
    case: str
    output: str
    error: float


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def verification_images(size_divisible: int = 32) -> dict[str, np.ndarray]:
    """HxWx3 float images in [0,1]: a square and a non-square textured one, and a blank (no cells)."""
    rng = np.random.default_rng(0)
    side = max(64, 3 * size_divisible)
    square = rng.random((side, side, 3), dtype=np.float32)
    wide = rng.random((side - 13, 2 * side - 7, 3), dtype=np.float32)  # odd sizes: exercises padding
    blank = np.zeros((2 * size_divisible, 2 * size_divisible, 3), dtype=np.float32)
    return {f"square_{side}x{side}": square, f"nonsquare_{wide.shape[0]}x{wide.shape[1]}": wide,
            f"blank_{blank.shape[0]}x{blank.shape[1]}": blank}


class _RecordingBackend:
    """Torch backend that keeps every graph input it is given (the verification inputs)."""

    name = "torch"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.settings: dict[str, Any] = {}
        self.inputs: dict[str, list[Tensor]] = {"backbone": [], "box_head": [], "mask_head": []}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def run_backbone(self, images: Tensor):
        self.inputs["backbone"].append(images.detach().clone())
        return self.inner.run_backbone(images)

    def run_box_head(self, pooled: Tensor):
        self.inputs["box_head"].append(pooled.detach().clone())
        return self.inner.run_box_head(pooled)

    def run_mask_head(self, pooled: Tensor):
        self.inputs["mask_head"].append(pooled.detach().clone())
        return self.inner.run_mask_head(pooled)


def verification_inputs(model: nn.Module, spec) -> dict[str, list[tuple[str, Tensor]]]:
    """graph -> [(case name, input tensor)], from real pipeline runs plus random RoI batches."""
    recorder = _RecordingBackend(TorchBackend(model, torch.device("cpu")))
    predictor = Predictor(spec, model, recorder, torch.device("cpu"))
    cases: dict[str, list[tuple[str, Tensor]]] = {"backbone": [], "box_head": [], "mask_head": []}
    for name, image in verification_images(spec.size_divisible).items():
        counts = {g: len(v) for g, v in recorder.inputs.items()}
        predictor.predict(image)
        for graph, recorded in recorder.inputs.items():
            for tensor in recorded[counts[graph]:]:
                cases[graph].append((name, tensor))
    gen = torch.Generator().manual_seed(0)
    channels = model.backbone.out_channels
    for graph, pool in (("box_head", model.roi_heads.box_roi_pool), ("mask_head", model.roi_heads.mask_roi_pool)):
        size = pool.output_size if isinstance(pool.output_size, int) else pool.output_size[0]
        for rois in (1, 5):
            cases[graph].append((f"random_{rois}_rois", torch.randn(rois, channels, size, size, generator=gen)))
    return cases


def torch_outputs(module: nn.Module, x: Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(x)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in out]


class OnnxRunner:
    """Runs one ONNX model on CPU: onnxruntime when it can load it, else onnx.reference."""

    def __init__(self, model_bytes: bytes) -> None:
        import onnxruntime as ort

        self.kind = "onnxruntime"
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(model_bytes, sess_options=options,
                                                 providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        except Exception as err:  # onnxruntime CPU lacks some FP16 kernels on some builds
            if "NOT_IMPLEMENTED" not in str(err) and "implementation" not in str(err):
                raise
            import onnx
            from onnx.reference import ReferenceEvaluator

            self.kind = "onnx.reference"
            proto = onnx.load_from_string(model_bytes)
            self._session = ReferenceEvaluator(proto)
            self._input = proto.graph.input[0].name

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self._session.run(None, {self._input: x}))


def check_graph(graph: str, module: nn.Module, runner: OnnxRunner, cases: list[tuple[str, Tensor]],
                output_names: tuple[str, ...], tolerance: float, max_elements: int | None = None
                ) -> list[CaseResult]:
    """Compare `runner` with `module` on every case; raise VerificationError (one line) on the first
    output beyond `tolerance`. `max_elements` skips big cases (for the slow reference evaluator)."""
    results = []
    for case, x in cases:
        if max_elements is not None and x.numel() > max_elements:
            continue
        got = runner(x.numpy())
        ref = torch_outputs(module, x)
        for name, g, r in zip(output_names, got, ref):
            err = relative_error(g, r)
            results.append(CaseResult(graph, case, name, err))
            if not err <= tolerance:
                raise VerificationError(f"{graph}: output {name} on {case} (input {tuple(x.shape)}) differs from "
                                        f"PyTorch by {err:.3g} > tolerance {tolerance:g}")
    if not results:
        raise VerificationError(f"{graph}: no verification case was run")
    return results


def summarise(results: list[CaseResult]) -> dict[str, Any]:
    by_graph: dict[str, dict[str, Any]] = OrderedDict()
    for r in results:
        entry = by_graph.setdefault(r.graph, {"max_error": 0.0, "cases": []})
        entry["max_error"] = max(entry["max_error"], r.error)
        if r.case not in entry["cases"]:
            entry["cases"].append(r.case)
    return by_graph
