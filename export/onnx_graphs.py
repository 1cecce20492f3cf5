"""The three dense subgraphs (cellseg.graphs' modules) written as ONNX files.

Everything dynamic (anchors, proposal decoding, NMS, RoIAlign, detection selection) stays in
torchvision's code, run by cellseg.pipeline for every backend; so these graphs contain only
dense ops that onnxruntime and the TensorRT ONNX parser run natively (no Loop/If/NMS/RoiAlign).
The modules are the ones the torch backend runs, so all backends execute the same maths."""
from __future__ import annotations

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


def export_graph(module: nn.Module, example: Tensor, io: GraphIO, graph: str, path: Path, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): it honours dynamic_axes on these dense graphs,
    while the dynamo exporter was seen to freeze some of those axes to the example's sizes."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_axes=dynamic_axes(io, graph), do_constant_folding=True)
