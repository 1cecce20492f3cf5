"""The "reference" row: the seed's way of running a trained Mask R-CNN, on the same checkpoint and
images, so every cellseg speedup is a ratio measured in the same run on the same machine.

Seed style: the torchvision model called eagerly on one image at a time, torchvision's own mask
paste (`paste_masks_in_image`, the function transform.postprocess calls: every 28x28 mask into a
full-size float image), `> mask_thresh`, then one pycocotools `encode` per full-size mask. Stage
times are taken with forward hooks on the model's parts, so the table can show where the seed
spends its time.

One departure from the seed, for memory only: the seed pastes all N masks at once, N full-size
float images (4,400 detections on a 1024^2 image are 18 GB, enough for the kernel to kill the
run). Here transform.postprocess maps the boxes but leaves the masks 28x28, and predict_coco
pastes, thresholds and encodes them PASTE_CHUNK at a time. torchvision pastes each mask on its
own (one paste_mask_in_image per mask, then a stack), so every pixel and every RLE is the same,
and the work timed is the same per mask; only the peak memory is bounded."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellseg.errors import BackendUnavailableError, InputError

REFERENCE_STAGES = ("preprocess", "backbone", "rpn", "roi_heads", "paste", "threshold_rle")
PASTE_CHUNK = 64  # full-size masks held at once: 64 x 1024^2 float32 = 256 MB


def reference_checkpoint(model: Path) -> Path:
    """The checkpoint behind `model`: the file itself, or an export folder's copy of it."""
    from cellseg.artifacts import CHECKPOINT_COPY

    model = Path(model)
    if model.is_file():
        return model
    copy = model / CHECKPOINT_COPY
    if model.is_dir() and copy.is_file():
        return copy
    # Not an error of the run: the row is listed as skipped, like a backend without its runtime.
    raise BackendUnavailableError(f"{model}: no checkpoint for the reference row ({CHECKPOINT_COPY} missing)")


class ReferencePipeline:
    """torchvision eager Mask R-CNN + seed post-processing. `stage_seconds` accumulates like a
    cellseg Predictor's, so the harness treats both alike."""

    backend_name = "reference"

    def __init__(self, model: Path, device: torch.device) -> None:
        from cellseg.checkpoint import load_checkpoint
        from cellseg.model import model_from_checkpoint

        path = reference_checkpoint(model)
        ckpt = load_checkpoint(path)
        self.checkpoint = path
        self.spec = ckpt.spec
        self.device = device
        self.model = model_from_checkpoint(ckpt.state_dict, ckpt.spec, source=str(path)).eval().to(device)
        self.stage_seconds: dict[str, float] = {s: 0.0 for s in REFERENCE_STAGES}
        self.settings: dict[str, Any] = {"device": str(device), "precision": "fp32",
                                         "torch_threads": torch.get_num_threads(),
                                         "checkpoint": str(path)}
        self._install_timers()

    # Stage timing ------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _install_timers(self) -> None:
        """Hooks that time each part of GeneralizedRCNN.forward: transform (preprocess), backbone,
        rpn, roi_heads, then transform.postprocess, where torchvision pastes the masks."""
        started: dict[str, float] = {}

        def pre(stage: str) -> Callable:
            def hook(*_: Any) -> None:
                self._sync()
                started[stage] = time.perf_counter()
            return hook

        def post(stage: str) -> Callable:
            def hook(*_: Any) -> None:
                self._sync()
                self.stage_seconds[stage] += time.perf_counter() - started.pop(stage)
            return hook

        parts: dict[str, nn.Module] = {"preprocess": self.model.transform, "backbone": self.model.backbone,
                                       "rpn": self.model.rpn, "roi_heads": self.model.roi_heads}
        for stage, module in parts.items():
            module.register_forward_pre_hook(pre(stage))
            module.register_forward_hook(post(stage))
        # transform.postprocess is a plain method, not a module call: wrap it on this instance.
        postprocess = self.model.transform.postprocess

        def timed_postprocess_without_paste(result: list[dict], image_shapes: Any,
                                            original_sizes: Any) -> list[dict]:
            pre("paste")()
            mask_probs = [r.pop("masks") for r in result]  # pasted later, PASTE_CHUNK at a time
            out = postprocess(result, image_shapes, original_sizes)  # boxes to image pixels
            for r, probs, size in zip(out, mask_probs, original_sizes):
                r["mask_probs"], r["image_size"] = probs, tuple(size)
            post("paste")()
            return out

        self.model.transform.postprocess = timed_postprocess_without_paste

    # Inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_coco(self, image: np.ndarray, image_id: int) -> list[dict]:
        """One image -> COCO results entries, the seed's way."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"reference expects an HxWx3 float image, got {getattr(image, 'shape', None)}")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).to(self.device)
        out = self.model([x])[0]
        t = time.perf_counter()
        boxes = out["boxes"].cpu().tolist()
        scores = out["scores"].cpu().tolist()
        labels = out["labels"].cpu().tolist()
        self.stage_seconds["threshold_rle"] += time.perf_counter() - t
        entries: list[dict] = []
        for start in range(0, len(boxes), PASTE_CHUNK):
            chunk = slice(start, start + PASTE_CHUNK)
            full = self._paste(out["mask_probs"][chunk], out["boxes"][chunk], out["image_size"])
            entries += self._encode(full, boxes[chunk], scores[chunk], labels[chunk], image_id)
        # cellseg's output rules (ModelSpec.score_floor, mask_nms_thresh, mask_score_decay)
        # applied afterwards: the seed's work is timed in full, and its results stay comparable
        # with the Predictor's
        from cellseg.postprocess import apply_output_rules

        kept = [e for e in entries if e["score"] >= self.spec.score_floor]
        return apply_output_rules(kept, self.spec.mask_nms_thresh, self.spec.mask_score_decay, self.spec.score_floor)

    def _paste(self, mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """torchvision's paste of 28x28 probabilities into full-size float images (N, 1, H, W)."""
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        t = time.perf_counter()
        full = paste_masks_in_image(mask_probs, boxes, size)
        self._sync()
        self.stage_seconds["paste"] += time.perf_counter() - t
        return full

    def _encode(self, full: torch.Tensor, boxes: list, scores: list, labels: list, image_id: int) -> list[dict]:
        """`> mask_thresh` and one pycocotools encode per full-size mask."""
        import pycocotools.mask as mask_utils

        t = time.perf_counter()
        masks = (full > self.spec.mask_thresh).cpu().numpy()  # (n, 1, H, W)
        entries = []
        for mask, box, score, label in zip(masks, boxes, scores, labels):
            rle = mask_utils.encode(np.asfortranarray(mask[0].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            entries.append({"image_id": int(image_id),
                            "category_id": int(self.spec.category_ids[int(label) - 1]),
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": float(score), "segmentation": rle})
        self.stage_seconds["threshold_rle"] += time.perf_counter() - t
        return entries
