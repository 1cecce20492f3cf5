"""The three dense subgraphs (cellseg.graphs' modules) written as ONNX files.

Everything dynamic (anchors, proposal decoding, NMS, RoIAlign, detection selection) stays in
torchvision's code, run by cellseg.pipeline for every backend; so these graphs contain only
dense ops that onnxruntime and the TensorRT ONNX parser run natively (no Loop/If/NMS/RoiAlign).
The modules are the ones the torch backend runs, so all backends execute the same maths."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cellseg.artifacts import GraphIO


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


class ReshapeFreeGroupNorm(nn.GroupNorm):
    """nn.GroupNorm without a reshape in its ONNX form. torch exports GroupNorm as a reshape to
    (N, G, C/G*H*W), which onnxruntime's graph optimiser turns into (0, G, -1), and that fails
    when N is 0, as it is when an image has no detection and the mask head gets no RoI. Here
    the group statistics are per-channel means averaged over each group by a fixed 1x1
    convolution: the same maths, with nothing to reshape."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        size = num_channels // num_groups
        group_of = torch.arange(num_channels) // size
        average = (group_of[:, None] == group_of[None, :]).float() / size
        self.register_buffer("group_average", average[:, :, None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return super().forward(x)
        mean = nn.functional.conv2d(x.mean(dim=(2, 3), keepdim=True), self.group_average)
        centred = x - mean
        var = nn.functional.conv2d(centred.pow(2).mean(dim=(2, 3), keepdim=True), self.group_average)
        normed = centred / torch.sqrt(var + self.eps)
        if not self.affine:
            return normed
        return normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def with_exportable_norms(module: nn.Module) -> nn.Module:
    """A copy of `module` with every nn.GroupNorm as ReshapeFreeGroupNorm (same parameters)."""
    if not any(type(m) is nn.GroupNorm for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                swapped = ReshapeFreeGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                swapped.load_state_dict(child.state_dict())
                setattr(parent, name, swapped)
    return module


def export_graph(module: nn.Module, example: Tensor, io: GraphIO, graph: str, path: Path, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): it honours dynamic_axes on these dense graphs,
    while the dynamo exporter was seen to freeze some of those axes to the example's sizes."""
    module = with_exportable_norms(module)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_axes=dynamic_axes(io, graph), do_constant_folding=True)
