"""Benchmark: cellseg.roi_align.pool_rois against torchvision's MultiScaleRoIAlign (CPU).

python -m cellseg.bench.roi_align [--size 256] [--rois 1000] [--min-side 4] [--max-side 120]
                                  [--output 7] [--channels 256] [--rounds 5] [--seed 0]

Same inputs for both: random FPN features (levels '0'..'3' at strides 4..32 of a size x size
image, as Mask R-CNN pools them) and `--rois` boxes with sides drawn log-uniformly between
--min-side and --max-side px, some overhanging the border. --output 7 is the box head's pooler,
14 the mask head's. Prints per-round times and a final JSON line {"rois", "size", "output",
"torchvision_ms", "cellseg_ms", "speedup", "max_abs_diff", "torch_threads"} (medians over
rounds; max_abs_diff after restoring cellseg's row order)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict

import torch
from torchvision.ops import MultiScaleRoIAlign

from cellseg.roi_align import pool_rois, restore_order


def make_inputs(size: int, rois: int, min_side: float, max_side: float, channels: int,
                seed: int) -> tuple["OrderedDict[str, torch.Tensor]", torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features, side = OrderedDict(), (size + 3) // 4
    for name in ("0", "1", "2", "3"):
        features[name] = torch.randn(1, channels, side, side, generator=gen)
        side = (side + 1) // 2
    log_lo, log_hi = torch.log(torch.tensor(min_side)), torch.log(torch.tensor(max_side))
    wh = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(rois, 2, generator=gen))
    xy = torch.rand(rois, 2, generator=gen) * (size + 8) - 4 - wh / 2
    return features, torch.cat([xy, xy + wh], 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rois", type=int, default=1000)
    parser.add_argument("--min-side", type=float, default=4.0)
    parser.add_argument("--max-side", type=float, default=120.0)
    parser.add_argument("--output", type=int, default=7)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    features, boxes = make_inputs(args.size, args.rois, args.min_side, args.max_side, args.channels, args.seed)
    sizes = [(args.size, args.size)]
    reference_pooler = MultiScaleRoIAlign(list(features), args.output, 2)
    pooler = MultiScaleRoIAlign(list(features), args.output, 2)
    expected = reference_pooler(features, [boxes], sizes)  # also the warm-up of both
    pooled, order = pool_rois(pooler, features, boxes, sizes)
    max_diff = float((restore_order(order, pooled) - expected).abs().max())
    ref_ms, ours_ms = [], []
    print(f"{'round':>5} {'torchvision_ms':>15} {'cellseg_ms':>11}")
    for k in range(max(args.rounds, 1)):
        t0 = time.perf_counter()
        reference_pooler(features, [boxes], sizes)
        ref_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        pool_rois(pooler, features, boxes, sizes)
        ours_ms.append((time.perf_counter() - t0) * 1e3)
        print(f"{k:5d} {ref_ms[k]:15.1f} {ours_ms[k]:11.1f}")
    ref_med, ours_med = statistics.median(ref_ms), statistics.median(ours_ms)
    result = {"rois": args.rois, "size": args.size, "output": args.output,
              "torchvision_ms": round(ref_med, 2), "cellseg_ms": round(ours_med, 2),
              "speedup": round(ref_med / ours_med, 2), "max_abs_diff": max_diff,
              "torch_threads": torch.get_num_threads()}
    print(f"{'median':>5} {ref_med:15.1f} {ours_med:11.1f}   speedup {result['speedup']}x, "
          f"max |diff| {max_diff:.1e}, torch threads {torch.get_num_threads()}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
