"""Named training recipes: settings chosen together for one situation, applied under the options
a user gives by hand (an explicit option or `--set` always wins over the recipe).

cpu-scratch (the default of `cellseg train` without pretrained weights): the light
ResNet-18-FPN Mask R-CNN from random init on a CPU. Why each setting:
  norm gn           GroupNorm in backbone, FPN and mask head. Wu & He, "Group Normalization"
                    (ECCV 2018) train Mask R-CNN from scratch with GN and match ImageNet
                    pre-training; He et al., "Rethinking ImageNet Pre-training" (ICCV 2019) do
                    the same with GN (or SyncBN): from-scratch detectors need a normalisation
                    that does not depend on the batch (2-4 crops here), not pre-training.
  zero-init resid.  (model.py, gn from scratch) each residual branch starts as identity.
  box sampling      128 RoIs per image, half of them positive (torchvision: 512, 25 %): with
                    ~45 nuclei per 256 px crop, 64 positives cover every object while the mask
                    head (which runs on every positive RoI, the largest training cost on a CPU
                    after the backbone) sees half as many RoIs as with 512 x 25 %.
  FPN width 64      (torchvision: 256) At 256 px the FPN's and RPN's 3x3 convs on the stride-4
                    level cost more than the whole ResNet-18; 64 channels per level made a training
                    iteration 2.2x faster (batch 4 x 256 px: 7.7 -> 3.5 s on 2 cores), and in a
                    20-minute proxy the narrow model was further along at equal wall time (the
                    proxy table in bench/results). Nuclei are small, simple shapes: the heads
                    need few channels.
  mask head 64      2 convs of 64 channels (the light arch: 128). The mask head runs on every
                    positive RoI (up to 64 per crop) and was the largest cost of an iteration at
                    128 channels (its 2x2 deconv's backward alone ~0.6 s per batch); at 64 a
                    batch of 4 x 256 px took 3.27 s instead of 4.28 on 2 cores, and validation,
                    where it runs on every detection, got cheaper too. Nuclei are small, simple
                    shapes, as for the FPN width.
  box head          the light arch's 2 FC of 512; anchors 8..128 px come from the data.
  anchors           2 scales per octave (8, 11, 16, 23, ... px) and RPN foreground IoU 0.5
                    (torchvision: 1 scale, 0.7). Nuclei are 8-30 px and the finest level's
                    stride is 4 px, so a nucleus off the anchor grid or between two sizes rarely
                    overlaps any anchor by 0.7: of 3000 CoNSeP training boxes placed at random
                    offsets, 6-13 % (per size group) had an anchor at IoU >= 0.7, so the RPN
                    learned each nucleus from its single best anchor (torchvision's low-quality
                    match). With these settings a box over 8 px has ~5 positive anchors and
                    96-99 % have at least one (python -m cellseg.bench.anchor_coverage DATA).
                    A 2-hour run with them reached val AP50 0.361 against 0.327 for the same
                    recipe with one scale and 0.7, both scored with the same output rules; see
                    below for what else differed.
  crop 256, batch 1 native pixel size (CoNSeP crops are 256 px). GN makes the batch size a
                    question of updates per CPU-second: in the 18-minute proxies batch 1 made
                    5.1x as many optimizer steps as batch 4 (1721 against 337; 1.3x the images),
                    and it won both those proxies and the 2-hour check (below).
  augment cells     flips, 90-degree rotations, scale jitter x[0.8, 1.25], HED stain jitter
                    for brightfield / gain + gamma for fluorescence (cellseg.data.dataset).
  AdamW             lr 4e-4, weight decay 0.05, 200 warm-up iterations (at most 10 % of the
                    run), cosine to zero at the end of the run (fitted to --time-budget when one
                    is given). torchvision's v2 Mask R-CNN puts normalisation in FPN and heads
                    after Li et al.,
                    "Benchmarking Detection Transfer Learning with Vision Transformers" (2021),
                    whose recipe (AdamW, scale jitter, long schedule) also trains from random
                    init; here scaled down to a CPU budget.
  repeat factor 0.5 LVIS repeat-factor sampling: crops holding a class found in under half of
                    the training crops are repeated (CoNSeP: class1 "other", in 27 % of crops,
                    x1.37).
The probe this starts from: ResNet-18-FPN + GN, native 256 px crops, anchors 8-128, AdamW,
cosine: val AP 0.10 / AP50 0.25 after 45 minutes on 2 cores, not plateaued. Measured with this
recipe on CoNSeP (bench/results/2026-12-01-train-consep-cpu-scratch-*): a 2-hour budget gives
val segm AP50 0.30 at its best epoch (0.303 on the class-stratified split, at 87 minutes; 0.304
on the older split without class3), then holds; with the 64-channel mask head the same budget
runs 1914 iterations instead of 1380 and reaches AP50 0.315 (0.327 exported, with the mask score
decay); with the anchors above (and the parallel RoI pooler: 2078 iterations) AP50 0.361 (AP
0.162). That comparison is not one setting alone: the iterations differ by 9 %. Nor is the gain
where the anchor count suggested: under the same output rules the newer model finds fewer of the
smallest quarter of val nuclei (30 % against 37 %) and outputs 9964 results against 13977; its AP50
rises through class3 (0.41 -> 0.48) and class1 (0.10 -> 0.14), so its results are better
ranked, not more numerous. Eight 18-minute proxies, one setting changed each
(bench/results/2026-12-02-train-consep-proxies-18min; noise of one comparison, by a second seed on
the same split: 0.001 AP50): batch 1 (+0.076) and batch 2 (+0.049) beat batch 4 by far; 256 RoIs at
25 % positive and basic augmentation +0.02; lr 8e-4 and BatchNorm within 0.006. The 2-hour check of
batch 1 (bench/results/2026-12-02-train-consep-cpu-scratch-batch1-e401cc7, on an Intel Xeon whose
iterations ran about twice as fast as the AMD EPYC's above, so not a like-for-like comparison):
21146 iterations, best epoch 43 at 108 minutes, val segm AP 0.213, AP50 0.452 (per class: class1
0.198, class2 0.697, class3 0.615, class4 0.298), AP50 >= 0.41 at every epoch from 68 minutes on; exported, the
same on onnxruntime and OpenVINO; on 1024 px mosaics of the val crops AP50 0.401. So batch 1 is
the recipe's. The other proxy gains (256 RoIs at 25 %, basic augmentation) are not checked at 2 hours.
Class 2 is the easiest class here (AP50 ~0.7); class1 ("other", the rarest, many kinds of nuclei
in one label) stays lowest.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from cellseg.config import TrainConfig
from cellseg.errors import InputError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    train: dict[str, Any]  # TrainConfig fields
    model: dict[str, Any]  # ModelSpec fields (what `--set` would give)


RECIPES: dict[str, Recipe] = {
    "none": Recipe("none", "plain options: TrainConfig's own defaults, nothing added", {}, {}),
    "cpu-scratch": Recipe(
        "cpu-scratch", "light ResNet-18-FPN from random init on a CPU: GroupNorm, 64-channel FPN, small-object RoI "
        "sampling, cell augmentation, AdamW + cosine, repeat-factor sampling",
        train=dict(arch="maskrcnn_resnet18_fpn", epochs=30, batch_size=1, crop_size=256, lr=4e-4,
                   weight_decay=0.05, scheduler="cosine", warmup_iters=200, augment="cells",
                   repeat_factor_threshold=0.5),
        model=dict(norm="gn", fpn_channels=64, mask_head_channels=(64, 64), box_batch_size_per_image=128,
                   box_positive_fraction=0.5, rpn_batch_size_per_image=256, anchor_scales_per_octave=2,
                   rpn_fg_iou_thresh=0.5),
    ),
}


def default_recipe(weights: str) -> str:
    """cpu-scratch for random init; plain options when fine-tuning pretrained weights (BN frozen)."""
    return "cpu-scratch" if weights in ("", "none") else "none"


def recipe_config(name: str, given: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of recipe `name` under the explicitly `given` TrainConfig fields (which
    win); the recipe's model settings go under the given `model_overrides` (which win too)."""
    if name not in RECIPES:
        raise InputError(f"--recipe {name}: unknown recipe (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    fields = {**recipe.train, **given, "recipe": name}
    overrides = {**recipe.model, **dict(given.get("model_overrides", ()))}
    fields["model_overrides"] = tuple(overrides.items())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InputError(f"recipe {name}: unknown training settings {unknown}")
    return TrainConfig(**fields)


def recipe_record(cfg: TrainConfig) -> dict[str, Any]:
    """What the checkpoint metadata keeps of the recipe: its name and every setting it chose,
    as the run actually used them (after the user's own options)."""
    recipe = RECIPES.get(cfg.recipe)
    train_keys = sorted(recipe.train) if recipe else []
    model = dict(cfg.model_overrides)
    return {"name": cfg.recipe,
            "settings": {**{k: getattr(cfg, k) for k in train_keys},
                         "model": {k: model[k] for k in sorted(recipe.model) if k in model} if recipe else {}}}


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, option: str = "--time-budget") -> float:
    """'2h', '90m', '45s', '1.5h' or plain seconds -> seconds (> 0)."""
    match = _DURATION.match(str(text))
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()] if match else float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"{option} {text!r}: expected a positive duration such as 2h, 90m, 45s or 7200")
    return seconds
