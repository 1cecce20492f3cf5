"""The `cellseg` model of a Triton repository written by cellseg.export.triton_repo (copied there as
cellseg/1/model.py; it runs inside Triton's Python backend, never inside cellseg).

Each request's rows are decoded with cellseg's reader and run through cellseg's Predictor glue;
the Predictor's Backend is BlsBackend, whose three dense calls are BLS requests to the models
named in cellseg_model.json (cellseg_backbone, cellseg_box_head, cellseg_mask_head). Tensors
cross as numpy arrays on the CPU (simple and portable; a GPU deployment would pass DLPack
tensors instead, unmeasured). A bad request gets its own error response; the other requests
of the batch are answered. triton_python_backend_utils (which exists only inside Triton) is
imported where it is used, so this file also imports outside Triton (a test checks it does)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPEC_FILE = "cellseg_model.json"
INPUTS = ("image", "score_thresh", "image_id")


class BlsBackend:
    """cellseg's Backend protocol over BLS calls to the dense models."""

    name = "triton-bls"

    def __init__(self, graphs: dict) -> None:
        self.graphs = graphs
        self.settings = {"bls_models": [g["model"] for g in graphs.values()]}

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def _call(self, graph: str, x: torch.Tensor) -> list[torch.Tensor]:
        import triton_python_backend_utils as pb_utils

        g = self.graphs[graph]
        spec_in, names = g["input"][0], [o["name"] for o in g["output"]]
        if x.shape[0] == 0:  # no RoIs: nothing to send (an empty batch is not a valid request)
            return [torch.zeros((0, *o["dims"][1:]), dtype=torch.float32) for o in g["output"]]
        dtype = np.float16 if spec_in["data_type"] == "TYPE_FP16" else np.float32
        array = np.ascontiguousarray(x.detach().cpu().numpy().astype(dtype))
        request = pb_utils.InferenceRequest(model_name=g["model"], requested_output_names=names,
                                            inputs=[pb_utils.Tensor(spec_in["name"], array)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{g['model']}: {response.error().message()}")
        return [torch.from_numpy(pb_utils.get_output_tensor_by_name(response, n).as_numpy().astype(np.float32))
                for n in names]

    def run_backbone(self, images: torch.Tensor):
        from cellseg.backends.base import split_backbone_outputs

        names = [o["name"] for o in self.graphs["backbone"]["output"]]
        return split_backbone_outputs(names, self._call("backbone", images))

    def run_box_head(self, pooled: torch.Tensor):
        logits, deltas = self._call("box_head", pooled)
        return logits, deltas

    def run_mask_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._call("mask_head", pooled)[0]


def _request_inputs(request) -> dict[str, np.ndarray]:
    import triton_python_backend_utils as pb_utils

    inputs = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            inputs[name] = tensor.as_numpy()
    return inputs


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from cellseg.config import ModelSpec
        from cellseg.model import build_model
        from cellseg.pipeline import Predictor
        from cellseg.serve import image_limit

        described = json.loads(Path(__file__).with_name(SPEC_FILE).read_text())
        spec = ModelSpec.from_dict(described["model"])
        glue = build_model(spec)  # random init: only its transform / rpn / roi_heads configuration is used
        self.predictor = Predictor(spec, glue, BlsBackend(described["graphs"]), torch.device("cpu"))
        self.max_pixels = image_limit(spec, None)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        from cellseg.serve import decode_rows, results_tensor

        responses = []
        for k, request in enumerate(requests):
            try:
                rows = decode_rows(_request_inputs(request), self.max_pixels, k)
                entries = [self.predictor.predict_coco(r.image, r.image_id, r.score_thresh) for r in rows]
                out = pb_utils.Tensor("results", results_tensor(entries))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as err:  # noqa: BLE001 - this request fails alone; the batch goes on
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))))
        return responses
