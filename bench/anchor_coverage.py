"""Benchmark: how well the RPN's anchors fit the training objects. Per object size, the share of
objects whose best anchor reaches the RPN's foreground IoU, and the mean number of anchors that
do (an object's positives in RPN training, besides torchvision's best-anchor match), for each
number of anchor scales per octave and foreground IoU.

    python -m cellseg.bench.anchor_coverage DATA [--scales 1,2,3] [--fg 0.7,0.5] [--objects 3000]
        [--seed 0] [--out-dir bench/results] [--stem NAME] [--force]

Anchors are the model's (cellseg.model.level_anchor_sizes of a spec sized from DATA's training
objects, as `cellseg train` sizes it; the recipe's aspect ratios). `--objects` training boxes
(w, h), drawn at random, are each placed at a random sub-pixel offset, since a crop puts an
object anywhere on the stride grid. Size groups are multiples of the smallest anchor, so they
mean the same for any data. Writes <out-dir>/<stem>.{json,md,png}."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cellseg.bench.core import environment_info, fmt
from cellseg.bench.results_files import new_figure, run_as_command, save_figure, write_and_print

# Size groups in units of the smallest anchor (sqrt(w * h) of the object's box).
SIZE_EDGES = (0.0, 1.0, 1.5, 2.0, 3.0, float("inf"))
STRIDES = (4, 8, 16, 32, 64)  # FPN levels P2-P6, torchvision's Mask R-CNN
BOXES_PER_CHUNK = 256  # rows of the box x anchor IoU matrix held at once


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cellseg.bench.anchor_coverage", description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path, help="training data (HW3 layout: train/<id>/image.tif + class<k>.tif)")
    p.add_argument("--scales", default="1,2,3", help="anchor scales per octave to compare")
    p.add_argument("--fg", default="0.7,0.5", help="RPN foreground IoU thresholds to compare")
    p.add_argument("--objects", type=int, default=3000, help="training boxes to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--stem", default="")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    return p.parse_args(argv)


def training_boxes(data: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, 2) width, height of every training instance's box, and the class names."""
    from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs, pixels_to_box, read_instance_pixels

    root = find_train_root(data)
    names = class_names_of(root)
    sizes = []
    for sample in list_sample_dirs(root):
        image, _, pixels = read_instance_pixels(sample, names)
        width = image.shape[1]
        sizes += [(x2 - x1, y2 - y1) for x1, y1, x2, y2 in (pixels_to_box(p, width) for p in pixels)]
    return np.asarray(sizes, np.float64).reshape(-1, 2), names


def placed_boxes(sizes: np.ndarray, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """xyxy boxes of the given (w, h), each at a random offset within 32 px of the canvas centre."""
    corner = canvas / 2 - sizes / 2 + rng.uniform(-32, 32, size=sizes.shape)
    return np.concatenate([corner, corner + sizes], 1)


def anchors_for(level_sizes: tuple[tuple[int, ...], ...], ratios: Sequence[float], canvas: int):
    """Every anchor of a canvas x canvas image, as the model's AnchorGenerator places them."""
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    generator = AnchorGenerator(level_sizes, (tuple(float(r) for r in ratios),) * len(level_sizes))
    features = [torch.zeros(1, 1, canvas // s, canvas // s) for s in STRIDES]
    return generator(ImageList(torch.zeros(1, 3, canvas, canvas), [(canvas, canvas)]), features)[0]


def best_and_counts(boxes: np.ndarray, anchors, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Each box's best anchor IoU, and how many anchors reach each threshold ((N,), (N, T))."""
    import torch
    from torchvision.ops import box_iou

    best, counts = [], []
    for start in range(0, len(boxes), BOXES_PER_CHUNK):
        iou = box_iou(torch.as_tensor(boxes[start:start + BOXES_PER_CHUNK], dtype=torch.float32), anchors)
        best.append(iou.amax(1).numpy())
        counts.append(np.stack([(iou >= t).sum(1).numpy() for t in thresholds], 1))
    return np.concatenate(best), np.concatenate(counts).reshape(-1, len(thresholds))


def coverage_rows(side: np.ndarray, smallest: int, scales: int, best: np.ndarray, counts: np.ndarray,
                  thresholds: Sequence[float]) -> list[dict]:
    """One row per size group (box side `side`, in units of the `smallest` anchor) and threshold."""
    rows = []
    for lo, hi in zip(SIZE_EDGES[:-1], SIZE_EDGES[1:]):
        mine = (side >= lo * smallest) & (side < hi * smallest)
        if not mine.any():
            continue
        for k, fg in enumerate(thresholds):
            rows.append({"scales_per_octave": scales, "fg_iou": fg, "size_from": lo * smallest,
                         "size_to": hi * smallest, "objects": int(mine.sum()),
                         "covered": float(np.mean(best[mine] >= fg)), "mean_positives": float(counts[mine, k].mean()),
                         "median_best_iou": float(np.median(best[mine]))})
    return rows


def _parse_list(text: str, kind: type, option: str) -> list:
    from cellseg.errors import InputError

    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected comma-separated {kind.__name__} values") from None
    return values


def measure(args: argparse.Namespace) -> dict:
    from cellseg.config import MAX_ANCHOR_SCALES
    from cellseg.errors import InputError
    from cellseg.model import level_anchor_sizes, spec_from_data
    from cellseg.recipes import RECIPES

    scales, thresholds = _parse_list(args.scales, int, "--scales"), _parse_list(args.fg, float, "--fg")
    if not all(1 <= s <= MAX_ANCHOR_SCALES for s in scales) or not all(0 < t <= 1 for t in thresholds):
        raise InputError(f"--scales must lie in 1..{MAX_ANCHOR_SCALES} and --fg in (0, 1]")
    if args.objects < 1:
        raise InputError("--objects must be positive")
    sizes, names = training_boxes(args.data)
    if not len(sizes):
        raise InputError(f"{args.data}: no training instances")
    rng = np.random.default_rng(args.seed)
    sizes = sizes[rng.choice(len(sizes), min(args.objects, len(sizes)), replace=False)]
    settings = RECIPES["cpu-scratch"].model
    spec = spec_from_data("maskrcnn_resnet18_fpn", names, tuple(range(1, len(names) + 1)), sizes.max(1), 1,
                          **settings)
    ratios = spec.aspect_ratios
    canvas = int(64 * np.ceil((sizes.max() + 128) / 64))
    boxes = placed_boxes(sizes, canvas, rng)
    side = np.sqrt(sizes.prod(1))
    rows = []
    for n in scales:
        level_sizes = level_anchor_sizes(dataclasses.replace(spec, anchor_scales_per_octave=n))
        best, counts = best_and_counts(boxes, anchors_for(level_sizes, ratios, canvas), thresholds)
        rows += coverage_rows(side, spec.anchor_sizes[0], n, best, counts, thresholds)
    return {"schema": "cellseg-anchor-coverage-v1",
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {"data": str(args.data), "objects": int(len(sizes)), "seed": args.seed,
                         "anchor_sizes": list(spec.anchor_sizes), "aspect_ratios": list(ratios), "canvas": canvas},
            "rows": rows, "environment": environment_info()}


def render_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Anchor coverage — {report['started_utc']}", "",
             f"{s['objects']} training boxes of `{s['data']}` at random offsets; anchors {s['anchor_sizes']} px "
             f"(one per FPN level, x the scales per octave), aspect ratios {s['aspect_ratios']}. *covered*: share "
             "of boxes with an anchor at IoU >= the foreground IoU; *positives*: anchors at that IoU per box "
             "(mean).", "",
             "| scales / octave | fg IoU | box size px | boxes | covered | positives | median best IoU |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['scales_per_octave']} | {r['fg_iou']:g} | {r['size_from']:.0f}-{r['size_to']:.0f} | "
              f"{r['objects']} | {fmt(r['covered'], '.2f')} | {fmt(r['mean_positives'], '.2f')} | "
              f"{fmt(r['median_best_iou'], '.2f')} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    fig, ax = new_figure((7, 3.8))
    for key in sorted({(r["scales_per_octave"], r["fg_iou"]) for r in rows}):
        mine = [r for r in rows if (r["scales_per_octave"], r["fg_iou"]) == key]
        ax.plot(range(len(mine)), [r["mean_positives"] for r in mine], marker="o",
                label=f"{key[0]} scale(s)/octave, fg IoU {key[1]:g}")
        ax.set_xticks(range(len(mine)), [f"{r['size_from']:.0f}-{r['size_to']:.0f}" for r in mine])
    ax.set_xlabel("object box size, sqrt(w*h) px")
    ax.set_ylabel("positive anchors per object")
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    report = measure(args)
    return write_and_print(report, args, f"{report['started_utc'][:10]}-anchor-coverage", render_markdown, plot)


if __name__ == "__main__":
    run_as_command(main)
