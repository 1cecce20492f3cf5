"""The three dense subgraphs of a torchvision Mask R-CNN, as PyTorch modules and as ONNX files.

  backbone : normalised, padded image batch [B,3,H,W] -> FPN maps + RPN objectness/deltas per level
  box_head : pooled RoI features [R,C,7,7]            -> class logits [R,K+1], box deltas [R,4(K+1)]
  mask_head: pooled mask RoI features [R,C,14,14]     -> mask logits [R,K+1,28,28]

Everything dynamic (anchors, proposal decoding, NMS, RoIAlign, detection selection) stays in
torchvision's code, run by cellseg.pipeline for every backend; so these graphs contain only
dense ops that onnxruntime and the TensorRT ONNX parser run natively (no Loop/If/NMS/RoiAlign).
The same modules are what the torch backend runs, so all backends execute the same maths."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

GRAPH_NAMES = ("backbone", "box_head", "mask_head")
FEATURE_PREFIX = "feat_"
OBJECTNESS_PREFIX = "objectness_"
DELTAS_PREFIX = "deltas_"


class BackboneGraph(nn.Module):
    """backbone + FPN + RPN head: the dense front half of the detector."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(images)
        objectness, deltas = self.rpn_head(list(features.values()))
        return (*features.values(), *objectness, *deltas)


class BoxHeadGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(pooled))


class MaskHeadGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.mask_head = model.roi_heads.mask_head
        self.mask_predictor = model.roi_heads.mask_predictor

    def forward(self, pooled: Tensor) -> Tensor:
        return self.mask_predictor(self.mask_head(pooled))


@dataclass(frozen=True)
class GraphIO:
    """Input/output tensor names of one graph; the backbone's output names carry the FPN level keys."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def feature_keys(model: nn.Module, size_divisible: int = 32) -> tuple[str, ...]:
    """FPN level names ("0".."3","pool") in the backbone's output order, found by one tiny run."""
    with torch.no_grad():
        device = next(model.backbone.parameters()).device
        x = torch.zeros(1, 3, 2 * size_divisible, 2 * size_divisible, device=device)
        return tuple(model.backbone(x).keys())


def graph_io(model: nn.Module, size_divisible: int = 32) -> dict[str, GraphIO]:
    keys = feature_keys(model, size_divisible)
    levels = range(len(keys))
    backbone_out = (tuple(FEATURE_PREFIX + k for k in keys) + tuple(f"{OBJECTNESS_PREFIX}{i}" for i in levels)
                    + tuple(f"{DELTAS_PREFIX}{i}" for i in levels))
    return {
        "backbone": GraphIO(("images",), backbone_out),
        "box_head": GraphIO(("box_features",), ("class_logits", "box_regression")),
        "mask_head": GraphIO(("mask_features",), ("mask_logits",)),
    }


def graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {"backbone": BackboneGraph(model).eval(), "box_head": BoxHeadGraph(model).eval(),
            "mask_head": MaskHeadGraph(model).eval()}


def example_inputs(model: nn.Module, size_divisible: int = 32) -> dict[str, Tensor]:
    channels = model.backbone.out_channels
    side = 2 * size_divisible
    return {"backbone": torch.rand(1, 3, side, side + size_divisible),
            "box_head": torch.randn(3, channels, *_pool_size(model.roi_heads.box_roi_pool)),
            "mask_head": torch.randn(3, channels, *_pool_size(model.roi_heads.mask_roi_pool))}


def _pool_size(pool: nn.Module) -> tuple[int, int]:
    size = pool.output_size
    return (size, size) if isinstance(size, int) else tuple(size)


def dynamic_axes(io: GraphIO, graph: str) -> dict[str, dict[int, str]]:
    """Backbone: batch, height, width on the input and every output; heads: the RoI count."""
    if graph == "backbone":
        axes = {io.inputs[0]: {0: "batch", 2: "height", 3: "width"}}
        axes.update({n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in io.outputs})
        return axes
    return {n: {0: "rois"} for n in io.inputs + io.outputs}


def export_graph(module: nn.Module, example: Tensor, io: GraphIO, graph: str, path: Path, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): it honours dynamic_axes on these dense graphs
    without freezing shapes, which the dynamo exporter was seen to do (issue 7)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_axes=dynamic_axes(io, graph), do_constant_folding=True)
