"""The three graphs as PyTorch modules (the reference every other backend is verified against).
On CUDA, `fp16=True` runs them under autocast; outputs are always returned as float32."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from cellseg.backends.base import split_backbone_outputs
from cellseg.errors import BackendUnavailableError
from cellseg.graphs import graph_io, graph_modules


class TorchBackend:
    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device, fp16: bool = False) -> None:
        if fp16 and device.type != "cuda":
            raise BackendUnavailableError("torch backend: FP16 autocast needs CUDA (this device is "
                                          f"{device.type})")
        model = model.eval().to(device)
        self.device = device
        self.fp16 = fp16
        self._modules = graph_modules(model)
        self._backbone_names = graph_io(model)["backbone"].outputs
        self.settings: dict[str, Any] = {"device": str(device), "precision": "fp16-autocast" if fp16 else "fp32",
                                         "torch_threads": torch.get_num_threads()}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def _context(self):
        if self.fp16:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def run_backbone(self, images: Tensor) -> tuple["OrderedDict[str, Tensor]", list[Tensor], list[Tensor]]:
        with self._context():
            outputs = self._modules["backbone"](images)
        return split_backbone_outputs(self._backbone_names, [o.float() for o in outputs])

    @torch.no_grad()
    def run_box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        with self._context():
            logits, deltas = self._modules["box_head"](pooled)
        return logits.float(), deltas.float()

    @torch.no_grad()
    def run_mask_head(self, pooled: Tensor) -> Tensor:
        with self._context():
            return self._modules["mask_head"](pooled).float()
