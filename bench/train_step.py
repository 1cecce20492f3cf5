"""Benchmark: seconds per training iteration (forward, backward, AdamW step) on real crops, for
mask-head widths and RoI poolers (torchvision's MultiScaleRoIAlign, cellseg's ParallelRoIAlign).

    python -m cellseg.bench.train_step DATA [--mask-heads 128,64] [--batch-size 4] [--crop-size 256]
        [--iters 8] [--out-dir bench/results] [--stem NAME] [--force]

The model is the cpu-scratch recipe's (light ResNet-18-FPN, GroupNorm, 64-channel FPN, its RoI
sampling), anchors sized from the crops. Every variant starts from the same initial weights (the
mask head aside) and trains on the same fixed batches of `cells`-augmented crops of DATA's first
training samples: one untimed iteration, then `--iters` timed ones; the median is reported.
Variants run one after another in this process, so they share the machine's state. Writes
<out-dir>/<stem>.{json,md,png} (default stem: <date>-train-step-<N>cpu)."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from cellseg.bench.core import environment_info, fmt
from cellseg.bench.results_files import new_figure, run_as_command, save_figure, write_and_print

POOLERS = ("torchvision", "parallel")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cellseg.bench.train_step", description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path, help="training data (HW3 layout: train/<id>/image.tif + class<k>.tif)")
    p.add_argument("--mask-heads", default="128,64", help="mask-head widths to compare (2 convs each)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--stem", default="")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    return p.parse_args(argv)


def fixed_batches(data: Path, batch_size: int, crop_size: int, count: int = 2) -> tuple[list, tuple[str, ...]]:
    """`count` collated batches of augmented crops (seeded, so every variant sees the same)."""
    from cellseg.data.dataset import CellDataset, collate
    from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs

    root = find_train_root(data)
    names = class_names_of(root)
    dirs = list_sample_dirs(root)[:batch_size * count]
    dataset = CellDataset(dirs, names, augment=True, crop_size=crop_size, mode="cells", seed=0)
    items = [dataset[i] for i in range(len(dirs))]
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)], names


def variant_model(batches: list, names: tuple[str, ...], mask_head: int, pooler: str):
    import numpy as np
    import torch
    from torchvision.ops import MultiScaleRoIAlign

    from cellseg.model import FPN_LEVELS, build_model, spec_from_data
    from cellseg.recipes import RECIPES

    boxes = torch.cat([t["boxes"] for _, targets in batches for t in targets])
    sizes = (boxes[:, 2:] - boxes[:, :2]).amax(1).numpy()
    most = max(len(t["labels"]) for _, targets in batches for t in targets)
    settings = {**RECIPES["cpu-scratch"].model, "mask_head_channels": (mask_head, mask_head)}
    spec = spec_from_data("maskrcnn_resnet18_fpn", names, tuple(range(1, len(names) + 1)), np.asarray(sizes),
                          most, **settings)
    torch.manual_seed(0)
    model = build_model(spec).train()
    if pooler == "torchvision":
        model.roi_heads.box_roi_pool = MultiScaleRoIAlign(FPN_LEVELS, 7, 2)
        model.roi_heads.mask_roi_pool = MultiScaleRoIAlign(FPN_LEVELS, 14, 2)
    return model


def time_iterations(model, batches: list, iters: int) -> list[float]:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for k in range(iters + 1):
        images, targets = batches[k % len(batches)]
        t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if k:  # the first one warms up allocators and kernels
            seconds.append(time.perf_counter() - t0)
    return seconds


def measure(args: argparse.Namespace) -> dict:
    from cellseg.errors import InputError

    try:
        widths = [int(w) for w in args.mask_heads.split(",")]
    except ValueError:
        raise InputError(f"--mask-heads {args.mask_heads!r}: expected comma-separated integers") from None
    if not widths or min(widths) < 1 or args.iters < 1 or args.batch_size < 1 or args.crop_size < 32:
        raise InputError("--mask-heads, --iters and --batch-size must be positive and --crop-size at least 32")
    batches, names = fixed_batches(args.data, args.batch_size, args.crop_size)
    rows = []
    for width in widths:
        for pooler in POOLERS:
            seconds = time_iterations(variant_model(batches, names, width, pooler), batches, args.iters)
            rows.append({"mask_head": width, "pooler": pooler, "median_s": statistics.median(seconds),
                         "min_s": min(seconds), "seconds": seconds})
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"]
    return {"schema": "cellseg-train-step-v1", "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {"data": str(args.data), "batch_size": args.batch_size, "crop_size": args.crop_size,
                         "iters": args.iters}, "rows": rows, "environment": environment_info()}


def render_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    lines = [f"# Training iteration time — {report['started_utc']}", "",
             f"Machine: {env['cpu_model']} (ISA: {', '.join(env['cpu_isa']) or '?'}), {env['cpu_affinity']} usable "
             f"cores, torch threads {env['torch_threads']}. cpu-scratch model, batch {s['batch_size']} x "
             f"{s['crop_size']} px crops of `{s['data']}`, {s['iters']} timed iterations per variant after one "
             f"untimed; speed-up against the first row.", "",
             "| mask head | RoI pooler | median s / iteration | min s | speed-up |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| 2x{r['mask_head']} | {r['pooler']} | {fmt(r['median_s'], '.2f')} | {fmt(r['min_s'], '.2f')} | "
              f"{fmt(r['speedup'], '.2f')}x |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    fig, ax = new_figure((7, 3.6))
    labels = [f"mask head 2x{r['mask_head']}\n{r['pooler']} pooler" for r in rows]
    ax.bar(range(len(rows)), [r["median_s"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize="small")
    ax.set_ylabel("s per training iteration (median)")
    ax.set_title(f"batch {report['settings']['batch_size']} x {report['settings']['crop_size']} px, "
                 f"{report['environment']['cpu_affinity']} cores")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    report = measure(args)
    stem = f"{report['started_utc'][:10]}-train-step-{report['environment']['cpu_affinity']}cpu"
    return write_and_print(report, args, stem, render_markdown, plot)


if __name__ == "__main__":
    run_as_command(main)
