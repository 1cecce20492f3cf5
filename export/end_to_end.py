"""`model.onnx`: the whole detector in one graph, for users who run ONNX elsewhere.

image [3,H,W] float in [0,1] -> boxes [N,4] (input-image pixels), labels [N] int64, scores [N],
mask_probs [N,1,28,28]. Exported through torchvision's own tracing path (its ONNX-aware
RPN/RoI code, NonMaxSuppression, RoiAlign, TopK); masks are NOT pasted, because torchvision's
paste is an ONNX Loop with a growing output (74% of onnxruntime's time, rejected by TensorRT).
cellseg's backends do not use this graph (they use the three dense graphs)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes

from cellseg.errors import VerificationError
from cellseg.export.onnx_graphs import with_exportable_norms

OUTPUT_NAMES = ("boxes", "labels", "scores", "mask_probs")


class EndToEnd(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        original = image.shape[-2:]
        images, _ = m.transform([image])
        features = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, features)
        detections, _ = m.roi_heads(features, proposals, images.image_sizes)
        det = detections[0]
        boxes = resize_boxes(det["boxes"], images.image_sizes[0], original)
        return boxes, det["labels"], det["scores"], det["masks"]


def export_end_to_end(model: nn.Module, path: Path, opset: int, example_hw: tuple[int, int]) -> None:
    wrapper = EndToEnd(with_exportable_norms(model)).eval()
    example = torch.rand(3, *example_hw, generator=torch.Generator().manual_seed(1))
    axes = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in OUTPUT_NAMES}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=max(opset, 11),
                          input_names=["image"], output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                          do_constant_folding=True)


def match_detections(got: list[np.ndarray], ref: list[np.ndarray], tolerance: float,
                     mask_tolerance: float | None = None) -> tuple[int, float]:
    """Pair each PyTorch detection with an unused onnxruntime one of the same label whose box and
    score agree within `tolerance` (max|Δ| / max(1, max|ref|)) and mask probabilities within
    `mask_tolerance` (default: `tolerance`). Order-free, because near-equal scores may sort
    differently. Returns (matched count, worst box/score error among matches)."""
    mask_tolerance = tolerance if mask_tolerance is None else mask_tolerance
    from cellseg.export.verify import relative_error

    g_boxes, g_labels, g_scores, g_masks = got
    r_boxes, r_labels, r_scores, r_masks = ref
    used = np.zeros(len(g_boxes), dtype=bool)
    matched, worst = 0, 0.0
    for i in range(len(r_boxes)):
        candidates = np.flatnonzero(~used & (g_labels == r_labels[i]) &
                                    (np.abs(g_scores - r_scores[i]) <= tolerance))
        box_err = np.abs(g_boxes[candidates] - r_boxes[i]).max(axis=1) / max(1.0, float(np.abs(r_boxes[i]).max()))
        best, best_err = -1, float("inf")
        for j in candidates[box_err <= tolerance]:
            if relative_error(g_masks[j], r_masks[i]) > mask_tolerance:
                continue
            err = max(relative_error(g_boxes[j], r_boxes[i]), abs(float(g_scores[j] - r_scores[i])))
            if err < best_err:
                best, best_err = j, err
        if best >= 0:
            used[best] = True
            matched += 1
            worst = max(worst, best_err)
    return matched, worst


def verify_end_to_end(model: nn.Module, path: Path, images: dict[str, np.ndarray], tolerance: float,
                      mask_tolerance: float, min_matched: float = 0.99) -> float:
    """onnxruntime vs eager on each image: at least `min_matched` of PyTorch's detections (and of
    onnxruntime's) are paired one-to-one with the same label and values within `tolerance`
    (a near-tie in NMS may flip a few). Returns the largest error among matched pairs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    wrapper = EndToEnd(model).eval()
    worst = 0.0
    for case, image in images.items():
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(x)]
        got = session.run(None, {"image": x.numpy()})
        matched, err = match_detections(got, ref, tolerance, mask_tolerance)
        worst = max(worst, err)
        total = max(len(ref[0]), len(got[0]))
        if total and matched < min_matched * total:
            raise VerificationError(f"model.onnx: on {case} only {matched} of {len(ref[0])} PyTorch detections "
                                    f"({len(got[0])} from onnxruntime) agree within tolerance {tolerance:g} (masks {mask_tolerance:g})")
    return worst
