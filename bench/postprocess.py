"""Benchmark: cellseg.postprocess.paste_and_encode against the torchvision reference.

python -m cellseg.bench.postprocess --instances 300 --size 1024 [--rounds 5] [--seed 0]

Same inputs for both: cell-sized boxes (8..60 px) at random places in a size x size image and
smooth 28x28 blob probabilities. Reference = torchvision paste_masks_in_image into full-size
canvases (in chunks of 64 masks, to bound memory; the work is per mask either way) + `>
threshold` + pycocotools encode of each full-size mask. Prints a table of per-round times and a
final JSON line {"instances", "size", "reference_ms", "cellseg_ms", "speedup", "identical", "n",
"reference_min_ms", "cellseg_min_ms"} (medians over rounds unless named min; identical = RLE
strings equal to the reference, out of n)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from pycocotools import mask as mask_util

from cellseg.postprocess import paste_and_encode

REFERENCE_CHUNK = 64


def make_inputs(instances: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_probs [N,1,28,28] smooth blobs in [0,1], boxes [N,4] xyxy of 8..60 px cells)."""
    rng = np.random.default_rng(seed)
    wh = rng.uniform(8, 60, size=(instances, 2))
    xy = rng.uniform(0, 1, size=(instances, 2)) * np.maximum(size - wh, 1)
    boxes = np.concatenate([xy, np.minimum(xy + wh, size)], axis=1).astype(np.float32)
    grid = (np.arange(28) + 0.5) / 28
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    cy, cx = rng.uniform(0.35, 0.65, (2, instances, 1, 1))
    ry, rx = rng.uniform(0.25, 0.5, (2, instances, 1, 1))
    d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    wobble = 0.15 * rng.standard_normal((instances, 28, 28))
    probs = 1 / (1 + np.exp(6 * (d2 - 1) + wobble))
    return torch.from_numpy(probs[:, None].astype(np.float32)), torch.from_numpy(boxes)


def reference_encode(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                     threshold: float) -> list[dict]:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    out = []
    for first in range(0, mask_probs.shape[0], REFERENCE_CHUNK):
        chunk = slice(first, first + REFERENCE_CHUNK)
        pasted = paste_masks_in_image(mask_probs[chunk], boxes[chunk], image_size) > threshold
        for mask in pasted[:, 0]:
            rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            out.append({"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--reference-rounds", type=int, default=None,
                        help="rounds for the slow reference (default: --rounds)")
    args = parser.parse_args(argv)
    mask_probs, boxes = make_inputs(args.instances, args.size, args.seed)
    image_size = (args.size, args.size)
    paste_and_encode(mask_probs, boxes, image_size, args.threshold)  # warm-up
    ref_ms, ours_ms = [], []
    reference = ours = []
    print(f"{'round':>5} {'reference_ms':>13} {'cellseg_ms':>11}")
    for k in range(max(args.rounds, 1)):
        if k < (args.reference_rounds or args.rounds):
            t0 = time.perf_counter()
            reference = reference_encode(mask_probs, boxes, image_size, args.threshold)
            ref_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        ours = paste_and_encode(mask_probs, boxes, image_size, args.threshold)
        ours_ms.append((time.perf_counter() - t0) * 1e3)
        shown = f"{ref_ms[k]:13.1f}" if k < len(ref_ms) else f"{'-':>13}"
        print(f"{k:5d} {shown} {ours_ms[k]:11.2f}")
    identical = sum(a == b for a, b in zip(ours, reference))
    ref_med, ours_med = statistics.median(ref_ms), statistics.median(ours_ms)
    result = {"instances": args.instances, "size": args.size, "reference_ms": round(ref_med, 2),
              "cellseg_ms": round(ours_med, 3), "speedup": round(ref_med / ours_med, 1),
              "identical": identical, "n": len(reference),
              "reference_min_ms": round(min(ref_ms), 2), "cellseg_min_ms": round(min(ours_ms), 3)}
    print(f"{'median':>5} {ref_med:13.1f} {ours_med:11.2f}   speedup {result['speedup']}x,"
          f" identical {identical}/{len(reference)}, torch threads {torch.get_num_threads()}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
