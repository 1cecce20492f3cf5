"""INT8 graphs: static post-training quantisation of the three dense graphs into QDQ ONNX
(onnxruntime.quantization), calibrated on real images, verified by ΔAP against FP32.

Steps (each a function below):
1. `open_data` / `split_images`: the images of DATA (an HW3 root, or a COCO GT JSON with its
   images, as `cellseg bench --data` takes them), split by source group (consep_train_1_000 and _007 share
   group consep_train_1) into calibration and held-out images that never share a source image.
2. `record_calibration_inputs`: the FP32 graphs run through the real Predictor on the calibration
   images; a recording wrapper around the backend keeps the inputs of run_backbone, and a seeded
   random sample of the RoIs given to run_box_head / run_mask_head (a crowded image has
   thousands; BOX_ROIS_PER_IMAGE / MASK_ROIS_PER_IMAGE bound the memory).
3. `quantize_graph`: onnxruntime's quantize_static per graph, QuantFormat.QDQ, per-channel
   weights, one calibration batch at a time (CalibStridedMinMax=1: only one batch's activations
   are held, for every calibration method).
4. `measure_map_drop`: FP32 and INT8 graphs through the same Predictor on the held-out images;
   COCO AP of both against the GT. A drop of segm AP beyond `max_map_drop` refuses the export.

Choices (measured on the consep model, see the README's INT8 section):
- Two schemes (`QuantSettings.for_target`). "onnxruntime" (the default): uint8 asymmetric
  activations, int8 symmetric per-channel weights. Asymmetric activations let the quantiser fold
  every ReLU into the zero point, so onnxruntime fuses DQ->Conv->Q into QLinearConv; with
  symmetric activations the ReLU stays between Conv and Q, and onnxruntime leaves 35 of the
  backbone's 43 convs in FP32 (INT8 was slower than FP32). "tensorrt" (`--trt --int8`): int8
  symmetric activations and weights (zero point 0), the only scheme TensorRT's explicit
  quantization accepts; those graphs are what is verified and what the engines are built from.
- reduce_range (7-bit weights): on AVX2 without VNNI the u8*s8 pair sums (vpmaddubsw) saturate
  int16 with full 8-bit weights; 7 bits keep every pair sum in range.
- Kept FP32 (KEEP_FP32): the first conv (it sees raw normalised pixels, and has 3 input channels:
  little compute to gain) and every layer that writes a graph output (RPN objectness/deltas,
  class logits, box regression, mask logits): their values are thresholded, decoded or ranked
  directly, so their rounding moves boxes, scores and masks; they are small layers."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cellseg.artifacts import BACKBONE_INPUT, FEATURE_PREFIX, GRAPH_NAMES
from cellseg.errors import DataError, InputError, VerificationError

DEFAULT_CALIB_IMAGES = 16
DEFAULT_HOLDOUT_IMAGES = 16
DEFAULT_MAX_MAP_DROP = 0.01
BOX_ROIS_PER_IMAGE = 128  # of ~1000 proposals per image: enough for the box head's ranges
MASK_ROIS_PER_IMAGE = 32
ROI_BATCH = 64  # RoIs per calibration batch of a head
SPLIT_SEED = 0
KEEP_FP32 = ("first_conv", "output_layers")


@dataclass(frozen=True)
class QuantSettings:
    """How the graphs are quantised (recorded in cellseg.json)."""

    target: str = "onnxruntime"  # the runtime the scheme is made for (see the module docstring)
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    reduce_range: bool = True
    per_channel: bool = True
    method: str = "MinMax"  # MinMax | Entropy | Percentile
    keep_fp32: tuple[str, ...] = KEEP_FP32

    @classmethod
    def for_target(cls, target: str) -> "QuantSettings":
        if target == "onnxruntime":
            return cls()
        if target == "tensorrt":
            return cls(target="tensorrt", activation_type="QInt8", activation_symmetric=True)
        raise InputError(f"unknown INT8 target {target!r} (onnxruntime, tensorrt)")

    @property
    def tensorrt_compatible(self) -> bool:
        return (self.activation_type == self.weight_type == "QInt8" and self.activation_symmetric
                and self.weight_symmetric)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_fp32"] = list(self.keep_fp32)
        return d


# ------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataImages:
    """The images of a labelled data set, with what their GT is read from."""

    source: Path
    paths: tuple[Path, ...]
    groups: tuple[str, ...]  # source group of each image (no group straddles calibration/held-out)
    coco_gt: dict | None = None  # COCO JSON source: its GT; an HW3 root's is read per sample
    class_names: tuple[str, ...] = field(default_factory=tuple)


def open_data(data: Path, option: str = "--calib") -> DataImages:
    """An HW3 root (or ROOT/train), or a COCO GT JSON whose images lie beside it, in images/ or
    in test_release/ next to it (as `cellseg bench --data` reads them);
    InputError (one line, naming the path and `option`) otherwise."""
    from cellseg.data.hw3 import class_names_of, list_sample_dirs, sample_group

    data = Path(data)
    if data.is_dir():
        try:
            dirs = list_sample_dirs(data)
        except InputError as err:
            raise InputError(f"{option} {err}") from None
        return DataImages(data, tuple(d / "image.tif" for d in dirs), tuple(sample_group(d.name) for d in dirs),
                          None, class_names_of(data))
    if data.is_file():
        return _open_coco(data)
    raise InputError(f"{data}: no such data folder or COCO GT JSON ({option})")


def _open_coco(path: Path) -> DataImages:
    from cellseg.data.coco import coco_dataset_images, load_coco_gt
    from cellseg.data.hw3 import IMAGE_FILE, sample_group

    gt = load_coco_gt(path)
    for folder in (path.parent, path.parent / "images", path.parent / "test_release"):
        try:
            pairs = coco_dataset_images(gt, folder)
        except DataError:
            continue
        # HW3-style file names (<sample_id>/image.tif) are named by their folder
        groups = tuple(sample_group(p.parent.name if p.name == IMAGE_FILE else p.stem) for _, p in pairs)
        return DataImages(path, tuple(p for _, p in pairs), groups, gt)
    raise DataError(f"{path}: its images are neither beside it nor in images/ or test_release/ next to it")


def split_images(images: DataImages, n_calib: int, n_holdout: int, seed: int = SPLIT_SEED
                 ) -> tuple[list[int], list[int]]:
    """(calibration indices, held-out indices): source groups in a seeded order alternate between
    the two pools; each pool then takes one image per group in turn (spread over many source
    images) up to its count."""
    if n_calib < 1 or n_holdout < 1:
        raise InputError(f"--calib-images ({n_calib}) and the held-out count ({n_holdout}) must be >= 1")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(images.groups):
        by_group.setdefault(g, []).append(i)
    names = sorted(by_group)
    if len(names) < 2:
        raise InputError(f"{images.source}: needs images from at least 2 source images "
                         f"(calibration and held-out images must not share one), found {len(names)}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    calib_groups, holdout_groups = order[0::2], order[1::2]
    return _round_robin(by_group, calib_groups, n_calib), _round_robin(by_group, holdout_groups, n_holdout)


def _round_robin(by_group: dict[str, list[int]], groups: list[str], count: int) -> list[int]:
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(depth < len(by_group[g]) for g in groups):
        picked += [by_group[g][depth] for g in groups if depth < len(by_group[g])]
        depth += 1
    return sorted(picked[:count])


def holdout_gt(images: DataImages, indices: list[int]) -> tuple[dict, list[tuple[int, Path]]]:
    """COCO GT of the chosen images only, and their (image id, path)."""
    if images.coco_gt is not None:
        chosen = [images.coco_gt["images"][i] for i in indices]
        ids = {int(im["id"]) for im in chosen}
        gt = {**images.coco_gt, "images": chosen,
              "annotations": [a for a in images.coco_gt["annotations"] if int(a["image_id"]) in ids]}
        return gt, [(int(im["id"]), images.paths[i]) for im, i in zip(chosen, indices)]
    from cellseg.data.coco import CocoImage, build_coco_gt
    from cellseg.data.hw3 import read_instance_pixels

    def coco_images() -> Iterator[CocoImage]:
        for image_id, i in enumerate(indices, start=1):
            sample = images.paths[i].parent
            image, labels, pixels = read_instance_pixels(sample, images.class_names)
            h, w = image.shape[:2]
            yield CocoImage(image_id, f"{sample.name}/image.tif", h, w, _masks(pixels, h, w), labels)

    gt = build_coco_gt(coco_images(), images.class_names)
    return gt, [(k, images.paths[i]) for k, i in enumerate(indices, start=1)]


def _masks(pixels: list[np.ndarray], h: int, w: int) -> Iterator[np.ndarray]:
    for flat in pixels:  # one full mask at a time
        mask = np.zeros(h * w, bool)
        mask[flat] = True
        yield mask.reshape(h, w)


# ------------------------------------------------------------------------------ calibration
class RecordingBackend:
    """Wraps a backend; keeps the backbone inputs and a seeded sample of each head's RoIs."""

    def __init__(self, inner, rois_per_call: dict[str, int], seed: int = 0) -> None:
        self.inner = inner
        self.name = inner.name
        self.settings = dict(getattr(inner, "settings", {}))
        self.device = getattr(inner, "device", torch.device("cpu"))
        self.rois_per_call = rois_per_call
        self.inputs: dict[str, list[np.ndarray]] = {g: [] for g in GRAPH_NAMES}
        self._gen = torch.Generator().manual_seed(seed)

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def _sample(self, graph: str, pooled: Tensor) -> None:
        limit = self.rois_per_call[graph]
        rows = pooled.shape[0]
        if rows > limit:
            pooled = pooled[torch.randperm(rows, generator=self._gen)[:limit].sort().values]
        if rows:
            self.inputs[graph].append(pooled.detach().cpu().numpy().copy())

    def run_backbone(self, images: Tensor):
        self.inputs["backbone"].append(images.detach().cpu().numpy().copy())
        return self.inner.run_backbone(images)

    def run_box_head(self, pooled: Tensor):
        self._sample("box_head", pooled)
        return self.inner.run_box_head(pooled)

    def run_mask_head(self, pooled: Tensor):
        self._sample("mask_head", pooled)
        return self.inner.run_mask_head(pooled)


def record_calibration_inputs(predictor, paths: list[Path], progress: Callable[[], None] = lambda: None
                              ) -> dict[str, list[np.ndarray]]:
    """Calibration batches per graph: one backbone input per image; head RoIs (at most
    BOX/MASK_ROIS_PER_IMAGE per image) regrouped into batches of ROI_BATCH."""
    from cellseg.data.images import read_image

    limits = {"box_head": BOX_ROIS_PER_IMAGE, "mask_head": MASK_ROIS_PER_IMAGE, "backbone": 1}
    recorder = RecordingBackend(predictor.backend, limits)
    predictor.backend = recorder
    rng = np.random.default_rng(SPLIT_SEED)
    heads: dict[str, list[np.ndarray]] = {"box_head": [], "mask_head": []}
    try:
        for path in paths:
            predictor.predict(read_image(path))
            for graph in heads:  # several RoI chunks per image: keep the per-image budget
                rois = np.concatenate(recorder.inputs[graph]) if recorder.inputs[graph] else None
                recorder.inputs[graph] = []
                if rois is not None:
                    keep = rng.permutation(len(rois))[:limits[graph]]
                    heads[graph].append(rois[np.sort(keep)])
            progress()
    finally:
        predictor.backend = recorder.inner
    batches = {"backbone": recorder.inputs["backbone"]}
    for graph, parts in heads.items():
        rois = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
        batches[graph] = [rois[i:i + ROI_BATCH] for i in range(0, len(rois), ROI_BATCH)]
    return batches


class ArrayReader:
    """onnxruntime CalibrationDataReader over recorded batches (with the set_range/len that
    CalibStridedMinMax uses to feed one batch per collect_data call)."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches
        self._range = (0, len(batches))
        self._next = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, end_index)
        self._next = start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._range[1]:
            return None
        batch = self.batches[self._next]
        self._next += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = self._range[0]


# --------------------------------------------------------------------------------- quantise
def layers_kept_fp32(proto, keep: tuple[str, ...]) -> list[str]:
    """Names of the nodes left unquantised: the conv fed by the images ("first_conv") and the
    layers writing a prediction output ("output_layers": RPN objectness and deltas, class
    logits, box regression, mask logits; not the FPN feature maps, which are pooled, not read).
    Always kept: the 1x1 convs that average GroupNorm's channel means over each group (fed by a
    ReduceMean, see ReshapeFreeGroupNorm): they compute statistics, not features."""
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    predictions = {o.name for o in proto.graph.output if not o.name.startswith(FEATURE_PREFIX)}
    means = {out for node in proto.graph.node if node.op_type == "ReduceMean" for out in node.output}
    names = []
    for node in proto.graph.node:
        if node.op_type not in weighted:
            continue
        if node.input[0] in means:
            names.append(node.name)
        elif "first_conv" in keep and node.input[0] == BACKBONE_INPUT:
            names.append(node.name)
        elif "output_layers" in keep and set(node.output) & predictions:
            names.append(node.name)
    return names


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(fp32_path: Path, out_path: Path, batches: list[np.ndarray], settings: QuantSettings
                   ) -> dict[str, Any]:
    """QDQ INT8 copy of one FP32 graph, calibrated on `batches`; returns what was kept FP32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not batches:
        raise InputError(f"{fp32_path.name}: no calibration inputs were recorded "
                         "(the calibration images gave no detections); use more or other --calib images")
    proto = onnx.load(str(fp32_path))
    kept = layers_kept_fp32(proto, settings.keep_fp32)
    reader = ArrayReader(proto.graph.input[0].name, batches)
    with _quiet_root_logger():  # its "consider pre-processing" advice goes to the root logger per graph
        quantize_static(str(fp32_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                        activation_type=getattr(QuantType, settings.activation_type),
                        weight_type=getattr(QuantType, settings.weight_type),
                        nodes_to_exclude=kept, calibrate_method=getattr(CalibrationMethod, settings.method),
                        extra_options={"ActivationSymmetric": settings.activation_symmetric,
                                       "WeightSymmetric": settings.weight_symmetric,
                                       "CalibStridedMinMax": 1})
    return {"kept_fp32": kept, "calibration_batches": len(batches),
            "calibration_rows": int(sum(b.shape[0] for b in batches))}


# ---------------------------------------------------------------------------------- verify
def predict_all(predictor, pairs: list[tuple[int, Path]], progress: Callable[[], None] = lambda: None) -> list[dict]:
    from cellseg.data.images import read_image

    results: list[dict] = []
    for image_id, path in pairs:
        results += predictor.predict_coco(read_image(path), image_id)
        progress()
    return results


def compare_int8(gt: dict, fp32_results: list[dict], int8_results: list[dict]) -> dict[str, Any]:
    """COCO AP of both result sets and how well INT8 reproduces FP32."""
    from cellseg.evaluate import evaluate_coco, match_instances

    fp32, int8 = evaluate_coco(gt, fp32_results), evaluate_coco(gt, int8_results)
    match = match_instances(fp32_results, int8_results, iou=0.5)
    report: dict[str, Any] = {"images": len(gt["images"]), "gt_instances": len(gt["annotations"]),
                              "fp32_detections": len(fp32_results), "int8_detections": len(int8_results),
                              "matched_share_iou0.5": match["matched_share"], "mean_iou": match["mean_iou"],
                              "max_score_diff": match["max_score_diff"]}
    for iou_type in ("segm", "bbox"):
        a, b = fp32[iou_type]["AP"], int8[iou_type]["AP"]
        report[iou_type] = {"fp32_AP": a, "int8_AP": b,
                            "delta_AP": None if a is None or b is None else b - a}
    return report


def check_map_drop(report: dict[str, Any], max_map_drop: float, data: Path) -> None:
    """VerificationError (one line) when INT8 loses more than `max_map_drop` segm AP."""
    segm = report["segm"]
    if segm["fp32_AP"] is None or segm["int8_AP"] is None:
        raise VerificationError(f"{data}: the held-out images have no ground-truth instances, so INT8 "
                                "cannot be verified; use other --calib data")
    drop = -segm["delta_AP"]
    if drop > max_map_drop:
        raise VerificationError(
            f"INT8 graphs lose {drop:.4f} segm AP against FP32 ({segm['fp32_AP']:.4f} -> {segm['int8_AP']:.4f}) "
            f"on {report['images']} held-out images of {data}, beyond --max-map-drop {max_map_drop:g}; "
            f"export refused")


# ------------------------------------------------------------------------------ orchestration
def ort_predictor(model, spec, graph_paths: dict[str, Path], digest: str, precision: str):
    """A CPU Predictor over onnxruntime sessions of `graph_paths`, with `model`'s torchvision glue."""
    from cellseg.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cellseg.pipeline import Predictor

    backend = OnnxRuntimeBackend(graph_paths, device="cpu", expected_hash=digest, precision=precision)
    return Predictor(spec, model, backend, torch.device("cpu"))


def progress_bars():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def calibrate_and_quantize(model, spec, digest: str, folder: Path, images: DataImages, calib: list[int],
                           settings: QuantSettings, progress) -> dict[str, Any]:
    """Record calibration inputs through the FP32 graphs in `folder`, then write g.int8.onnx
    (without cellseg metadata: the exporter adds it) for every graph."""
    from cellseg.artifacts import onnx_paths

    fp32_paths, int8_paths = onnx_paths(folder, "fp32"), onnx_paths(folder, "int8")
    task = progress.add_task("INT8: recording calibration inputs", total=len(calib))
    predictor = ort_predictor(model, spec, fp32_paths, digest, "fp32")
    batches = record_calibration_inputs(predictor, [images.paths[i] for i in calib],
                                        lambda: progress.advance(task))
    del predictor
    report: dict[str, Any] = {}
    task = progress.add_task("INT8: quantising graphs", total=len(GRAPH_NAMES))
    for graph in GRAPH_NAMES:
        report[graph] = quantize_graph(fp32_paths[graph], int8_paths[graph], batches.pop(graph), settings)
        progress.advance(task)
    return report


def verify_int8(model, spec, digest: str, folder: Path, images: DataImages, holdout: list[int],
                progress) -> dict[str, Any]:
    """ΔAP of the INT8 graphs in `folder` against its FP32 graphs on the held-out images."""
    from cellseg.artifacts import onnx_paths

    gt, pairs = holdout_gt(images, holdout)
    results = {}
    for precision in ("fp32", "int8"):
        task = progress.add_task(f"INT8: held-out images, {precision}", total=len(pairs))
        predictor = ort_predictor(model, spec, onnx_paths(folder, precision), digest, precision)
        results[precision] = predict_all(predictor, pairs, lambda: progress.advance(task))
        del predictor
    return compare_int8(gt, results["fp32"], results["int8"])
