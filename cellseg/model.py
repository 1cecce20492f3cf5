"""Build the Mask R-CNN a `ModelSpec` describes, at native pixel scale, with heads sized from the data.

Architectures (cellseg.config.ARCHS):
  maskrcnn_resnet50_fpn     torchvision's v1 layout (TwoMLPHead box head, 4x256 mask head)
  maskrcnn_resnet50_fpn_v2  torchvision's v2 layout (conv box head + BN, 4x256 mask head + BN)
  maskrcnn_resnet18_fpn     light: ResNet-18 + FPN, TwoMLPHead(spec.box_head_dim), narrow mask head
spec.norm: "bn" (BatchNorm2d in the backbone; v2 also in FPN and heads) or "gn" (GroupNorm, 32
groups, in backbone, FPN and the conv heads: trains from random init at any batch size).

Mask head cost, multiply-accumulates per RoI (14x14 RoI features with 256 channels, 28x28 output,
K classes; 3x3 convs on 14x14, 2x2 stride-2 deconv 14->28, 1x1 logits on 28x28):
  default 4x256:  4 * 14*14*256*256*9 = 462.4 M  (the ~0.46 GMAC of the issue)
                  + deconv 14*14*256*256*4 = 51.4 M + logits 28*28*256*K (1.0 M at K=5)
                  = 0.515 GMAC per RoI
  light (128,128): 14*14*256*128*9 = 57.8 M + 14*14*128*128*9 = 28.9 M
                  + deconv 14*14*128*128*4 = 12.8 M + logits 28*28*128*K (0.5 M at K=5)
                  = 0.100 GMAC per RoI (5.1x cheaper)
Box head (TwoMLPHead, runs on every proposal, 1000 at test time): 256*7*7*D + D*D MAC per RoI:
  D=1024: 13.9 MMAC/RoI = 13.9 GMAC per 1000 proposals (more than the whole ResNet-18 FPN on a
  256 px image), D=512: 6.7 GMAC; the light arch uses D=512 by default (see spec_from_data).
See `mask_head_macs_per_roi` for the formula.

Native scale: `NativeScaleTransform` replaces torchvision's GeneralizedRCNNTransform resize (which
scales every image so its short side is 800) by a multiplication with `spec.scale` (1.0 = no
resize at all); normalisation and padding to `spec.size_divisible` are unchanged, and boxes are
mapped back to the input image's pixels in `postprocess`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from cellseg.config import ARCHS, ModelSpec
from cellseg.errors import CheckpointError, InputError
from cellseg.roi_align import ParallelRoIAlign
from cellseg.tv_compat import resnet_fpn_extractor, rpn_test_budgets, set_rpn_test_budgets

DEFAULT_MASK_HEAD = (256, 256, 256, 256)
LIGHT_ARCH = "maskrcnn_resnet18_fpn"
LIGHT_MASK_HEAD = (128, 128)
LIGHT_BOX_HEAD_DIM = 512
MIN_ANCHOR = 8
MIN_DETECTIONS = 1000
GN_GROUPS = 32
FPN_LEVELS = ["0", "1", "2", "3"]  # the levels torchvision's RoI poolers read ("pool" is the RPN's only)


class NativeScaleTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that never resizes to a fixed side: the image (and in training its
    boxes and masks) is multiplied by `scale`; scale 1.0 leaves pixels untouched."""

    def __init__(self, scale: float, image_mean: Sequence[float], image_std: Sequence[float],
                 size_divisible: int) -> None:
        # min/max size are unused (resize is overridden); kept so torchvision code reading them works.
        super().__init__(min_size=800, max_size=1333, image_mean=list(image_mean),
                         image_std=list(image_std), size_divisible=size_divisible)
        if not (scale > 0 and math.isfinite(scale)):
            raise InputError(f"scale must be a positive number, got {scale!r}")
        self.scale = float(scale)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.scale == 1.0:
            return image, target
        h, w = image.shape[-2:]
        image = F.interpolate(image[None], scale_factor=self.scale, mode="bilinear",
                              recompute_scale_factor=True, align_corners=False)[0]
        if target is None:
            return image, target
        new_size = image.shape[-2:]
        target["boxes"] = resize_boxes(target["boxes"], [h, w], list(new_size))
        if "masks" in target:
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), size=new_size)[:, 0].byte()
        return image, target

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(Normalize(mean={self.image_mean}, std={self.image_std}), "
                f"Scale({self.scale}), Pad(size_divisible={self.size_divisible}))")


def mask_head_macs_per_roi(channels: Sequence[int], in_channels: int = 256, num_classes: int = 5) -> int:
    """Multiply-accumulates of the mask head + predictor for one RoI (14x14 in, 28x28 out)."""
    macs, prev = 0, in_channels
    for c in channels:
        macs += 14 * 14 * prev * c * 9
        prev = c
    macs += 14 * 14 * prev * prev * 4  # ConvTranspose2d k2 s2, dim_reduced = last channels
    macs += 28 * 28 * prev * num_classes
    return macs


def level_anchor_sizes(spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes of each FPN level: anchor_sizes[l] * 2 ** (k / n), k < n scales per octave
    (n = 1: torchvision's one size per level)."""
    if len(spec.anchor_sizes) != 5:
        raise CheckpointError(f"anchor_sizes needs one size per FPN level (5), got {list(spec.anchor_sizes)}")
    n = spec.anchor_scales_per_octave
    return tuple(tuple(int(round(int(s) * 2 ** (k / n))) for k in range(n)) for s in spec.anchor_sizes)


def _anchor_generator(spec: ModelSpec) -> AnchorGenerator:
    return AnchorGenerator(sizes=level_anchor_sizes(spec),
                           aspect_ratios=(tuple(float(a) for a in spec.aspect_ratios),) * 5)


def _maskrcnn_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return dict(
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
        rpn_fg_iou_thresh=spec.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=spec.rpn_bg_iou_thresh,
        box_batch_size_per_image=spec.box_batch_size_per_image,
        box_detections_per_img=spec.box_detections_per_img,
        box_score_thresh=spec.box_score_thresh,
        box_nms_thresh=spec.box_nms_thresh,
        box_positive_fraction=spec.box_positive_fraction,
    )


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018's default), fewer when the channels do not divide."""
    return nn.GroupNorm(math.gcd(GN_GROUPS, int(channels)), int(channels))


def _norm_layers(spec: ModelSpec) -> tuple[Any, Any]:
    """(backbone norm, FPN/head norm or None) for the spec's arch and `norm`."""
    if spec.norm == "gn":
        return group_norm, group_norm
    if spec.norm != "bn":
        raise CheckpointError(f"unknown norm {spec.norm!r} (known: bn, gn)")
    return nn.BatchNorm2d, (nn.BatchNorm2d if spec.arch == "maskrcnn_resnet50_fpn_v2" else None)


def _build_architecture(spec: ModelSpec, pretrained: bool) -> MaskRCNN:
    # Random init trains every backbone layer; from pretrained weights conv1+layer1 stay frozen,
    # as torchvision does (trainable_backbone_layers=3). With norm "bn", BatchNorm2d is used in
    # all cases so a checkpoint's state dict always has the same keys (train.py freezes BN
    # statistics when fine-tuning, which is what torchvision's FrozenBatchNorm2d does for v1).
    trainable = 3 if pretrained else 5
    k = spec.num_classes
    ag = _anchor_generator(spec)
    body_norm, neck_norm = _norm_layers(spec)
    if spec.arch == "maskrcnn_resnet50_fpn":
        backbone = resnet_fpn_extractor(resnet50(weights=None, norm_layer=body_norm), trainable, norm_layer=neck_norm,
                                        out_channels=spec.fpn_channels)
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, spec.box_head_dim)
        mask_head = MaskRCNNHeads(backbone.out_channels, list(spec.mask_head_channels), 1, norm_layer=neck_norm)
        rpn_head = RPNHead(backbone.out_channels, ag.num_anchors_per_location()[0])
    elif spec.arch == "maskrcnn_resnet50_fpn_v2":
        backbone = resnet_fpn_extractor(resnet50(weights=None, norm_layer=body_norm), trainable, norm_layer=neck_norm,
                                        out_channels=spec.fpn_channels)
        box_head = FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256, 256, 256, 256],
                                      [spec.box_head_dim], norm_layer=neck_norm)
        mask_head = MaskRCNNHeads(backbone.out_channels, list(spec.mask_head_channels), 1,
                                  norm_layer=neck_norm)
        rpn_head = RPNHead(backbone.out_channels, ag.num_anchors_per_location()[0], conv_depth=2)
    elif spec.arch == LIGHT_ARCH:
        # From scratch with GN, each residual branch starts as identity (zero last-norm gain,
        # Goyal et al. 2017), which steadies the first iterations without BN statistics.
        body = resnet18(weights=None, norm_layer=body_norm, zero_init_residual=spec.norm == "gn" and not pretrained)
        backbone = resnet_fpn_extractor(body, trainable, norm_layer=neck_norm,
                                        out_channels=spec.fpn_channels)
        # The box head stays two FC layers (no norm): a conv box head costs ~17x its MACs per RoI.
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, spec.box_head_dim)
        mask_head = MaskRCNNHeads(backbone.out_channels, list(spec.mask_head_channels), 1, norm_layer=neck_norm)
        rpn_head = RPNHead(backbone.out_channels, ag.num_anchors_per_location()[0])
    else:
        raise InputError(f"unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")
    last = spec.mask_head_channels[-1]
    model = MaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=ag, rpn_head=rpn_head,
        box_roi_pool=ParallelRoIAlign(FPN_LEVELS, 7, 2), box_head=box_head,
        box_predictor=FastRCNNPredictor(spec.box_head_dim, k),
        mask_roi_pool=ParallelRoIAlign(FPN_LEVELS, 14, 2), mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(last, last, k),
        **_maskrcnn_kwargs(spec))
    model.transform = NativeScaleTransform(spec.scale, spec.image_mean, spec.image_std, spec.size_divisible)
    return model


@dataclass(frozen=True)
class WeightsReport:
    source: str
    loaded: int
    skipped_shape: tuple[str, ...]  # keys whose shape differs (class-specific predictors, ...)
    missing: tuple[str, ...]  # model keys the file lacks
    unexpected: tuple[str, ...]  # file keys the model lacks

    def summary(self) -> str:
        return (f"{self.source}: loaded {self.loaded} tensors; {len(self.skipped_shape)} skipped for shape "
                f"({', '.join(sorted({k.rsplit('.', 2)[0] for k in self.skipped_shape})) or '-'}); "
                f"{len(self.missing)} missing; {len(self.unexpected)} unexpected")


def _upgrade_torchvision_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename keys of old torchvision checkpoints (version < 2) as torchvision's own loaders do."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("roi_heads.mask_head.mask_fcn") and len(parts) == 4:
            i = int(parts[2].removeprefix("mask_fcn"))
            key = f"roi_heads.mask_head.{i - 1}.0.{parts[3]}"
        elif key in ("rpn.head.conv.weight", "rpn.head.conv.bias"):
            key = f"rpn.head.conv.0.0.{parts[-1]}"
        out[key] = value
    return out


def load_matching_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> WeightsReport:
    """Load every tensor whose name and shape match the model; report the rest."""
    state = _upgrade_torchvision_keys(dict(state))
    if "conv1.weight" in state and "fc.weight" in state:  # a plain ResNet (ImageNet) state dict
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = tuple(sorted(k for k in state if k in own and own[k].shape != state[k].shape))
    result = model.load_state_dict(usable, strict=False)
    missing = tuple(k for k in result.missing_keys if k not in skipped and not k.endswith("num_batches_tracked"))
    report = WeightsReport(source, len(usable), skipped, missing,
                           tuple(sorted(k for k in state if k not in own)))
    if not usable:
        raise CheckpointError(f"{source}: no tensor matches the {type(model).__name__} "
                              f"(is it a torchvision detection or ResNet state dict?)")
    return report


def _default_weights(arch: str):
    from torchvision.models import ResNet18_Weights
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights
    return {"maskrcnn_resnet50_fpn": MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
            "maskrcnn_resnet50_fpn_v2": MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
            LIGHT_ARCH: ResNet18_Weights.IMAGENET1K_V1}[arch]  # no COCO Mask R-CNN for resnet18


def _download_default(arch: str) -> tuple[dict[str, Tensor], str]:
    weights = _default_weights(arch)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, OSError, hash mismatch, ...: all mean "not usable here"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot download torchvision weights {weights} from {weights.url} (no internet? {first}); "
            f"download that file elsewhere and pass it with --weights PATH") from None
    return state, f"torchvision {weights}"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A torchvision .pth state dict, a torchvision-references checkpoint ({"model": ...}) or a
    cellseg checkpoint ({"state_dict": ..., "metadata": ...})."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({type(err).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return obj


def build_model(spec: ModelSpec, weights: str | None = None) -> MaskRCNN:
    """The Mask R-CNN `spec` describes. weights: None/"none" = random init; "default" =
    torchvision's COCO Mask R-CNN weights (ImageNet backbone for the light arch; needs the
    internet); otherwise a path to a local state dict. Class-specific predictors (and anything
    else whose shape differs) keep their fresh init."""
    if spec.arch not in ARCHS:
        raise InputError(f"unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")
    if weights in (None, "", "none"):
        return _with_budgets(_build_architecture(spec, pretrained=False), spec)
    if weights == "default":
        state, source = _download_default(spec.arch)
    else:
        state, source = read_state_dict(weights), str(weights)
    model = _build_architecture(spec, pretrained=True)
    report = load_matching_weights(model, state, source)
    warnings.warn(report.summary(), stacklevel=2)
    model.cellseg_weights_report = report  # for callers that want to log it
    return _with_budgets(model, spec)


def _with_budgets(model: MaskRCNN, spec: ModelSpec) -> MaskRCNN:
    model.cellseg_spec = spec
    _budgets_for_each_forward(model, spec)
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    """The ModelSpec a model was built from (unwrapping DistributedDataParallel)."""
    return getattr(model, "module", model).cellseg_spec


def model_from_checkpoint(state_dict: dict[str, Tensor], spec: ModelSpec, source: str = "checkpoint") -> MaskRCNN:
    """Rebuild a trained model exactly (strict): anything the spec does not describe is refused."""
    model = build_model(spec)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else "mismatch"
        raise CheckpointError(f"{source}: weights do not fit the {spec.arch} its metadata describes ({detail})") from None
    return model.eval()


def inference_budgets(spec: ModelSpec, height: int, width: int) -> tuple[int, int, int]:
    """(RPN pre-NMS top-n per level, RPN post-NMS top-n, detections) for a network input of
    height x width: the spec's numbers, raised to 2x the densest training image's instances per
    pixel times this area. Budgets per image that ignore the area would let a large tile of the
    same tissue keep fewer cells per pixel than the crops the model was trained and scored on."""
    need = math.ceil(2.0 * spec.max_instances_per_mpx * height * width / 1e6)
    detections = max(spec.box_detections_per_img, need)
    return (max(spec.rpn_pre_nms_top_n_test, detections), max(spec.rpn_post_nms_top_n_test, detections),
            detections)


@contextlib.contextmanager
def inference_budgets_applied(model: MaskRCNN, spec: ModelSpec,
                              image_sizes: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Within the block, the model's test-time RPN and detection budgets are those of a batch of
    network-input sizes (the largest image decides; one image at a time is the usual inference
    batch). On exit, also on an exception, the previous budgets are back: the model is shared
    (training's validation runs on the live model), so a call must leave no trace in it."""
    h, w = max(((int(a), int(b)) for a, b in image_sizes), key=lambda s: s[0] * s[1])
    pre, post, detections = inference_budgets(spec, h, w)
    saved_rpn, saved_detections = rpn_test_budgets(model.rpn), model.roi_heads.detections_per_img
    set_rpn_test_budgets(model.rpn, pre, post)
    model.roi_heads.detections_per_img = detections
    try:
        yield
    finally:
        set_rpn_test_budgets(model.rpn, *saved_rpn)
        model.roi_heads.detections_per_img = saved_detections


def _budgets_for_each_forward(model: MaskRCNN, spec: ModelSpec) -> None:
    """An eager `model(images)` in eval mode runs inside inference_budgets_applied, like cellseg's
    pipeline (sizes as NativeScaleTransform's interpolate computes them: floor). The pre-hook
    enters the block and the forward hook (called on exceptions too) leaves it."""
    open_blocks: list[contextlib.ExitStack] = []

    def enter(module: MaskRCNN, args: tuple) -> None:
        stack = contextlib.ExitStack()
        if not module.training and args and len(args[0]):
            sizes = [(math.floor(im.shape[-2] * spec.scale), math.floor(im.shape[-1] * spec.scale))
                     for im in args[0]]
            stack.enter_context(inference_budgets_applied(module, spec, sizes))
        open_blocks.append(stack)

    def leave(module: MaskRCNN, args: tuple, output: Any) -> None:
        if open_blocks:
            open_blocks.pop().close()

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


@torch.no_grad()
def predict_raw(model: MaskRCNN, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Eval-mode forward without pasting masks: per image {"boxes" (N,4) xyxy in input-image
    pixels, "scores", "labels", "mask_probs" (N,1,28,28)} — what cellseg.postprocess consumes."""
    if model.training:
        raise RuntimeError("predict_raw needs model.eval()")
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    image_list, _ = model.transform(images)
    with inference_budgets_applied(model, spec_of(model), image_list.image_sizes):
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    out = []
    for det, resized, original in zip(detections, image_list.image_sizes, original_sizes):
        out.append({"boxes": resize_boxes(det["boxes"], list(resized), list(original)),
                    "scores": det["scores"], "labels": det["labels"], "mask_probs": det["masks"]})
    return out


def _power_of_two_near(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def spec_from_data(arch: str, class_names: Sequence[str], category_ids: Sequence[int],
                   object_sizes: np.ndarray, max_instances: int, scale: float = 1.0,
                   max_instances_per_mpx: float = 0.0,
                   **overrides: Any) -> ModelSpec:
    """A ModelSpec sized from the training data.

    object_sizes: one size per training instance in pixels (max(w, h) of its box, or sqrt(area)).
    Anchors: 5 FPN levels doubling from the power of two nearest the 10th percentile of the object
    sizes after `scale` (at least 8): CoNSeP nuclei (5-60 px) get 8..128 instead of 32..512.
    max_object_px: the largest object size after `scale`, rounded up (what a tile overlap must hold).
    Detections and test-time proposals: max(1000, 2 * max_instances) — never a silent 100 — and
    at inference at least 2x `max_instances_per_mpx` (densest training image, per 1e6 pixels
    before `scale`) times the image's area (see inference_budgets)."""
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    sizes = np.asarray(object_sizes, dtype=np.float64).ravel() * scale
    sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
    smallest = max(MIN_ANCHOR, _power_of_two_near(float(np.percentile(sizes, 10)))) if sizes.size else 32
    largest = math.ceil(float(sizes.max())) if sizes.size else 0
    detections = max(MIN_DETECTIONS, 2 * int(max_instances))
    values: dict[str, Any] = dict(
        arch=arch, class_names=tuple(class_names), category_ids=tuple(int(c) for c in category_ids),
        scale=float(scale), max_instances_per_mpx=float(max_instances_per_mpx) / (scale * scale) if scale > 0 else 0.0,
        anchor_sizes=tuple(smallest * 2 ** i for i in range(5)), max_object_px=largest,
        box_detections_per_img=detections,
        rpn_pre_nms_top_n_test=detections, rpn_post_nms_top_n_test=detections,
        rpn_pre_nms_top_n_train=max(2000, detections), rpn_post_nms_top_n_train=max(2000, detections),
    )
    if arch == LIGHT_ARCH:
        values.update(box_head_dim=LIGHT_BOX_HEAD_DIM, mask_head_channels=LIGHT_MASK_HEAD)
    unknown = sorted(set(overrides) - set(ModelSpec.__dataclass_fields__))
    if unknown:
        raise InputError(f"unknown model settings: {unknown}")
    values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()})
    spec = ModelSpec(**values)
    # Round-trip through the checkpoint schema so an invalid combination fails now, not at load.
    return ModelSpec.from_dict(spec.to_dict())
