"""The score floor's AP/speed curve and mask-overlap suppression's effect, for choosing their
ModelSpec defaults (`score_floor`, `mask_nms_thresh`).

For each data set and each floor, every image runs through one Predictor (`predict_coco` with the
floor as its score threshold, one image at a time, after one untimed warm-up image) with mask
suppression off, so the mask head runs only on the detections above the floor and the timings
are the floor's own. Per floor: segm/bbox AP and AP50 (cellseg.evaluate), detections, ms per
image (predict + paste + RLE), the mask head's ms, and duplicate pairs (same class, mask IoU >
0.5, the criterion of the tiled-inference check). The same results then go through
`cellseg.postprocess.apply_output_rules` at each suppression threshold, without and with the
score decay (`mask_score_decay` none / matrix; exactly what Predictor.to_coco does per image):
AP, detections, duplicate pairs and its ms per image.

    python -m cellseg.bench.floor_curve MODEL --data crops=/tmp/m/val/crops \\
        --data mosaics=/tmp/m/g4/mosaics --backend onnxruntime --out-dir bench/results

writes <out-dir>/<date>-floor-curve-<N>cpu.{json,md,png}."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from cellseg.bench.core import environment_info, fmt, fmt_ms, latency_stats_ms, stages_ms
from cellseg.bench.results_files import run_as_command, write_results
from cellseg.config import MASK_SCORE_DECAYS

DEFAULT_FLOORS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_NMS = (1.0, 0.7, 0.5, 0.3)  # 1.0 = off
DUPLICATE_IOU = 0.5  # the tiled-inference check's definition of a duplicate pair


# ------------------------------------------------------------------------------------ measure
def run_floor(predictor: Any, data: Any, floor: float, limit: int | None) -> dict:
    """Every image (the first `limit`) at one floor: results, latencies and stage ms."""
    from cellseg.data.images import read_image

    pairs = list(zip(data.image_paths, data.image_ids))[:limit]
    predictor.predict_coco(read_image(pairs[0][0]), pairs[0][1], floor)  # warm-up, untimed
    base = dict(predictor.stage_seconds)
    results: list[dict] = []
    latencies: list[float] = []
    for path, image_id in pairs:
        image = read_image(path)
        t = time.perf_counter()
        results.extend(predictor.predict_coco(image, image_id, floor))
        latencies.append(time.perf_counter() - t)
    stage_s = {k: v - base.get(k, 0.0) for k, v in predictor.stage_seconds.items()}
    return {"results": results, "latencies_s": latencies, "stages_ms": stages_ms(stage_s, len(latencies)),
            "image_ids": [i for _, i in pairs]}


def duplicate_pairs(results: Sequence[dict], iou: float = DUPLICATE_IOU) -> int:
    """Pairs of one image's entries with the same category and mask IoU > `iou`, summed."""
    from cellseg.postprocess import duplicate_pairs as pairs_in_image

    by_image: dict[int, list[dict]] = defaultdict(list)
    for e in results:
        by_image[e["image_id"]].append(e)
    return sum(pairs_in_image(entries, iou) for entries in by_image.values())


def suppressed(results: Sequence[dict], thresh: float, decay: str = "none",
               floor: float = 0.0) -> tuple[list[dict], float]:
    """The results after per-image mask suppression and score decay, and the seconds it took."""
    from cellseg.postprocess import apply_output_rules

    by_image: dict[int, list[dict]] = defaultdict(list)
    for e in results:
        by_image[e["image_id"]].append(e)
    t = time.perf_counter()
    out = [e for entries in by_image.values() for e in apply_output_rules(entries, thresh, decay, floor)]
    return out, time.perf_counter() - t


def scored(gt: dict, results: list[dict]) -> dict:
    from cellseg.evaluate import evaluate_coco

    m = evaluate_coco(gt, results)
    return {"dets": len(results), "segm_AP": m["segm"]["AP"], "segm_AP50": m["segm"]["AP50"],
            "bbox_AP": m["bbox"]["AP"], "bbox_AP50": m["bbox"]["AP50"],
            "dup_pairs": duplicate_pairs(results)}


def subset_gt(gt: dict, image_ids: Sequence[int]) -> dict:
    ids = set(image_ids)
    return {**gt, "images": [i for i in gt["images"] if i["id"] in ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}


def measure_dataset(predictor: Any, name: str, path: Path, floors: Sequence[float],
                    nms: Sequence[float], limit: int | None) -> dict:
    from rich.progress import track

    from cellseg.bench.harness import load_bench_data

    data = load_bench_data(path)
    rows, nms_rows = [], []
    for floor in track(floors, description=f"{name}: floors"):
        run = run_floor(predictor, data, floor, limit)
        gt = subset_gt(data.gt, run["image_ids"])
        lat = latency_stats_ms(run["latencies_s"])
        rows.append({"floor": floor, **scored(gt, run["results"]), "ms_per_image": lat["mean"],
                     "mask_head_ms": run["stages_ms"].get("mask_head", 0.0), "latency_ms": lat,
                     "stages_ms": run["stages_ms"]})
        for thresh in nms:
            for decay in MASK_SCORE_DECAYS:
                kept, seconds = suppressed(run["results"], thresh, decay, floor)
                nms_rows.append({"floor": floor, "mask_nms_thresh": thresh, "mask_score_decay": decay,
                                 **scored(gt, kept), "nms_ms_per_image": 1000.0 * seconds / len(run["image_ids"])})
    return {"name": name, "data": str(path), "images": len(run["image_ids"]),
            "gt_instances": len(gt["annotations"]), "floors": rows, "mask_nms": nms_rows}


# ------------------------------------------------------------------------------------- report
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: dict) -> str:
    env = report["environment"]
    s = report["settings"]
    lines = [f"# Score floor and mask suppression — {report['started_utc']}", "",
             f"Machine: {env['cpu_model']} (ISA: {', '.join(env['cpu_isa']) or '?'}), {env['cpu_affinity']} usable "
             f"cores, torch threads {env['torch_threads']}. Model `{s['model']}`, backend {s['backend']}. "
             f"One untimed warm-up image per floor, then each image once. Mask suppression off while timing the "
             f"floors; the suppression table applies `apply_output_rules` (suppression, then the score decay or not) "
             f"to the same results. "
             f"Duplicate pairs: same class, mask IoU > {DUPLICATE_IOU}.", ""]
    if s.get("note"):
        lines += [f"Note: {s['note']}", ""]
    for ds in report["datasets"]:
        lines += [f"## {ds['name']}: `{ds['data']}`, {ds['images']} images, {ds['gt_instances']} GT instances", "",
                  "### Score floor (suppression off)", ""]
        lines += _table(["floor", "dets", "segm AP", "segm AP50", "bbox AP", "ms/image", "mask head ms", "dup pairs %"],
                        [[fmt(r["floor"], ".2f"), str(r["dets"]), fmt(r["segm_AP"], ".4f"), fmt(r["segm_AP50"], ".4f"),
                          fmt(r["bbox_AP"], ".4f"), fmt_ms(r["ms_per_image"]), fmt_ms(r["mask_head_ms"]),
                          fmt(100 * r["dup_pairs"] / max(1, r["dets"]), ".2f")] for r in ds["floors"]])
        lines += ["", "### Mask-overlap suppression (1.00 = off)", ""]
        lines += _table(["floor", "mask_nms_thresh", "score decay", "dets", "segm AP", "segm AP50", "bbox AP",
                         "dup pairs", "dup pairs %", "suppression ms/image"],
                        [[fmt(r["floor"], ".2f"), fmt(r["mask_nms_thresh"], ".2f"), r.get("mask_score_decay", "none"),
                          str(r["dets"]),
                          fmt(r["segm_AP"], ".4f"), fmt(r["segm_AP50"], ".4f"), fmt(r["bbox_AP"], ".4f"),
                          str(r["dup_pairs"]), fmt(100 * r["dup_pairs"] / max(1, r["dets"]), ".2f"),
                          fmt_ms(r["nms_ms_per_image"])] for r in ds["mask_nms"]])
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["datasets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        floors = [r["floor"] for r in ds["floors"]]
        ax.plot(floors, [r["segm_AP"] for r in ds["floors"]], "o-", color="tab:blue", label="segm AP")
        ax.plot(floors, [r["segm_AP50"] for r in ds["floors"]], "s--", color="tab:cyan", label="segm AP50")
        ax.set_xlabel("score floor")
        ax.set_ylabel("AP")
        ax.set_title(f"{ds['name']} ({ds['images']} images)")
        twin = ax.twinx()
        twin.plot(floors, [r["ms_per_image"] for r in ds["floors"]], "^-", color="tab:red", label="ms / image")
        twin.plot(floors, [r["mask_head_ms"] for r in ds["floors"]], "v:", color="tab:orange", label="mask head ms")
        twin.set_ylabel("ms per image")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # `path` is a temporary name without .png
    plt.close(fig)


# ---------------------------------------------------------------------------------------- cli
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cellseg.bench.floor_curve", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="checkpoint .pt or export folder")
    p.add_argument("--data", action="append", required=True, metavar="NAME=PATH",
                   help="a data set with GT (HW3 layout or COCO JSON); repeatable")
    p.add_argument("--backend", default=None)
    p.add_argument("--floors", default=",".join(map(str, DEFAULT_FLOORS)))
    p.add_argument("--mask-nms", default=",".join(map(str, DEFAULT_NMS)), help="suppression thresholds; 1.0 = off")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each data set")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--note", default="", help="a line for the report (e.g. 'loaded machine')")
    p.add_argument("--force", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    from cellseg.errors import InputError
    from cellseg.pipeline import load_predictor

    args = parse_args(argv)
    try:
        floors = [float(v) for v in args.floors.split(",")]
        nms = [float(v) for v in args.mask_nms.split(",")]
        sets = [(name, Path(path)) for name, _, path in (d.partition("=") for d in args.data)]
    except ValueError as err:
        raise InputError(f"--floors / --mask-nms must be comma-separated numbers: {err}") from None
    if any(not path.name for _, path in sets) or (args.limit is not None and args.limit < 1):
        raise InputError("--data takes NAME=PATH and --limit a positive number")
    started = datetime.now(timezone.utc)
    predictor = load_predictor(args.model, backend=args.backend)
    # timed without suppression or decay, which are applied to the results afterwards
    predictor.spec = dataclasses.replace(predictor.spec, mask_nms_thresh=1.0, mask_score_decay="none")
    datasets = [measure_dataset(predictor, name, path, floors, nms, args.limit) for name, path in sets]
    env = environment_info()
    report = {"schema": "cellseg-floor-curve-v1", "started_utc": started.isoformat(timespec="seconds"),
              "settings": {"model": str(args.model), "backend": predictor.backend_name, "floors": floors,
                           "mask_nms": nms, "limit": args.limit, "note": args.note},
              "environment": env, "datasets": datasets}
    stem = f"{started:%Y-%m-%d}-floor-curve-{env['cpu_affinity'] or os.cpu_count()}cpu"
    paths = write_results(report, args.out_dir, stem, render_markdown(report), plot, args.force)
    print(render_markdown(report))
    print("wrote " + ", ".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    run_as_command(main)
