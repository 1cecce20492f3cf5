"""`cellseg bench`: speed and accuracy of every available backend, and parity against torch, in one
run on the same checkpoint and images, next to the seed-style "reference" pipeline.

Per row (reference first, then each requested backend that loads here):
- load: seconds to build the predictor (checkpoint read, model build, sessions / engines);
- warm-up: `warmup` untimed predictions (cycling over the images);
- timed: `iters` passes over every image, one image at a time, each image timed end to end
  (read -> network -> paste + RLE -> JSON text), with CUDA synchronised before the clock stops;
- memory: peak host RSS of this process during the row (Linux VmHWM, reset before each row via
  /proc/self/clear_refs; else getrusage's process-lifetime peak), peak CUDA memory (torch's
  allocator) and device memory in use after the row;
- accuracy: COCO segm/bbox AP (cellseg.evaluate, maxDets sized from the GT) of the first pass;
- parity: against the torch backend's results (the reference's when torch is not benchmarked):
  |ΔAP|, share of baseline instances matched (same class, mask IoU >= 0.95), mean IoU, max
  score difference. A backend fails the run when |ΔAP| > max_map_drop or share < min_parity.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.errors import (BackendUnavailableError, CellsegError, DataError, InputError,
                            OutputExistsError)
from cellseg.fileio import make_temp_dir

REPORT_FILES = ("report.json", "report.md", "latency.png")
PARITY_IOU = 0.95
MIN_PARITY = 0.99


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class BenchData:
    source: Path
    gt: dict
    image_paths: tuple[Path, ...]
    image_ids: tuple[int, ...]

    @property
    def instances(self) -> int:
        return len(self.gt["annotations"])


def load_bench_data(data: Path) -> BenchData:
    """An HW3 layout folder (GT from its class files) or a COCO GT JSON whose images lie beside
    it (file_name relative to the JSON's folder), in an `images/` folder next to it, or in an HW3
    `test_release/` folder next to it."""
    from cellseg.data.coco import coco_dataset_images, hw3_to_coco, load_coco_gt
    from cellseg.data.hw3 import find_train_root

    data = Path(data)
    if data.is_dir():
        gt = hw3_to_coco(data)
        pairs = coco_dataset_images(gt, find_train_root(data))
    elif data.is_file():
        gt = load_coco_gt(data)
        pairs = None
        for folder in (data.parent, data.parent / "images", data.parent / "test_release"):
            try:
                pairs = coco_dataset_images(gt, folder)
                break
            except DataError:
                continue
        if pairs is None:
            raise DataError(f"{data}: its images are neither beside it nor in images/ or test_release/ next to it")
    else:
        raise InputError(f"{data}: no such data folder or COCO JSON")
    if not pairs:
        raise DataError(f"{data}: no images to benchmark")
    return BenchData(data, gt, tuple(p for _, p in pairs), tuple(i for i, _ in pairs))


# --------------------------------------------------------------------------------- measurement
@dataclass
class RowRun:
    """Raw measurements of one row; turned into report figures by `row_figures`."""

    name: str
    kind: str  # "reference" or "backend"
    settings: dict[str, Any]
    load_s: float
    results: list[dict] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)  # summed over timed images
    peak_rss_bytes: int | None = None
    rss_method: str = ""
    peak_cuda_bytes: int | None = None
    cuda_used_bytes: int | None = None
    artifacts: list[str] = field(default_factory=list)


class _PredictorRunner:
    """A cellseg Predictor + the shared postprocess, timed as stages like the reference."""

    def __init__(self, predictor: Any, model: Path, backend: str) -> None:
        self.predictor = predictor
        self.model = model
        self.backend = backend
        self.device = predictor.device
        self.extra = {"paste_rle": 0.0}
        self.settings: dict[str, Any] = dict(getattr(predictor, "settings", {}) or {})

    @property
    def stage_seconds(self) -> dict[str, float]:
        return {**self.predictor.stage_seconds, **self.extra}

    def predict_coco(self, image: np.ndarray, image_id: int) -> list[dict]:
        from cellseg.postprocess import detections_to_coco

        det = self.predictor.predict(image)
        t = time.perf_counter()
        spec = self.predictor.spec
        entries = detections_to_coco(image_id, det.boxes, det.scores, det.labels, det.mask_probs,
                                     image.shape[:2], spec.category_ids, spec.mask_thresh)
        self.extra["paste_rle"] += time.perf_counter() - t
        return entries


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark so each row's peak is its own (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM (reset per row)"
    except OSError:
        return "getrusage ru_maxrss (process peak so far)"


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def _cuda_used_bytes(device: Any) -> int | None:
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


def measure_row(name: str, kind: str, load: Callable[[], Any], data: BenchData, warmup: int,
                iters: int, tick: Callable[[], None] = lambda: None) -> RowRun:
    """Load a pipeline (anything with `.device`, `.stage_seconds`, `.predict_coco(image, id)` and
    `.settings`), warm it up, time `iters` passes over the images. `tick` after each prediction."""
    import torch

    from cellseg.data.images import read_image

    gc.collect()
    rss_method = _reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pipeline = load()
    load_s = time.perf_counter() - t
    device = pipeline.device
    run = RowRun(name, kind, dict(getattr(pipeline, "settings", {}) or {}), load_s, rss_method=rss_method)

    n = len(data.image_paths)
    for i in range(warmup):
        pipeline.predict_coco(read_image(data.image_paths[i % n]), data.image_ids[i % n])
        tick()
    _sync(device)
    base = dict(pipeline.stage_seconds)
    stage_s: dict[str, float] = {"read": 0.0, "json": 0.0}
    for it in range(iters):
        for path, image_id in zip(data.image_paths, data.image_ids):
            t0 = time.perf_counter()
            image = read_image(path)
            t1 = time.perf_counter()
            entries = pipeline.predict_coco(image, image_id)
            _sync(device)
            t2 = time.perf_counter()
            json.dumps(entries)  # what writing the results file costs per image
            t3 = time.perf_counter()
            stage_s["read"] += t1 - t0
            stage_s["json"] += t3 - t2
            run.latencies_s.append(t3 - t0)
            if it == 0:
                run.results.extend(entries)
            tick()
    for stage, total in pipeline.stage_seconds.items():
        stage_s[stage] = total - base.get(stage, 0.0)
    run.stage_s = stage_s
    run.peak_rss_bytes = _peak_rss_bytes()
    if cuda:
        run.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
        run.cuda_used_bytes = _cuda_used_bytes(device)
    run.artifacts = [str(p) for p in _artifact_files(pipeline)]
    del pipeline
    gc.collect()
    return run


def _artifact_files(pipeline: Any) -> list[Path]:
    """The files a row loads: the checkpoint for torch/reference, graphs or engines otherwise."""
    if isinstance(pipeline, _PredictorRunner):
        predictor = pipeline.predictor
        paths = getattr(predictor, "artifact_paths", None)
        if paths:
            return [Path(p) for p in paths]
        return artifact_files(pipeline.model, pipeline.backend, pipeline.settings)
    ckpt = getattr(pipeline, "checkpoint", None)
    return [Path(ckpt)] if ckpt else []


def artifact_files(model: Path, backend: str, settings: dict[str, Any]) -> list[Path]:
    """Artifacts of `backend` for `model` (checkpoint file or export folder)."""
    from cellseg.pipeline import CHECKPOINT_COPY, artifacts_present, engine_paths, onnx_paths

    if model.is_file():
        return [model]
    if backend == "torch":
        return [model / CHECKPOINT_COPY]
    named = settings.get("graphs") or settings.get("engines")
    if isinstance(named, dict):
        files = [model / str(v) for v in named.values()]
    else:
        precisions = artifacts_present(model).get(backend, [])
        precision = settings.get("precision") if settings.get("precision") in precisions else \
            (precisions[0] if precisions else "fp32")
        files = list((onnx_paths if backend == "onnxruntime" else engine_paths)(model, precision).values())
    # ONNX external-data files sit beside their graph.
    extra = [p for f in files for p in model.glob(f.name + "*") if p != f and p.is_file()]
    return [f for f in files + extra if f.is_file()]


# ------------------------------------------------------------------------------------- figures
def latency_stats_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    a = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {k: 0.0 for k in ("mean", "p50", "p90", "p99", "min", "max")}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def row_figures(run: RowRun, metrics: dict, parity: dict | None, reference_mean_ms: float | None) -> dict:
    lat = latency_stats_ms(run.latencies_s)
    timed = len(run.latencies_s)
    stages = {k: 1000.0 * v / timed for k, v in run.stage_s.items()} if timed else {}
    if timed:  # time in the loop no stage accounts for (tensor conversion, Python glue)
        stages["other"] = max(0.0, lat["mean"] - sum(stages.values()))
    total_s = float(sum(run.latencies_s))
    sizes = [Path(p).stat().st_size for p in run.artifacts if Path(p).is_file()]
    mb = 1024.0 * 1024.0
    return {
        "name": run.name, "kind": run.kind, "settings": run.settings,
        "load_s": run.load_s, "timed_runs": timed, "instances": len(run.results),
        "latency_ms": lat,
        "throughput_ips": timed / total_s if total_s > 0 else 0.0,
        "speedup_vs_reference": (reference_mean_ms / lat["mean"]) if reference_mean_ms and lat["mean"] > 0 else None,
        "stages_ms": stages,
        "peak_rss_mb": run.peak_rss_bytes / mb if run.peak_rss_bytes is not None else None,
        "rss_method": run.rss_method,
        "peak_cuda_mb": run.peak_cuda_bytes / mb if run.peak_cuda_bytes is not None else None,
        "cuda_used_mb": run.cuda_used_bytes / mb if run.cuda_used_bytes is not None else None,
        "artifact_mb": sum(sizes) / mb if sizes else None,
        "artifacts": run.artifacts,
        "metrics": metrics,
        "parity": parity,
    }


def parity_figures(baseline_name: str, baseline_results: list[dict], baseline_metrics: dict,
                   results: list[dict], metrics: dict, iou: float = PARITY_IOU) -> dict:
    """ΔAP (row minus baseline, per IoU type) and instance matching against the baseline."""
    from cellseg.evaluate import match_instances

    delta = {}
    for iou_type in metrics:
        a, b = metrics[iou_type]["AP"], baseline_metrics.get(iou_type, {}).get("AP")
        delta[iou_type] = (a - b) if a is not None and b is not None else None
    match = match_instances(baseline_results, results, iou=iou)
    return {"baseline": baseline_name, "delta_ap": delta, "match_iou": iou, **match}


def parity_failures(rows: Sequence[dict], max_map_drop: float, min_parity: float = MIN_PARITY) -> list[str]:
    """One-line failures for backend rows whose |ΔAP| exceeds `max_map_drop` or whose share of
    matched baseline instances is below `min_parity`. The reference row is reported, not gated."""
    failures = []
    for row in rows:
        parity = row.get("parity")
        if row.get("kind") != "backend" or not parity:
            continue
        for iou_type, d in sorted(parity["delta_ap"].items()):
            if d is not None and abs(d) > max_map_drop:
                failures.append(f"{row['name']}: {iou_type} AP differs from {parity['baseline']} by "
                                f"{d:+.4f} (allowed ±{max_map_drop:g})")
        if parity["matched_share"] < min_parity:
            failures.append(f"{row['name']}: only {100 * parity['matched_share']:.1f}% of "
                            f"{parity['baseline']}'s {parity['ref_count']} instances matched at mask IoU "
                            f">= {parity['match_iou']:g} (need {100 * min_parity:g}%)")
    return failures


# --------------------------------------------------------------------------------- environment
def environment_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("cellseg", "torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                 "numpy", "pycocotools", "faster-coco-eval"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    import torchvision

    # The modules' own strings carry the build tag (e.g. 2.14.1+cu130), which matters for speed.
    versions["torch"], versions["torchvision"] = torch.__version__, torchvision.__version__
    env: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu, "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": versions, "gpu": None, "cuda": torch.version.cuda, "gpu_driver": None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False)
            env["gpu_driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


# ------------------------------------------------------------------------------------ the run
def check_out_dir(out: Path | None, force: bool) -> None:
    """Refuse an existing, non-empty report folder (or a file in its place) unless `force`."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists and is not empty (pass --force to overwrite)")


def run_bench(model: Path, data: Path, backends: Sequence[str], device: str = "auto", warmup: int = 1,
              iters: int = 3, max_map_drop: float = 0.005, out: Path | None = None, force: bool = False,
              min_parity: float = MIN_PARITY, reference: bool = True, progress: bool = True,
              console: Any = None) -> dict:
    """Benchmark `backends` (+ the reference row) on `data`; returns the report dict, whose
    "failures" lists one-line parity failures (the CLI exits non-zero when it is not empty).
    Writes report.json, report.md and latency.png into `out` atomically when given."""
    from rich.console import Console

    from cellseg.bench.reference import ReferencePipeline
    from cellseg.evaluate import evaluate_coco
    from cellseg.pipeline import backend_names, load_predictor, resolve_device

    model, data = Path(model), Path(data)
    unknown = [b for b in backends if b not in backend_names()]
    if unknown or not backends:
        raise InputError(f"backends {list(backends)!r}: each must be one of {', '.join(backend_names())}")
    if warmup < 0 or iters < 1:
        raise InputError(f"need warmup >= 0 and iters >= 1 (got warmup={warmup}, iters={iters})")
    if not model.exists():
        raise InputError(f"{model}: no such checkpoint or export folder")
    check_out_dir(out, force)
    console = console or Console()
    bench_data = load_bench_data(data)
    started = datetime.now(timezone.utc)

    plan: list[tuple[str, str, Callable[[], Any]]] = []
    if reference:
        plan.append(("reference", "reference", lambda: ReferencePipeline(model, resolve_device(device))))
    for name in dict.fromkeys(backends):  # keep order, drop repeats
        def load(name: str = name) -> Any:
            return _PredictorRunner(load_predictor(model, name, device), model, name)
        plan.append((name, "backend", load))

    runs: list[RowRun] = []
    skipped: list[dict[str, str]] = []
    errors: list[str] = []
    n_steps = warmup + iters * len(bench_data.image_paths)
    with _progress(console, progress) as bar:
        for name, kind, load in plan:
            task = bar.add_task(f"{name}", total=n_steps) if bar else None
            tick = (lambda task=task: bar.advance(task)) if bar else (lambda: None)
            try:
                runs.append(measure_row(name, kind, load, bench_data, warmup, iters, tick))
            except (BackendUnavailableError, InputError) as err:
                if isinstance(err, DataError):
                    raise
                skipped.append({"backend": name, "reason": str(err)})
            except CellsegError as err:  # e.g. a corrupt graph: report it, bench the others
                errors.append(f"{name}: {err}")
            if bar is not None:
                bar.remove_task(task)

    metrics = {r.name: evaluate_coco(bench_data.gt, r.results) for r in runs}
    by_name = {r.name: r for r in runs}
    baseline = "torch" if "torch" in by_name else ("reference" if "reference" in by_name else None)
    ref_mean = latency_stats_ms(by_name["reference"].latencies_s)["mean"] if "reference" in by_name else None
    rows = []
    for r in runs:
        parity = None
        if baseline is not None and r.name != baseline:
            b = by_name[baseline]
            parity = parity_figures(baseline, b.results, metrics[baseline], r.results, metrics[r.name])
        rows.append(row_figures(r, metrics[r.name], parity, ref_mean))

    failures = errors + parity_failures(rows, max_map_drop, min_parity)
    if not any(r.kind == "backend" for r in runs):
        failures.append("no backend ran: " + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    report = {
        "schema": "cellseg-bench-v1",
        "started_utc": started.isoformat(timespec="seconds"),
        "settings": {"model": str(model), "data": str(data), "backends": list(backends), "device": device,
                     "warmup": warmup, "iters": iters, "max_map_drop": max_map_drop,
                     "min_parity": min_parity, "parity_iou": PARITY_IOU, "reference": reference},
        "data": {"source": str(data), "images": len(bench_data.image_paths),
                 "gt_instances": bench_data.instances,
                 "max_gt_instances_per_image": _max_per_image(bench_data.gt)},
        "environment": environment_info(),
        "parity_baseline": baseline,
        "rows": rows,
        "skipped": skipped,
        "failures": failures,
        "latencies_ms": {r.name: [1000.0 * s for s in r.latencies_s] for r in runs},
    }
    from cellseg.bench.report import print_report, write_report

    print_report(report, console)
    if out is not None:
        write_report(report, Path(out), force=force)
    return report


def _max_per_image(gt: dict) -> int:
    from cellseg.evaluate import gt_instances_per_image

    return max(gt_instances_per_image(gt).values(), default=0)


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _progress(console: Any, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("bench {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


# ---------------------------------------------------------------------------- atomic report dir
def replace_dir_atomically(out: Path, fill: Callable[[Path], None], force: bool) -> Path:
    """Build the report in a temporary sibling folder, then rename it into place: an interrupted
    run leaves either the old folder or the complete new one, never a half-written report."""
    out = Path(out)
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        fill(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():  # force: move the old one aside first, delete it once the new one is in
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
