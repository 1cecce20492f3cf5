"""GPU check: the torch backend on CUDA (FP32, FP16 autocast) against the CPU, and the CUDA
mask-paste path against the CPU one, in one prepared run of a few minutes.

Device tool call (tool `run`, carry [".whl"], timeout_s 420), exactly:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --no-build-isolation --target /tmp/site .whl/*.whl . && export PYTHONPATH=/tmp/site || exit; set -o pipefail; R=$PWD; cd /tmp && PYTHONUNBUFFERED=1 python3 -m cellseg.bench.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Prepare `.whl` here first, in the repo root (`.whl/` is in .gitignore; never commit wheels):
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl pycocotools==2.0.11 faster-coco-eval==1.8.0
Why this command:
- The device's python3 (3.12, torch 2.11+cu130, torchvision 0.26) already has numpy, pillow,
  tifffile, rich, typer, onnx, onnxruntime (CPU) and setuptools; it lacks pycocotools and
  faster-coco-eval (1 MB of wheels, both need only numpy). imagecodecs (28 MB) is needed only
  for LZW/JPEG TIFFs such as the real HW3 files; the synthetic set is deflate, which tifffile
  decodes without it. Add `imagecodecs==2026.10.10` to the download only when DATA needs it.
- `.` in the same pip call builds cellseg from the carried working tree (setuptools, no index)
  into /tmp/site, where `cellseg.bench` and `cellseg.export` exist (in the checkout they are
  top-level bench/ and export/, mapped only by an install). `cd /tmp` before `python3 -m`:
  from the repo root, `-m` would put the bare checkout's `cellseg/` (no bench/) first on the path.
  Paths given as options must therefore be absolute: use "$R/..." (R = the repo root there).
- Without MODEL, a random-init model of --arch (default the light ResNet-18 FPN) is sized from
  the data and checkpointed in a temporary folder: latency, memory and the paste comparison are
  real, AP is meaningless and parity is reported but not gated. A trained checkpoint does not
  fit the 64 MiB carry (light arch: 82 MiB in FP32): write an FP16-weights copy here with
  `python -m cellseg.bench.gpu_check --model runs/x/best.pt --half-copy .gpu/model.pt`
  (41 MiB; add `/.gpu/` to .git/info/exclude), carry [".whl", ".gpu"], and add
  `--model "$R/.gpu/model.pt"` to the command. Loaded into the FP32 model, those weights are
  exactly what both CPU and CUDA run, so the comparison stays fair.
- Without DATA it synthesises a crowded set at 1024 px with cellseg.data.synth (needs nothing
  but the repo). `--data "$R/path"` takes an HW3 root or a COCO GT JSON with its images.

What it measures (report JSON sections: environment, model, data, settings, reference,
precisions.fp32 / precisions.fp16, postprocess, failures):
- reference: the torch backend on the CPU: COCO results on every image (first --max-images),
  segm/bbox AP (cellseg.evaluate), and its latency on the 1024x1024 image (--cpu-runs runs).
- per precision on CUDA: the same images -> ΔAP segm/bbox vs the CPU, matched share and mean
  mask IoU of the CPU's instances (match_instances, IoU >= 0.95); latency per image at
  1024x1024 (predict + paste/RLE to COCO entries; --warmup untimed, torch.cuda.synchronize
  before each clock stop, mean/p50/p90 over --runs) with the pipeline's stage split; peak CUDA
  memory of torch's allocator (reset before the precision's model is loaded).
- postprocess: paste_and_encode on the same random inputs (--paste-instances, default 300 and
  1000 instances at 1024x1024): CPU tensors (numpy run finder) vs mask probabilities on the
  device (torch run finder, device_runs=True; boxes stay on the host, as Detections carry
  them); identical RLEs counted, differing pixels summed, median ms of each.
Gates (exit 6 after the JSON is written): FP32 |ΔAP| > --max-map-drop or matched share <
--min-parity (trained models only), and any RLE differing between the paste paths. FP16 is
reported, not gated. Without CUDA the run stops at once (exit 5, one line) unless --allow-cpu,
which runs the same code with "cpu" in place of "cuda" (FP16 autocast is then listed as
skipped: it needs CUDA) to prove the plumbing.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cellseg.bench.core import (MIN_PARITY, PARITY_IOU, environment_info, fmt, gate_failures,
                                latency_stats_ms, parity_figures, stages_ms, sync)
from cellseg.errors import BackendUnavailableError, CellsegError, InputError, VerificationError

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class CheckConfig:
    out: Path
    device: str = "cuda"  # "cuda", or "cpu" for the --allow-cpu dry run
    model: Path | None = None
    data: Path | None = None
    arch: str = "maskrcnn_resnet18_fpn"  # random-init model when `model` is None
    synth_size: int = 1024
    synth_images: int = 3
    max_images: int = 8
    latency_size: int = 1024
    runs: int = 20
    warmup: int = 3
    cpu_runs: int = 2
    paste_instances: tuple[int, ...] = (300, 1000)
    paste_size: int = 1024
    paste_repeats: int = 5
    max_map_drop: float = 0.005
    min_parity: float = MIN_PARITY
    tf32: bool = True
    seed: int = 0
    force: bool = False


@dataclass
class PrecisionRun:
    precision: str
    device: str
    settings: dict[str, Any]
    load_s: float
    results: list[dict]
    latencies_s: list[float] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)
    latency_instances: int = 0
    peak_cuda_bytes: int | None = None


# ------------------------------------------------------------------------------------ device
def choose_device(allow_cpu: bool) -> str:
    """The device to check: "cuda", or "cpu" for the dry run when CUDA is missing and `allow_cpu`."""
    from cellseg.device import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if allow_cpu:
        return "cpu"
    raise BackendUnavailableError(f"CUDA is not available: {reason} (pass --allow-cpu for a dry run on the CPU)")


def gpu_environment(device: str) -> dict[str, Any]:
    """cellseg.bench's environment (versions, CPU, driver) plus the GPU's details and the
    float32 settings that change CUDA results (TF32)."""
    import torch

    env = environment_info()
    env["device"] = device
    env["tf32"] = {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                   "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                   "float32_matmul_precision": torch.get_float32_matmul_precision()}
    env["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        driver_api = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
        env["gpu_details"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "multiprocessors": props.multi_processor_count,
            "total_memory_mb": props.total_memory / 2**20,
            "driver": env.get("gpu_driver"),
            "cuda_driver_api": driver_api,  # e.g. 13000 = the driver supports CUDA 13.0
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        env["gpu_details"] = None
    return env


# -------------------------------------------------------------------------------- data, model
def prepare_data(data: Path | None, workdir: Path, size: int, n_images: int, seed: int,
                 max_images: int) -> tuple[Any, dict[str, Any]]:
    """BenchData (at most `max_images` images, GT restricted to them) and a description. Without
    `data`: a crowded synthetic set (cellseg.data.synth) of `n_images` test images, the first
    size x size."""
    from cellseg.bench.harness import BenchData, load_bench_data

    synthetic = data is None
    if synthetic:
        from cellseg.data.synth import synthesize

        root = synthesize(workdir / "synth", n_train=0, n_test=n_images, seed=seed, size=size, crowded=True)
        data = root / "test_annotations.json"
    full = load_bench_data(Path(data))
    keep = min(max_images, len(full.image_paths))
    ids = set(full.image_ids[:keep])
    gt = dict(full.gt)
    gt["images"] = [im for im in full.gt["images"] if im["id"] in ids]
    gt["annotations"] = [a for a in full.gt["annotations"] if a["image_id"] in ids]
    bench = BenchData(full.source, gt, full.image_paths[:keep], full.image_ids[:keep])
    sizes = [[int(im["height"]), int(im["width"])] for im in gt["images"]]
    info = {"source": None if synthetic else str(data), "synthetic": synthetic,
            "synth": {"size": size, "images": n_images, "seed": seed, "crowded": True} if synthetic else None,
            "images": keep, "images_available": len(full.image_paths), "sizes_hw": sizes,
            "gt_instances": len(gt["annotations"])}
    return bench, info


def prepare_model(model: Path | None, bench: Any, workdir: Path, arch: str, seed: int) -> tuple[Path, dict[str, Any]]:
    """The checkpoint or export folder to run; without one, a random-init `arch` model sized from
    the data's GT (cellseg.model.spec_from_data), saved as a checkpoint in `workdir`."""
    from cellseg.evaluate import gt_instances_per_image

    if model is not None:
        if not Path(model).exists():
            raise InputError(f"{model}: no such checkpoint or export folder")
        return Path(model), {"source": str(model), "random_init": False}
    import torch

    from cellseg.checkpoint import make_metadata, save_checkpoint
    from cellseg.model import build_model, spec_from_data

    gt = bench.gt
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in gt["annotations"]], dtype=np.float64)
    most = max(gt_instances_per_image(gt).values(), default=1)
    spec = spec_from_data(arch, tuple(c["name"] for c in cats), tuple(c["id"] for c in cats), sides, most)
    torch.manual_seed(seed)
    path = save_checkpoint(workdir / "random_init.pt", build_model(spec).state_dict(),
                           make_metadata(spec, {"note": "random init for cellseg.bench.gpu_check"}))
    return path, {"source": None, "random_init": True, "arch": arch,
                  "box_detections_per_img": spec.box_detections_per_img}


def write_half_checkpoint(src: Path, dst: Path, force: bool = False) -> Path:
    """A copy of checkpoint `src` with its floating-point weights stored as FP16 (half the size,
    so a trained light model fits the device tool's carry). Loading casts them back to FP32."""
    from cellseg.checkpoint import load_checkpoint, save_checkpoint
    from cellseg.fileio import check_writable

    check_writable(dst, force)
    ckpt = load_checkpoint(src)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt.state_dict.items()}
    metadata = dict(ckpt.metadata)
    metadata["training"] = {**metadata.get("training", {}), "weights_stored_as": "float16",
                            "half_copy_of": str(src)}
    return save_checkpoint(dst, state, metadata)


def tile_to_size(image: np.ndarray, size: int) -> np.ndarray:
    """`image` repeated (wrap padding) and cropped to size x size: a 1024^2 image full of cells
    from any data set."""
    h, w = image.shape[:2]
    reps = (-(-size // h), -(-size // w), 1)
    return np.ascontiguousarray(np.tile(image, reps)[:size, :size])


# ---------------------------------------------------------------------------------- measuring
def time_predictor(predictor: Any, image: np.ndarray, runs: int, warmup: int, device: str
                   ) -> tuple[list[float], dict[str, float], int]:
    """Latencies (s) of predict + paste/RLE (Predictor.predict_coco) on `image`, summed stage
    seconds of the timed runs (paste_rle among them), and the number of instances of the last run."""
    entries: list[dict] = []
    for _ in range(warmup):
        entries = predictor.predict_coco(image, 1)
    sync(device)
    base = dict(predictor.stage_seconds)
    latencies: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        entries = predictor.predict_coco(image, 1)
        sync(device)
        latencies.append(time.perf_counter() - t0)
    stages = {s: total - base.get(s, 0.0) for s, total in predictor.stage_seconds.items()}
    return latencies, stages, len(entries)


def measure_precision(model: Path, device: str, precision: str, images: Sequence[np.ndarray],
                      image_ids: Sequence[int], latency_image: np.ndarray, runs: int, warmup: int
                      ) -> PrecisionRun:
    """Load the torch backend on `device` at `precision`, predict every image (COCO entries),
    then time the latency image. Peak CUDA memory covers load, accuracy pass and timing."""
    import torch

    from cellseg.pipeline import load_predictor

    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    predictor = load_predictor(model, backend="torch", device=device, precision=precision)
    run = PrecisionRun(precision, device, dict(predictor.settings), time.perf_counter() - t, [])
    for image, image_id in zip(images, image_ids):
        run.results.extend(predictor.predict_coco(image, image_id))
    if runs > 0:
        run.latencies_s, run.stage_s, run.latency_instances = time_predictor(
            predictor, latency_image, runs, warmup, device)
    if cuda:
        run.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
    del predictor
    gc.collect()
    return run


def latency_figures(run: PrecisionRun) -> dict[str, Any]:
    n = len(run.latencies_s)
    return {"runs": n, "latency_ms": latency_stats_ms(run.latencies_s), "stages_ms": stages_ms(run.stage_s, n),
            "latency_image_instances": run.latency_instances}


def precision_row(run: PrecisionRun, gt: dict, reference: list[dict] | None,
                  reference_metrics: dict | None) -> dict[str, Any]:
    from cellseg.evaluate import evaluate_coco

    metrics = evaluate_coco(gt, run.results)
    row: dict[str, Any] = {"precision": run.precision, "device": run.device, "settings": run.settings,
                           "load_s": run.load_s, "instances": len(run.results), "metrics": metrics,
                           **latency_figures(run),
                           "peak_cuda_mb": run.peak_cuda_bytes / 2**20 if run.peak_cuda_bytes is not None else None}
    if reference is not None and reference_metrics is not None:
        row["parity"] = parity_figures("the CPU", reference, reference_metrics, run.results, metrics)
        row["delta_ap"] = row["parity"]["delta_ap"]
    return row


# ------------------------------------------------------------------------------- postprocess
def paste_inputs(n: int, size: int, seed: int) -> tuple[Any, Any]:
    """n smooth 28x28 mask probabilities and boxes of cell sizes (6..64 px) spread over a
    size x size image, some crossing its border: the CPU tensors both paths start from."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 7, 7, generator=g) * 4.0 + 1.0
    masks = torch.sigmoid(F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False))
    centre = torch.rand(n, 2, generator=g) * (size + 20) - 10
    half = (torch.rand(n, 2, generator=g) * 58 + 6) / 2
    boxes = torch.cat([centre - half, centre + half], dim=1)
    return masks.contiguous(), boxes.contiguous()


def _median_ms(fn: Any, repeats: int, device: str) -> tuple[float, Any]:
    out = fn()  # warm-up (and the result compared)
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times)), out


def compare_paste(n: int, size: int, device: str, repeats: int, seed: int, threshold: float = 0.5) -> dict[str, Any]:
    """paste_and_encode on CPU tensors (numpy run finder) vs mask probabilities on `device`
    (torch run finder): RLE equality and median time of each."""
    from cellseg.data.coco import decode_rle
    from cellseg.postprocess import paste_and_encode

    masks, boxes = paste_inputs(n, size, seed)
    device_masks = masks.to(device)
    sync(device)
    cpu_ms, cpu_rles = _median_ms(lambda: paste_and_encode(masks, boxes, (size, size), threshold), repeats, "cpu")
    dev_ms, dev_rles = _median_ms(lambda: paste_and_encode(device_masks, boxes, (size, size), threshold,
                                                          device_runs=True), repeats, device)
    same = [a == b for a, b in zip(cpu_rles, dev_rles)]
    differing_pixels = sum(int((decode_rle(a) != decode_rle(b)).sum())
                           for a, b, s in zip(cpu_rles, dev_rles, same) if not s)
    return {"instances": n, "image_size": [size, size], "threshold": threshold, "device": device,
            "rles_cpu": len(cpu_rles), "rles_device": len(dev_rles), "identical": int(sum(same)),
            "all_identical": len(cpu_rles) == len(dev_rles) == n and all(same),
            "differing_pixels": differing_pixels, "cpu_ms": cpu_ms, "device_ms": dev_ms,
            "speedup": cpu_ms / dev_ms if dev_ms > 0 else None}


# ------------------------------------------------------------------------------------ the run
def check_failures(report: dict[str, Any], max_map_drop: float, min_parity: float) -> list[str]:
    """One line per gate that failed: FP32 ΔAP / parity (trained models), paste identity."""
    failures: list[str] = []
    fp32 = report["precisions"].get("fp32", {})
    if not report["model"]["random_init"] and "parity" in fp32:
        parity = fp32["parity"]
        failures += gate_failures(f"fp32 on {fp32['device']}", "the CPU", fp32["delta_ap"], parity["matched_share"],
                                  max_map_drop, min_parity, parity.get("ref_count"), parity.get("match_iou", PARITY_IOU))
    for p in report["postprocess"]:
        if not p["all_identical"]:
            failures.append(f"paste {p['instances']} instances: {p['identical']}/{p['rles_cpu']} RLEs identical on "
                            f"{p['device']} vs CPU ({p['differing_pixels']} pixels differ)")
    return failures


def run_gpu_check(cfg: CheckConfig, console: Any = None) -> dict[str, Any]:
    """Everything above, in order; writes cfg.out atomically and returns the report."""
    import torch

    from cellseg.data.images import read_image
    from cellseg.fileio import atomic_write_json, check_writable

    check_writable(cfg.out, cfg.force)
    if cfg.device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    say = (lambda msg: console.print(msg)) if console is not None else (lambda msg: None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellseg-gpu-check-") as tmp:
        workdir = Path(tmp)
        say("data ...")
        bench, data_info = prepare_data(cfg.data, workdir, cfg.synth_size, cfg.synth_images, cfg.seed,
                                        cfg.max_images)
        model, model_info = prepare_model(cfg.model, bench, workdir, cfg.arch, cfg.seed)
        images = [read_image(p) for p in bench.image_paths]
        biggest = max(range(len(images)), key=lambda i: images[i].shape[0] * images[i].shape[1])
        latency_image = tile_to_size(images[biggest], cfg.latency_size)

        say("CPU reference ...")
        ref = measure_precision(model, "cpu", "fp32", images, bench.image_ids, latency_image,
                                cfg.cpu_runs, min(1, cfg.warmup))
        ref_row = precision_row(ref, bench.gt, None, None)
        rows: dict[str, Any] = {}
        for precision in PRECISIONS:
            say(f"{precision} on {cfg.device} ...")
            try:
                run = measure_precision(model, cfg.device, precision, images, bench.image_ids,
                                        latency_image, cfg.runs, cfg.warmup)
            except BackendUnavailableError as err:
                rows[precision] = {"precision": precision, "device": cfg.device, "skipped": str(err)}
                continue
            rows[precision] = precision_row(run, bench.gt, ref.results, ref_row["metrics"])
            if ref_row["latency_ms"]["mean"] and rows[precision]["latency_ms"]["mean"]:
                rows[precision]["speedup_vs_cpu"] = ref_row["latency_ms"]["mean"] / rows[precision]["latency_ms"]["mean"]
        say("paste_and_encode ...")
        paste = [compare_paste(n, cfg.paste_size, cfg.device, cfg.paste_repeats, cfg.seed + n)
                 for n in cfg.paste_instances]

    settings = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in cfg.__dict__.items()}
    report: dict[str, Any] = {
        "tool": "cellseg.bench.gpu_check",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": not cfg.device.startswith("cuda"),
        "environment": gpu_environment(cfg.device),
        "model": model_info, "data": data_info, "settings": settings,
        "latency_image_hw": [cfg.latency_size, cfg.latency_size],
        "reference": ref_row, "precisions": rows, "postprocess": paste,
    }
    report["failures"] = check_failures(report, cfg.max_map_drop, cfg.min_parity)
    report["seconds"] = time.perf_counter() - started
    atomic_write_json(cfg.out, report, force=cfg.force, indent=1)
    return report


# ------------------------------------------------------------------------------------ output
def report_tables(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the precision table and of the postprocess table, as strings."""
    head = ["row", "dets", "segm AP", "ΔAP segm", "ΔAP bbox", "matched %", "mean IoU",
            "mean ms", "p50 ms", "p90 ms", "× CPU", "peak CUDA MB"]
    rows: list[list[str]] = []
    named = [("CPU reference", report["reference"])] + [
        (f"{r['device']} {p}", r) for p, r in report["precisions"].items()]
    for name, r in named:
        if "skipped" in r:
            rows.append([name, "skipped"] + [""] * (len(head) - 2))
            continue
        par, lat, d = r.get("parity"), r["latency_ms"], r.get("delta_ap", {})
        rows.append([name, str(r["instances"]), fmt(r["metrics"]["segm"]["AP"], ".4f"),
                     fmt(d.get("segm"), "+.4f"), fmt(d.get("bbox"), "+.4f"),
                     fmt(100 * par["matched_share"] if par else None, ".2f"),
                     fmt(par["mean_iou"] if par else None, ".4f"),
                     fmt(lat["mean"]), fmt(lat["p50"]), fmt(lat["p90"]),
                     fmt(r.get("speedup_vs_cpu"), ".1f"), fmt(r.get("peak_cuda_mb"), ".0f")])
    phead = ["instances", "image", "identical", "differing px", "CPU ms", "device ms", "×"]
    prows = [[str(p["instances"]), "x".join(map(str, p["image_size"])), f"{p['identical']}/{p['rles_cpu']}",
              str(p["differing_pixels"]), fmt(p["cpu_ms"]), fmt(p["device_ms"]), fmt(p["speedup"], ".2f")]
             for p in report["postprocess"]]
    return head, rows, phead, prows


def print_report(report: dict[str, Any], out: Any = None) -> None:
    """Rich tables when rich is importable, else plain aligned text."""
    head, rows, phead, prows = report_tables(report)
    env = report["environment"]
    gpu = env.get("gpu_details") or {}
    where = (f"{gpu['name']} (cc {gpu['capability']}, driver {gpu.get('driver') or '?'}, CUDA "
             f"{gpu.get('cuda_runtime')})" if gpu else "dry run on the CPU (no CUDA)")
    title = f"{where} | torch {env['versions']['torch']} torchvision {env['versions']['torchvision']}"
    lat = f"latency: {report['latency_image_hw'][0]}x{report['latency_image_hw'][1]} image, predict + paste/RLE"
    notes = [f"{p} skipped: {r['skipped']}" for p, r in report["precisions"].items() if "skipped" in r]
    if report["model"]["random_init"]:
        notes.append("random-init model: AP is meaningless, parity is not gated")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        stream = out or sys.stdout
        for h, r in ((head, rows), (phead, prows)):
            widths = [max(len(x) for x in col) for col in zip(h, *r)]
            for line in [h] + r:
                print("  ".join(x.ljust(w) for x, w in zip(line, widths)), file=stream)
        print("\n".join([title, lat] + notes), file=stream)
        for failure in report["failures"]:
            print("FAILED: " + failure, file=stream)
        return
    # not a terminal (a log, the device tool): wide enough for every column
    console = out if out is not None else Console(width=None if sys.stdout.isatty() else 150)
    for t_title, h, r in ((title, head, rows), ("paste_and_encode: device vs CPU", phead, prows)):
        table = Table(title=t_title, caption=lat if h is head else None)
        for col in h:
            table.add_column(col, justify="left" if col in ("row", "image") else "right")
        for line in r:
            table.add_row(*line)
        console.print(table)
    for note in notes:
        console.print(note)
    for failure in report["failures"]:
        console.print(f"[red]FAILED[/red] {failure}")


# ------------------------------------------------------------------------------------ CLI
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = CheckConfig(out=Path("-"))
    p = argparse.ArgumentParser(prog="python -m cellseg.bench.gpu_check",
                                description="torch backend on CUDA (FP32, FP16 autocast) vs CPU, and the CUDA paste path.")
    p.add_argument("--model", type=Path, help="checkpoint .pt or export folder (default: random-init --arch)")
    p.add_argument("--data", type=Path, help="HW3 root or COCO GT JSON with its images (default: synthetic)")
    p.add_argument("--out", type=Path, help="report JSON path (required unless --half-copy)")
    p.add_argument("--force", action="store_true", help="overwrite --out / --half-copy")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, dry-run with device cpu")
    p.add_argument("--half-copy", type=Path, metavar="DST", help="write an FP16-weights copy of --model and exit")
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--synth-size", type=int, default=d.synth_size)
    p.add_argument("--synth-images", type=int, default=d.synth_images)
    p.add_argument("--max-images", type=int, default=d.max_images)
    p.add_argument("--latency-size", type=int, default=d.latency_size)
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--cpu-runs", type=int, default=d.cpu_runs)
    p.add_argument("--paste-instances", type=_ints, default=d.paste_instances)
    p.add_argument("--paste-size", type=int, default=d.paste_size)
    p.add_argument("--paste-repeats", type=int, default=d.paste_repeats)
    p.add_argument("--max-map-drop", type=float, default=d.max_map_drop)
    p.add_argument("--min-parity", type=float, default=d.min_parity)
    p.add_argument("--no-tf32", action="store_true", help="disable TF32 in cuDNN and matmul (default: torch's)")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.half_copy is not None:
            if args.model is None:
                raise InputError("--half-copy needs --model CHECKPOINT")
            print(write_half_checkpoint(args.model, args.half_copy, args.force))
            return 0
        if args.out is None:
            raise InputError("--out PATH is required (the report JSON)")
        device = choose_device(args.allow_cpu)
        for name in ("synth_size", "synth_images", "max_images", "latency_size", "paste_size"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        cfg = CheckConfig(out=args.out, device=device, model=args.model, data=args.data, arch=args.arch,
                          synth_size=args.synth_size, synth_images=args.synth_images,
                          max_images=args.max_images, latency_size=args.latency_size,
                          runs=max(0, args.runs), warmup=max(0, args.warmup), cpu_runs=max(0, args.cpu_runs),
                          paste_instances=tuple(args.paste_instances), paste_size=args.paste_size,
                          paste_repeats=args.paste_repeats, max_map_drop=args.max_map_drop,
                          min_parity=args.min_parity, tf32=not args.no_tf32, seed=args.seed, force=args.force)
        console = None
        with contextlib.suppress(ImportError):
            from rich.console import Console

            console = Console(stderr=True)
        report = run_gpu_check(cfg, console)
        print_report(report)
        print(f"report: {cfg.out}")
        if report["failures"]:
            raise VerificationError(f"{len(report['failures'])} gate(s) failed: " + "; ".join(report["failures"]))
    except CellsegError as err:
        print(str(err).splitlines()[0] if str(err) else type(err).__name__, file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
