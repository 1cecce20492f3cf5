"""The three dense subgraphs of a torchvision Mask R-CNN as PyTorch modules.

  backbone : normalised, padded image batch [B,3,H,W] -> FPN maps + RPN objectness/deltas per level
  box_head : pooled RoI features [R,C,7,7]            -> class logits [R,K+1], box deltas [R,4(K+1)]
  mask_head: pooled mask RoI features [R,C,14,14]     -> mask logits [R,K+1,28,28]

Everything dynamic (anchors, proposal decoding, NMS, RoIAlign, detection selection) stays in
torchvision's code, run by cellseg.pipeline for every backend. The torch backend runs these
modules, and export/ writes exactly these modules as ONNX graphs, so every backend executes the
same maths. Their tensor names are cellseg.artifacts'."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cellseg.artifacts import GraphIO, graph_io_for_levels


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


def feature_keys(model: nn.Module, size_divisible: int = 32) -> tuple[str, ...]:
    """FPN level names ("0".."3","pool") in the backbone's output order, found by one tiny run."""
    with torch.no_grad():
        device = next(model.backbone.parameters()).device
        x = torch.zeros(1, 3, 2 * size_divisible, 2 * size_divisible, device=device)
        return tuple(model.backbone(x).keys())


def graph_io(model: nn.Module, size_divisible: int = 32) -> dict[str, GraphIO]:
    """Tensor names of `model`'s three graphs."""
    return graph_io_for_levels(feature_keys(model, size_divisible))


def graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {"backbone": BackboneGraph(model).eval(), "box_head": BoxHeadGraph(model).eval(),
            "mask_head": MaskHeadGraph(model).eval()}
