"""Frozen configuration dataclasses. `ModelSpec` is the model half of a checkpoint's metadata:
everything needed to rebuild the network and to pre/post-process exactly as in training.
It round-trips through plain JSON (`to_dict` / `from_dict`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cellseg.errors import CheckpointError

SCHEMA_VERSION = 1

# The architectures `cellseg train --arch` accepts (built in cellseg.model).
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn")
# Normalisation layer kinds a ModelSpec may name (see ModelSpec.norm).
NORMS = ("bn", "gn")
MASK_SCORE_DECAYS = ("none", "matrix")
# Anchor scales per octave a checkpoint may ask for (each adds len(aspect_ratios) anchors per
# location on every level).
MAX_ANCHOR_SCALES = 4


@dataclass(frozen=True)
class ModelSpec:
    """How to build and run one Mask R-CNN. Image sizes are never forced to a fixed side:
    an image is multiplied by `scale` (1.0 = native pixel size) and padded to `size_divisible`."""

    arch: str
    class_names: tuple[str, ...]  # e.g. ("class1", "class2", "class3", "class4")
    category_ids: tuple[int, ...]  # COCO category id per class name (model label i+1 -> category_ids[i])
    # Preprocessing. image_rule names the channel/scaling rule of cellseg.data.images.
    image_rule: str = "rgb01-v1"
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0
    size_divisible: int = 32
    # Region proposal network; anchors sized from the training objects (one size per FPN level).
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Anchor scales per level: anchor_sizes[l] * 2 ** (k / n) for k < n (RetinaNet's scales per
    # octave). With one, a nucleus between two sizes, or off the level's stride grid, rarely
    # reaches the RPN's foreground IoU with any anchor (cellseg.model.level_anchor_sizes).
    anchor_scales_per_octave: int = 1
    # RPN anchor matching in training: IoU >= fg is a positive, < bg a negative (torchvision: 0.7,
    # 0.3; each object's best anchor is a positive whatever its IoU).
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    # RoI heads.
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 1000
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_head_dim: int = 1024
    mask_head_channels: tuple[int, ...] = (256, 256, 256, 256)
    mask_thresh: float = 0.5
    # Output floor at inference: a detection scoring below it gets no mask and is not output.
    # Applied after torchvision's NMS and detection cap, before the mask head, so the mask head
    # runs only on detections that are kept. Greedy NMS and the top-k cap commute with a score
    # cut, so the detections kept are exactly those of an unfloored run scoring at least this.
    # box_score_thresh stays the candidate cut inside torchvision (training's validation, the
    # eager model); this one defaults for every checkpoint, old ones included.
    score_floor: float = 0.1
    # Mask-overlap suppression after paste + RLE: greedy by score, a detection whose mask has
    # IoU above this with a kept one of the same class is dropped (torchvision's NMS compares
    # boxes only). >= 1.0 turns it off.
    mask_nms_thresh: float = 0.5
    # Then the scores of what mask NMS kept: "matrix" decays each by its mask overlap with
    # higher-scoring results of its class (Matrix NMS, cellseg.postprocess.decay_overlap_scores),
    # "none" keeps them. Defaults for every checkpoint, old ones included.
    mask_score_decay: str = "matrix"
    # Instances per million pixels of the densest training image (after `scale`). At inference the
    # detection and proposal budgets above are minimums: an image gets at least 2x this density
    # times its own area, so a 1024 px tile of the same tissue as 256 px training crops keeps the
    # crops' per-cell budget (cellseg.model.inference_budgets). 0 = fixed budgets per image.
    max_instances_per_mpx: float = 0.0
    # Side in pixels (after `scale`) of the largest training object's box: tiled inference keeps
    # its tile overlap at least this wide, so every object lies whole inside some tile.
    # 0 = not recorded (checkpoints from before it was).
    max_object_px: int = 0
    # Normalisation layers: "bn" = BatchNorm2d where the arch has it (backbone; v2 also FPN and
    # heads), frozen when fine-tuning; "gn" = GroupNorm (32 groups) in backbone, FPN and the conv
    # heads (mask head; v2 box head), which trains from random init at any batch size (Wu & He 2018).
    # Checkpoints from before this field are "bn".
    norm: str = "bn"
    # Share of positives among the RoIs sampled per image for the box/mask heads in training.
    box_positive_fraction: float = 0.25
    # Channels of every FPN level, which the RPN conv, box head and mask head read. torchvision
    # uses 256; at 256 px the FPN and RPN 3x3 convs on the stride-4 level cost more than a whole
    # ResNet-18, so a narrower FPN is the cheapest speed lever for small objects on a CPU.
    # Checkpoints from before this field are 256.
    fpn_channels: int = 256
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        """Including background, as torchvision counts."""
        return len(self.class_names) + 1

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if not isinstance(d, dict):
            raise CheckpointError("model metadata is not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CheckpointError(f"model metadata schema_version {version!r} is not supported "
                                  f"(this cellseg reads {SCHEMA_VERSION})")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise CheckpointError(f"model metadata has fields this cellseg does not know: {unknown}")
        missing = sorted(n for n, f in names.items()
                         if n not in d and f.default is dataclasses.MISSING)
        if missing:
            raise CheckpointError(f"model metadata lacks required fields: {missing}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        spec = cls(**kwargs)
        if spec.arch not in ARCHS:
            raise CheckpointError(f"unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")
        if len(spec.class_names) != len(spec.category_ids):
            raise CheckpointError("model metadata: class_names and category_ids differ in length")
        if spec.norm not in NORMS:
            raise CheckpointError(f"model metadata: unknown norm {spec.norm!r} (known: {', '.join(NORMS)})")
        if not 0.0 < float(spec.box_positive_fraction) <= 1.0:
            raise CheckpointError(f"model metadata: box_positive_fraction {spec.box_positive_fraction!r} "
                                  f"must lie in (0, 1]")
        fpn = spec.fpn_channels
        if isinstance(fpn, bool) or not isinstance(fpn, int) or fpn < 1:
            raise CheckpointError(f"model metadata: fpn_channels {fpn!r} must be a positive integer")
        numbers = all(isinstance(v, (int, float)) for v in (spec.score_floor, spec.mask_nms_thresh))
        if not numbers or not 0.0 <= spec.score_floor <= 1.0 or not spec.mask_nms_thresh >= 0.0:
            raise CheckpointError(f"model metadata: score_floor {spec.score_floor!r} must lie in [0, 1] "
                                  f"and mask_nms_thresh {spec.mask_nms_thresh!r} be >= 0")
        scales = spec.anchor_scales_per_octave
        if isinstance(scales, bool) or not isinstance(scales, int) or not 1 <= scales <= MAX_ANCHOR_SCALES:
            raise CheckpointError(f"model metadata: anchor_scales_per_octave {scales!r} must be an integer "
                                  f"in 1..{MAX_ANCHOR_SCALES}")
        fg, bg = spec.rpn_fg_iou_thresh, spec.rpn_bg_iou_thresh
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (fg, bg)) or not 0.0 < bg <= fg <= 1.0:
            raise CheckpointError(f"model metadata: rpn_bg_iou_thresh {bg!r} and rpn_fg_iou_thresh {fg!r} must "
                                  f"satisfy 0 < bg <= fg <= 1")
        if spec.mask_score_decay not in MASK_SCORE_DECAYS:
            raise CheckpointError(f"model metadata: unknown mask_score_decay {spec.mask_score_decay!r} "
                                  f"(known: {', '.join(MASK_SCORE_DECAYS)})")
        return spec


# Learning-rate schedules `cellseg train --scheduler` accepts (per iteration, after a linear warmup).
SCHEDULERS = ("cosine", "multistep")
# How `cellseg train` picks its validation groups (cellseg.data.hw3.split_train_val): "classes"
# matches every class's share of instances as well as the sample count; "groups" the count only.
SPLITS = ("classes", "groups")


@dataclass(frozen=True)
class TrainConfig:
    """One training run; stored as RUN_DIR/config.json (`to_dict` / `from_dict`)."""

    data: str
    out: str
    arch: str = "maskrcnn_resnet18_fpn"
    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    device: str = "auto"  # auto | cpu | cuda
    weights: str = "none"  # none | default | PATH
    resume: bool = False
    seed: int = 0
    workers: int = 0
    crop_size: int = 0  # 0 = whole images; >0 = random crops of this side (native scale kept)
    max_iters_per_epoch: int = 0  # 0 = full epoch; used by the demo and tests to cap time
    scale: float = 1.0
    # ModelSpec fields given by hand (`--set KEY=VALUE`); they win over what the data sizes.
    model_overrides: tuple[tuple[str, Any], ...] = ()
    scheduler: str = "cosine"  # one of SCHEDULERS
    warmup_iters: int | None = None  # None = min(1000, one epoch)
    progress: bool = True  # progress bars and a line per epoch on stderr
    cache: bool = False  # keep decoded training samples in memory (masks bit-packed)
    # Named recipe the settings came from (cellseg.recipes; "none" = plain options); recorded in
    # the checkpoint metadata with the settings it chose.
    recipe: str = "none"
    augment: str = "basic"  # one of AUGMENTS (cellseg.data.dataset)
    # LVIS repeat-factor sampling: a crop holding a class present in a share f < t of the training
    # crops is seen max(1, sqrt(t / f)) times per epoch. 0 = off.
    repeat_factor_threshold: float = 0.0
    # Wall-clock budget of the run in seconds (0 = none): the LR schedule is fitted to it and the
    # run stops in time for its last validation; `epochs` is then an upper bound.
    time_budget_s: float = 0.0
    split: str = "classes"  # one of SPLITS
    # Seed of the validation split (None = `seed`): runs that differ only in their random init and
    # sample order, on one validation set, measure the run-to-run noise of a comparison.
    split_seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_overrides"] = {k: v for k, v in self.model_overrides}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict`; also reads the config.json of runs made before the typed fields
        (their free-form `extra` dict). Unknown keys are ignored. Raises TypeError/ValueError."""
        if not isinstance(d, dict):
            raise TypeError("not a JSON object")
        d = dict(d)
        legacy = d.pop("extra", None) or {}
        if not isinstance(legacy, dict):
            raise TypeError("'extra' is not a JSON object")
        for old, new in (("model", "model_overrides"), ("scheduler", "scheduler"),
                         ("warmup_iters", "warmup_iters"), ("progress", "progress"), ("cache", "cache")):
            if old in legacy and new not in d:
                d[new] = legacy[old]
        overrides = d.get("model_overrides", ())
        if isinstance(overrides, dict):
            overrides = overrides.items()
        d["model_overrides"] = tuple((str(k), v) for k, v in overrides)
        d.setdefault("split", "groups")  # runs made before the stratified split resume with their own split
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
