"""cellseg.pipeline: the shared pipeline with the torch backend equals the eager model, and
load_predictor picks/refuses backends with one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.errors import BackendUnavailableError, CheckpointError, InputError
from cellseg.pipeline import Detections, Predictor, backend_names, load_predictor
from helpers import save_tiny_checkpoint, tiny_spec

torch.set_num_threads(1)


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    """conftest's session checkpoint of helpers.tiny_spec()."""
    return tiny_checkpoint


def eager(model, image: np.ndarray) -> dict:
    """The eager model's own output, masks before paste (roi_heads), boxes in input pixels."""
    from torchvision.models.detection.transform import resize_boxes

    x = torch.from_numpy(image).permute(2, 0, 1)
    with torch.no_grad():
        images, _ = model.transform([x])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        det, _ = model.roi_heads(features, proposals, images.image_sizes)
        full = model([x])[0]  # the public forward (pasted masks) agrees on boxes/scores/labels
    det = det[0]
    boxes = resize_boxes(det["boxes"], images.image_sizes[0], image.shape[:2])
    assert torch.equal(full["boxes"], boxes) and torch.equal(full["scores"], det["scores"])
    return {"boxes": boxes, "scores": det["scores"], "labels": det["labels"], "masks": det["masks"]}


def above_floor(ref: dict, floor: float) -> dict:
    """The eager output under the pipeline's score floor (the eager model has none)."""
    keep = ref["scores"] >= floor
    return {k: v[keep] for k, v in ref.items()}


@pytest.mark.parametrize("shape", [(64, 64), (70, 101), (45, 38)])
def test_torch_pipeline_equals_eager_model(checkpoint, shape):
    predictor = load_predictor(checkpoint, device="cpu")
    assert predictor.backend_name == "torch"
    image = np.random.default_rng(sum(shape)).random((*shape, 3), dtype=np.float32)
    got = predictor.predict(image)
    ref = above_floor(eager(predictor.model, image), predictor.spec.score_floor)
    assert isinstance(got, Detections) and got.boxes.shape[0] > 0
    torch.testing.assert_close(got.boxes, ref["boxes"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.scores, ref["scores"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got.labels, ref["labels"]) and got.labels.dtype == torch.int64
    # RoIAlign on the CPU is cellseg.roi_align: torchvision's numbers up to float rounding
    torch.testing.assert_close(got.mask_probs, ref["masks"], rtol=1e-4, atol=2e-5)
    assert got.mask_probs.shape[1:] == (1, 28, 28)
    predict_stages = {"preprocess", "backbone", "rpn", "box_head", "roi_glue", "mask_head"}
    assert set(predictor.stage_seconds) == predict_stages | {"paste_rle", "mask_nms"}  # predict_coco's stages
    assert all(predictor.stage_seconds[s] > 0 for s in predict_stages)


def test_rois_in_chunks_give_the_same_detections(checkpoint):
    """Pooling and heads run Predictor.roi_chunk RoIs at a time; the chunk size changes nothing."""
    predictor = load_predictor(checkpoint, device="cpu")
    image = np.random.default_rng(11).random((72, 90, 3), dtype=np.float32)
    whole = predictor.predict(image)
    predictor.roi_chunk = 7
    chunked = predictor.predict(image)
    assert whole.boxes.shape[0] > 7
    for name in ("boxes", "scores", "labels", "mask_probs"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5)


def test_torch_pipeline_with_scale_maps_boxes_to_original_pixels(tmp_path):
    path = tmp_path / "scaled.pt"
    save_tiny_checkpoint(path, tiny_spec(scale=1.5))
    predictor = load_predictor(path, device="cpu")
    image = np.random.default_rng(3).random((41, 57, 3), dtype=np.float32)
    got = predictor.predict(image)
    ref = above_floor(eager(predictor.model, image), predictor.spec.score_floor)
    torch.testing.assert_close(got.boxes, ref["boxes"], rtol=1e-5, atol=1e-4)
    assert float(got.boxes[:, 2].max()) <= 57 + 1e-3 and float(got.boxes[:, 3].max()) <= 41 + 1e-3


def test_no_detections_gives_empty_tensors(checkpoint):
    predictor = load_predictor(checkpoint, device="cpu")
    predictor.model.roi_heads.score_thresh = 1.1  # nothing can pass: the empty path
    got = predictor.predict(np.zeros((64, 64, 3), np.float32))
    assert got.boxes.shape == (0, 4) and got.scores.shape == (0,) and got.mask_probs.shape == (0, 1, 28, 28)


def test_predict_rejects_wrong_shape(checkpoint):
    predictor = load_predictor(checkpoint, device="cpu")
    with pytest.raises(InputError, match="HxWx3"):
        predictor.predict(np.zeros((10, 10), np.float32))


def test_unknown_backend_lists_valid_ones(checkpoint):
    with pytest.raises(InputError) as err:
        load_predictor(checkpoint, backend="tflite")
    assert all(name in str(err.value) for name in ("trt", "onnxruntime", "openvino", "torch"))
    assert backend_names() == ("trt", "onnxruntime", "openvino", "torch")


def test_checkpoint_runs_only_on_torch(checkpoint):
    with pytest.raises(InputError, match="torch backend"):
        load_predictor(checkpoint, backend="onnxruntime")


def test_missing_model_and_non_export_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint or export folder"):
        load_predictor(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="cellseg.json"):
        load_predictor(tmp_path)


def test_export_folder_with_only_checkpoint_copy_runs_torch(checkpoint, tmp_path):
    from cellseg.checkpoint import load_checkpoint, weights_hash

    ckpt = load_checkpoint(checkpoint)
    folder = tmp_path / "exp"
    folder.mkdir()
    shutil.copy2(checkpoint, folder / "model.pt")
    info = {"metadata": ckpt.metadata, "weights_sha256": weights_hash(ckpt.state_dict)}
    (folder / "cellseg.json").write_text(json.dumps(info))
    assert load_predictor(folder, device="cpu").backend_name == "torch"
    info["weights_sha256"] = "0" * 64
    (folder / "cellseg.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="hash"):
        load_predictor(folder, device="cpu")


def test_trt_on_cpu_machine_fails_in_one_line(checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "cellseg.json").write_text(json.dumps({"metadata": {}, "weights_sha256": "x"}))
    with pytest.raises(BackendUnavailableError) as err:
        load_predictor(folder, backend="trt")
    message = str(err.value)
    assert "\n" not in message and ("tensorrt is not installed" in message or "CUDA is not available" in message)


def test_cuda_device_refused_without_cuda(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
        load_predictor(checkpoint, device="cuda")


def test_predictor_is_backend_agnostic(checkpoint):
    """A custom backend object satisfying the protocol drives the same pipeline."""
    from cellseg.backends.base import Backend
    from cellseg.backends.torch_backend import TorchBackend

    reference = load_predictor(checkpoint, device="cpu")
    inner = TorchBackend(reference.model, torch.device("cpu"))
    assert isinstance(inner, Backend)
    calls = []

    class Counting:
        name = "counting"
        settings: dict = {}

        @classmethod
        def is_available(cls):
            return True, ""

        def run_backbone(self, images):
            calls.append("backbone")
            return inner.run_backbone(images)

        def run_box_head(self, pooled):
            calls.append("box")
            return inner.run_box_head(pooled)

        def run_mask_head(self, pooled):
            calls.append("mask")
            return inner.run_mask_head(pooled)

    predictor = Predictor(reference.spec, reference.model, Counting(), torch.device("cpu"))
    image = np.random.default_rng(7).random((64, 80, 3), dtype=np.float32)
    got, ref = predictor.predict(image), reference.predict(image)
    assert calls == ["backbone", "box", "mask"] and torch.equal(got.boxes, ref.boxes)
