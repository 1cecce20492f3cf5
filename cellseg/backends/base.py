"""What a backend is: something that runs the three dense graphs (backbone, box head, mask head).
Everything else (anchors, proposals, NMS, RoIAlign, detection selection) is cellseg.pipeline's,
shared by all backends, so backends differ only in how these three calls execute."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from cellseg.artifacts import DELTAS_PREFIX, FEATURE_PREFIX, OBJECTNESS_PREFIX, artifacts_present

# Backend names in the order load_predictor prefers them when several are present.
BACKEND_PREFERENCE = ("trt", "onnxruntime", "openvino", "torch")
# Backends that run another backend's artifacts: openvino reads the ONNX graphs onnxruntime runs.
SHARED_ARTIFACTS = {"openvino": "onnxruntime"}


def backend_artifacts(folder: Path) -> dict[str, list[str]]:
    """Backend name -> the precisions it can run from the export folder (its default first):
    the folder's artifacts (cellseg.artifacts.artifacts_present) and the backends that share them."""
    present = artifacts_present(folder)
    for backend, source in SHARED_ARTIFACTS.items():
        if source in present:
            present[backend] = list(present[source])
    return present


@runtime_checkable
class Backend(Protocol):
    name: str
    settings: dict[str, Any]  # how it runs (providers, threads, precision): recorded by bench

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """(True, "") when its runtime can run here, else (False, one-line reason)."""
        ...

    def run_backbone(self, images: Tensor) -> tuple["OrderedDict[str, Tensor]", list[Tensor], list[Tensor]]:
        """images [B,3,H,W] normalised and padded -> (FPN features by level key, RPN objectness
        per level [B,A,h,w], RPN box deltas per level [B,4A,h,w]); on the backend's device."""
        ...

    def run_box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """pooled [R,C,7,7] -> (class logits [R,K+1], box regression [R,4(K+1)])."""
        ...

    def run_mask_head(self, pooled: Tensor) -> Tensor:
        """pooled [R,C,14,14] -> mask logits [R,K+1,28,28]."""
        ...


def split_backbone_outputs(names: tuple[str, ...] | list[str], outputs: list[Tensor]
                           ) -> tuple["OrderedDict[str, Tensor]", list[Tensor], list[Tensor]]:
    """Backbone graph outputs (named feat_<key>, objectness_<i>, deltas_<i>) -> the three groups."""
    features: OrderedDict[str, Tensor] = OrderedDict()
    objectness: dict[int, Tensor] = {}
    deltas: dict[int, Tensor] = {}
    for name, value in zip(names, outputs):
        if name.startswith(FEATURE_PREFIX):  # level order = output order (the FPN's)
            features[name[len(FEATURE_PREFIX):]] = value
        elif name.startswith(OBJECTNESS_PREFIX):
            objectness[int(name[len(OBJECTNESS_PREFIX):])] = value
        elif name.startswith(DELTAS_PREFIX):
            deltas[int(name[len(DELTAS_PREFIX):])] = value
    return features, [objectness[i] for i in sorted(objectness)], [deltas[i] for i in sorted(deltas)]
