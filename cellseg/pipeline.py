"""One inference pipeline for every backend.

A backend runs the three dense graphs (backbone, box head, mask head); everything between them is
torchvision's own code on a model built from the checkpoint's ModelSpec: the model's transform
(native-scale resize, normalise, pad), AnchorGenerator + box decoding + filter_proposals (RPN),
RoIAlign, postprocess_detections, maskrcnn_inference and the box mapping back to the original
image. RoIAlign on the CPU is cellseg.roi_align (the same numbers as torchvision's
MultiScaleRoIAlign up to float rounding, several times faster), and RoIs go through pooling and
the heads ROI_CHUNK at a time. So `Predictor(torch backend).predict(image)` equals the eager
`model([image])` (boxes, scores, labels, and masks before paste) to float rounding, and other
backends differ only by their graphs."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers

from cellseg.artifacts import (CHECKPOINT_COPY, check_weights_hash, engine_paths, onnx_paths,
                               read_export_json)
from cellseg.backends.base import BACKEND_PREFERENCE, Backend, backend_artifacts
from cellseg.config import ModelSpec
from cellseg.device import resolve_device
from cellseg.errors import BackendUnavailableError, CheckpointError, InputError
from cellseg.model import inference_budgets_applied
from cellseg.postprocess import apply_output_rules, detections_to_coco
from cellseg.roi_align import pool_rois, restore_order

STAGES = ("preprocess", "backbone", "rpn", "box_head", "roi_glue", "mask_head", "paste_rle", "mask_nms")
ROI_CHUNK = 512  # RoIs per pooling + head call (see Predictor._box_heads)


@dataclass
class Detections:
    boxes: Tensor  # (N,4) float32 xyxy in original image pixels, cpu
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64, model labels 1..K
    mask_probs: Tensor  # (N,1,28,28) float32 probabilities of the detection's class, cpu


def backend_names() -> tuple[str, ...]:
    return BACKEND_PREFERENCE


class Predictor:
    """Runs images through `backend`'s graphs and `model`'s torchvision glue. `model` only has
    to carry the transform, rpn and roi_heads configuration; its head weights are not used unless
    the backend is the torch one built from the same model."""

    def __init__(self, spec: ModelSpec, model: nn.Module, backend: Backend, device: torch.device) -> None:
        self.spec = spec
        self.backend = backend
        self.backend_name = backend.name
        self.device = device
        self.model = model.eval().to(device)
        self.stage_seconds: dict[str, float] = {s: 0.0 for s in STAGES}
        self.roi_chunk = ROI_CHUNK
        pool = self.model.roi_heads.mask_roi_pool.output_size
        self._mask_side = 2 * (pool if isinstance(pool, int) else pool[0])  # mask predictor upsamples x2

    @property
    def settings(self) -> dict[str, Any]:
        return dict(getattr(self.backend, "settings", {}))

    def _tick(self, stage: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so stage times are the GPU's, not launch times
        now = time.perf_counter()
        self.stage_seconds[stage] += now - start
        return now

    @torch.no_grad()
    def predict(self, image: np.ndarray, score_floor: float | None = None) -> Detections:
        """One HxWx3 float image -> its detections scoring at least `score_floor` (None: the
        spec's `score_floor`), masks computed only for those."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", type(image).__name__)
            raise InputError(f"predict expects an HxWx3 float image, got {shape}")
        t = time.perf_counter()
        original_size = (int(image.shape[0]), int(image.shape[1]))
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).to(self.device)
        images, _ = self.model.transform([x])
        image_sizes = images.image_sizes
        with inference_budgets_applied(self.model, self.spec, image_sizes):
            t = self._tick("preprocess", t)

            features, objectness, deltas = self.backend.run_backbone(images.tensors)
            t = self._tick("backbone", t)

            proposals = self._proposals(images, features, objectness, deltas)
            t = self._tick("rpn", t)

            heads = self.model.roi_heads
            level_cache: dict[str, Tensor] = {}  # pool_rois' channels-last copies of the levels, per image
            class_logits, box_regression, t = self._box_heads(features, proposals[0], image_sizes, level_cache, t)
            boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        boxes, scores, labels = self._above_floor(boxes[0], scores[0], labels[0], score_floor)
        if boxes[0].shape[0] > 0:
            mask_probs, t = self._mask_heads(features, boxes[0], labels[0], image_sizes, level_cache, t)
        else:  # no detections: nothing for the mask head to do (and engines have no 0-RoI profile)
            mask_probs = torch.zeros(0, 1, self._mask_side, self._mask_side, device=self.device)
        mapped = self.model.transform.postprocess([{"boxes": boxes[0]}], image_sizes, [original_size])
        detections = Detections(boxes=mapped[0]["boxes"].float().cpu(), scores=scores[0].float().cpu(),
                                labels=labels[0].to(torch.int64).cpu(), mask_probs=mask_probs.float().cpu())
        self._tick("roi_glue", t)
        return detections

    def predict_coco(self, image: np.ndarray, image_id: int, score_thresh: float | None = None) -> list[dict]:
        """One image -> its COCO results entries: `predict` with `score_thresh` as the score
        floor (None: the spec's), then `to_coco`."""
        return self.to_coco(self.predict(image, score_thresh), image_id, image.shape[:2], score_floor=score_thresh)

    def to_coco(self, det: Detections, image_id: int, image_size: tuple[int, int],
                keep: Tensor | None = None, score_floor: float | None = None) -> list[dict]:
        """The one path from detections to COCO entries (infer, tiles, training's validation,
        bench, the GPU check): the rows selected by `keep` (a bool mask, all when None) through
        the shared box-local paste + RLE at `image_size`, timed as the "paste_rle" stage, then
        the spec's mask-overlap rules ("mask_nms": suppression at `mask_nms_thresh`, then
        `mask_score_decay`, which drops what it takes below `score_floor`, None: the spec's).
        Boxes must already be in that image's frame (tiles shift theirs first)."""
        t = time.perf_counter()
        if keep is not None:
            det = Detections(boxes=det.boxes[keep], scores=det.scores[keep], labels=det.labels[keep],
                             mask_probs=det.mask_probs[keep])
        entries = detections_to_coco(image_id, det.boxes, det.scores, det.labels, det.mask_probs,
                                     image_size, self.spec.category_ids, self.spec.mask_thresh)
        now = time.perf_counter()
        self.stage_seconds["paste_rle"] += now - t
        floor = self.spec.score_floor if score_floor is None else score_floor
        entries = apply_output_rules(entries, self.spec.mask_nms_thresh, self.spec.mask_score_decay, floor)
        self.stage_seconds["mask_nms"] += time.perf_counter() - now
        return entries

    def _above_floor(self, boxes: Tensor, scores: Tensor, labels: Tensor, score_floor: float | None):
        """The detections scoring at least the floor, as one-image lists like
        postprocess_detections returns (a score cut commutes with its NMS and top-k)."""
        floor = self.spec.score_floor if score_floor is None else float(score_floor)
        keep = scores >= floor
        return [boxes[keep]], [scores[keep]], [labels[keep]]

    # RoIs go through pooling and a head ROI_CHUNK at a time: the heads are per RoI, so results do
    # not depend on it, while memory stays bounded on crowded images (2000 detections' pooled
    # mask features alone are 440 MB). pool_rois may permute a chunk's rows; restore_order puts the
    # head outputs back in order.
    def _box_heads(self, features, proposals: Tensor, image_sizes, level_cache: dict, t: float):
        logits, deltas = [], []
        for chunk in proposals.split(self.roi_chunk):  # no proposals: one empty chunk
            pooled, order = pool_rois(self.model.roi_heads.box_roi_pool, features, chunk, image_sizes, level_cache)
            t = self._tick("roi_glue", t)
            chunk_logits, chunk_deltas = self.backend.run_box_head(pooled)
            t = self._tick("box_head", t)
            logits.append(restore_order(order, chunk_logits))
            deltas.append(restore_order(order, chunk_deltas))
        return torch.cat(logits), torch.cat(deltas), t

    def _mask_heads(self, features, boxes: Tensor, labels: Tensor, image_sizes, level_cache: dict, t: float):
        probs = []
        for chunk, chunk_labels in zip(boxes.split(self.roi_chunk), labels.split(self.roi_chunk)):
            pooled, order = pool_rois(self.model.roi_heads.mask_roi_pool, features, chunk, image_sizes, level_cache)
            t = self._tick("roi_glue", t)
            logits = self.backend.run_mask_head(pooled)
            t = self._tick("mask_head", t)
            if order is not None:
                chunk_labels = chunk_labels[order.to(chunk_labels.device)]
            probs.append(restore_order(order, maskrcnn_inference(logits, [chunk_labels])[0]))
        return torch.cat(probs), t

    def _proposals(self, images, features: "OrderedDict[str, Tensor]", objectness: list[Tensor],
                   deltas: list[Tensor]) -> list[Tensor]:
        """RegionProposalNetwork.forward (eval) from its head's outputs onward, torchvision's code."""
        rpn = self.model.rpn
        feature_list = list(features.values())
        anchors = rpn.anchor_generator(images, feature_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(flat_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, flat_objectness, images.image_sizes, num_anchors_per_level)
        return boxes


# ------------------------------------------------------------------------------------ loading
def backend_class(name: str):
    """The Backend class of a backend name, imported only now (its runtime is optional); ask its
    `is_available()` before loading anything."""
    if name == "torch":
        from cellseg.backends.torch_backend import TorchBackend
        return TorchBackend
    if name == "onnxruntime":
        from cellseg.backends.onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend
    if name == "openvino":
        from cellseg.backends.openvino_backend import OpenVinoBackend
        return OpenVinoBackend
    from cellseg.backends.tensorrt_backend import TensorRTBackend
    return TensorRTBackend


def _check_backend_name(backend: str | None) -> None:
    if backend is not None and backend not in BACKEND_PREFERENCE:
        raise InputError(f"unknown backend {backend!r} (valid: {', '.join(BACKEND_PREFERENCE)})")


def load_predictor(model: str | Path, backend: str | None = None, device: str = "auto",
                   precision: str | None = None, threads: int | None = None) -> Predictor:
    """model = checkpoint .pt (torch backend) or export folder (any backend whose artifacts it
    holds; without `backend`, the first available in BACKEND_PREFERENCE). `precision` picks
    fp32/fp16/int8 artifacts (default: fp16 engines for trt when built, fp32 graphs for
    onnxruntime and openvino; for torch, fp16 means CUDA autocast). `threads`: intra-op threads of
    the onnxruntime / openvino runtime (default: the physical cores), for several predictors
    sharing one machine; the torch backend uses torch's process-wide setting."""
    _check_backend_name(backend)
    if backend is not None:  # name the missing runtime first: that is what the user must fix
        ok, reason = backend_class(backend).is_available()
        if not ok:
            raise BackendUnavailableError(f"{backend} backend: {reason}")
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or export folder")
    if path.is_file():
        if backend not in (None, "torch"):
            raise InputError(f"{path}: a checkpoint runs only on the torch backend "
                             f"(make an export folder with `cellseg export` for {backend})")
        return _torch_predictor(path, resolve_device(device), precision, expected_hash=None)

    info = read_export_json(path)
    present = backend_artifacts(path)
    if backend is not None and backend not in present:
        raise InputError(f"{path}: export folder has no {backend} artifacts "
                         f"(present: {', '.join(present) or 'none'})")
    candidates = [backend] if backend else [b for b in BACKEND_PREFERENCE if b in present]
    if not candidates:
        raise CheckpointError(f"{path}: export folder holds no model.pt, ONNX graphs or engines")
    reasons = []
    for name in candidates:
        ok, reason = backend_class(name).is_available()
        if ok:
            return _folder_predictor(path, info, name, device, precision, present[name], threads)
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailableError("; ".join(reasons))


def _torch_predictor(checkpoint: Path, device: torch.device, precision: str | None,
                     expected_hash: str | None) -> Predictor:
    from cellseg.backends.torch_backend import TorchBackend
    from cellseg.checkpoint import load_checkpoint, weights_hash
    from cellseg.model import model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if expected_hash is not None:
        check_weights_hash(checkpoint, weights_hash(ckpt.state_dict), expected_hash)
    net = model_from_checkpoint(ckpt.state_dict, ckpt.spec, str(checkpoint)).to(device)
    return Predictor(ckpt.spec, net, TorchBackend(net, device, fp16=precision == "fp16"), device)


def _folder_predictor(folder: Path, info: dict[str, Any], name: str, device: str,
                      precision: str | None, precisions: list[str], threads: int | None = None) -> Predictor:
    from cellseg.model import build_model

    spec = ModelSpec.from_dict(info["metadata"].get("model") if isinstance(info["metadata"], dict) else None)
    expected = str(info["weights_sha256"])
    if name == "torch":
        return _torch_predictor(folder / CHECKPOINT_COPY, resolve_device(device), precision, expected)
    chosen = precision or precisions[0]
    if chosen not in precisions:
        raise InputError(f"{folder}: no {chosen} artifacts for {name} (present: {', '.join(precisions)})")
    if name == "onnxruntime":
        from cellseg.backends.onnxruntime_backend import OnnxRuntimeBackend
        be = OnnxRuntimeBackend(onnx_paths(folder, chosen), device=device, expected_hash=expected,
                                intra_op_threads=threads, precision=chosen)
    elif name == "openvino":
        from cellseg.backends.openvino_backend import OpenVinoBackend
        be = OpenVinoBackend(onnx_paths(folder, chosen), device=device, expected_hash=expected, threads=threads,
                             precision=chosen)
    else:
        from cellseg.backends.tensorrt_backend import TensorRTBackend
        be = TensorRTBackend(engine_paths(folder, chosen), device=device, expected_hash=expected)
    glue = build_model(spec)  # random init: only its transform / rpn / roi_heads configuration is used
    return Predictor(spec, glue, be, be.device)
