"""`cellseg bench`: speed and accuracy of every available backend, and parity against torch, in one
run on the same checkpoint and images, next to the seed-style "reference" pipeline.

The run has four steps: plan (check the arguments and the model, resolve the device, load the
data, decide which rows can run here), measure (each row in its own process), score (COCO AP,
parity, the gate) and report (terminal tables; report.json, report.md, latency.png).

Per row (reference first, then each requested backend that can run here):
- load: seconds to build the predictor (checkpoint read, model build, sessions / engines);
- warm-up: `warmup` untimed predictions (cycling over the images);
- timed: `iters` passes over every image, one image at a time, each image timed end to end
  (read -> network -> paste + RLE -> JSON text), with CUDA synchronised before the clock stops;
- memory: peak host RSS of the row's process (Linux VmHWM, reset once the row's libraries are
  imported; else getrusage's process peak), peak CUDA memory (torch's allocator) and device
  memory in use after the row;
- accuracy: COCO segm/bbox AP (cellseg.evaluate, maxDets sized from the GT) of the first pass;
- parity: against the torch backend's results (the reference's when torch is not benchmarked):
  |ΔAP|, share of baseline instances matched (same class, mask IoU >= 0.95), mean IoU, max
  score difference. An FP32 backend row fails the run when |ΔAP| > max_map_drop or share <
  min_parity; a reduced-precision row (`backend:fp16`, `backend:int8`) when |ΔAP| >
  max_map_drop_reduced (its share is reported). The report names the fastest row that passes.

Rows and failures:
- A backend that cannot run here (its runtime is not installed, or the model holds no artifacts
  for it) is listed as skipped and does not fail the run, so the default backend list works on
  every machine. When none of the requested backends can run, there is nothing to measure: the
  run stops before measuring with that reason (BackendUnavailableError for a missing runtime).
- Each row is measured in a child process of its own (cellseg.bench.rows). A row that raises,
  runs out of memory, or whose process is killed (the kernel's OOM killer sends SIGKILL) becomes
  a failed row with that reason; the other rows are still measured and the report is written.
  Failed rows fail the run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cellseg.bench.core import (MIN_PARITY, PARITY_IOU, environment_info, gate_failures,
                                latency_stats_ms, parity_figures, stages_ms)
from cellseg.bench.rows import (FAULT_ENV, RowFailure, RowPlan, RowRun, attempt_row,
                                measure_in_child, one_line, row_name)
from cellseg.errors import (BackendUnavailableError, CellsegError, CheckpointError, DataError,
                            InputError, OutputExistsError, VerificationError)
from cellseg.fileio import ensure_writable_folder, make_temp_dir

REPORT_FILES = ("report.json", "report.md", "latency.png")
# ΔAP gate of reduced-precision rows (fp16, int8): export's own INT8 gate (--max-map-drop there).
DEFAULT_MAX_MAP_DROP_REDUCED = 0.01


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


# ------------------------------------------------------------------------------------ plan
@dataclass
class BenchPlan:
    model: Path
    data: BenchData
    rows: list[RowPlan]
    skipped: list[dict[str, str]]
    settings: dict[str, Any]
    started: datetime


def plan_bench(model: Path, data: Path, backends: Sequence[str], device: str, warmup: int, iters: int,
               out: Path | None, force: bool, reference: bool) -> BenchPlan:
    """Everything that can be refused before measuring is refused here, with its own error:
    arguments (InputError), the report folder (OutputExistsError, or OutputError where it cannot
    be written), the device (BackendUnavailableError), the model, missing or unreadable
    (CheckpointError), the data (DataError), and no requested backend able to run here (the
    first one's reason)."""
    from cellseg.device import resolve_device

    model, data = Path(model), Path(data)
    _check_arguments(backends, warmup, iters)
    check_out_dir(out, force)
    if out is not None:
        ensure_writable_folder(Path(out).parent)
    resolve_device(device)
    check_model(model)
    bench_data = load_bench_data(data)
    target, _, fault = os.environ.get(FAULT_ENV, "").partition(":")

    def fault_of(row: str) -> str:
        return fault if row == target else ""

    rows = [RowPlan("reference", "reference", model, device, fault=fault_of("reference"))] if reference else []
    skipped: list[dict[str, str]] = []
    unavailable: list[CellsegError] = []
    for spec in dict.fromkeys(backends):  # keep order, drop repeats
        backend, precision = parse_row_spec(spec)
        name = row_name(backend, precision)
        reason = backend_unavailable(model, backend, precision)
        if reason is None:
            rows.append(RowPlan(name, "backend", model, device, backend, fault_of(name), precision))
        else:
            unavailable.append(reason)
            skipped.append(skip_entry(name, reason))
    if not any(r.kind == "backend" for r in rows):
        raise type(unavailable[0])("no requested backend can run here: " + "; ".join(map(str, unavailable)))
    settings = {"backends": list(backends), "device": device, "warmup": warmup, "iters": iters}
    return BenchPlan(model, bench_data, rows, skipped, settings, datetime.now(timezone.utc))


def skip_entry(backend: str, err: CellsegError) -> dict[str, str]:
    return {"backend": backend, "reason": one_line(err), "error": type(err).__name__}


def parse_row_spec(spec: str) -> tuple[str, str | None]:
    """`backend` or `backend:precision` (e.g. `openvino:int8`) -> (backend, precision or None)."""
    backend, colon, precision = spec.strip().partition(":")
    return backend, (precision if colon else None)


def _check_arguments(backends: Sequence[str], warmup: int, iters: int) -> None:
    from cellseg.artifacts import PRECISIONS
    from cellseg.pipeline import backend_names

    specs = [parse_row_spec(b) for b in backends]
    unknown = [b for b, _ in specs if b not in backend_names()]
    if unknown or not backends:
        raise InputError(f"backends {list(backends)!r}: each must be one of {', '.join(backend_names())}, "
                         f"optionally with :precision ({', '.join(PRECISIONS)})")
    bad = [f"{b}:{p}" for b, p in specs if p is not None and p not in PRECISIONS]
    if bad:
        raise InputError(f"backends {', '.join(bad)}: unknown precision (valid: {', '.join(PRECISIONS)})")
    if warmup < 0 or iters < 1:
        raise InputError(f"need warmup >= 0 and iters >= 1 (got warmup={warmup}, iters={iters})")


def check_model(model: Path) -> None:
    """The model must exist, a checkpoint must load, an export folder must hold a valid
    cellseg.json. Refused here, a bad model is one CheckpointError instead of the same failure
    in every row."""
    from cellseg.artifacts import read_export_json
    from cellseg.checkpoint import load_checkpoint

    if not model.exists():
        raise CheckpointError(f"{model}: no such checkpoint or export folder")
    if model.is_dir():
        read_export_json(model)
    else:
        load_checkpoint(model)  # read in full: a truncated file fails here


def backend_unavailable(model: Path, backend: str, precision: str | None = None) -> CellsegError | None:
    """Why `backend` cannot run `model` (at `precision`) here, without loading anything: the
    checks load_predictor makes before it loads (runtime installed, artifacts present). None when
    the row can be tried."""
    from cellseg.backends.base import backend_artifacts
    from cellseg.pipeline import backend_class

    ok, reason = backend_class(backend).is_available()
    if not ok:
        return BackendUnavailableError(f"{backend} backend: {reason}")
    if model.is_file() and backend != "torch":
        return InputError(f"{model}: a checkpoint runs only on the torch backend "
                          f"(make an export folder with `cellseg export` for {backend})")
    present = backend_artifacts(model) if model.is_dir() else {"torch": ["fp32"]}
    if backend not in present:
        return InputError(f"{model}: export folder has no {backend} artifacts (present: {', '.join(present) or 'none'})")
    # torch's fp16 is autocast of the same weights, which TorchBackend accepts or refuses itself.
    if precision is not None and backend != "torch" and precision not in present[backend]:
        return InputError(f"{model}: no {precision} artifacts for {backend} (present: {', '.join(present[backend])})")
    return None


# --------------------------------------------------------------------------------- measure
def measure_rows(plan: BenchPlan, progress: bool, console: Any, isolate: bool = True) -> list[RowRun | RowFailure]:
    """Every planned row, one after another, each in its own process unless `isolate` is False
    (then in this process: faster, but a row that crashes takes the run with it)."""
    outcomes: list[RowRun | RowFailure] = []
    warmup, iters = plan.settings["warmup"], plan.settings["iters"]
    n_steps = warmup + iters * len(plan.data.image_paths)
    with _progress(console, progress) as bar, tempfile.TemporaryDirectory(prefix="cellseg-bench-") as tmp:
        for row in plan.rows:
            task = bar.add_task(row.name, total=n_steps) if bar else None
            advance = (lambda done, task=task: bar.update(task, completed=done)) if bar else (lambda done: None)
            if isolate:
                result = Path(tmp) / f"{row.name.replace('/', '-')}.pickle"
                outcome = measure_in_child(row, plan.data, warmup, iters, result, advance)
            else:
                count = iter(range(1, n_steps + 1))
                outcome = attempt_row(row, plan.data, warmup, iters, lambda: advance(next(count)))
            if isinstance(outcome, RowFailure) and isinstance(outcome.error, DataError):
                raise outcome.error
            outcomes.append(outcome)
            if bar is not None:
                bar.remove_task(task)
    return outcomes


# ----------------------------------------------------------------------------------- score
def row_figures(run: RowRun, metrics: dict, parity: dict | None, reference_mean_ms: float | None) -> dict:
    lat = latency_stats_ms(run.latencies_s)
    timed = len(run.latencies_s)
    stages = stages_ms(run.stage_s, timed)
    if timed:  # time in the loop no stage accounts for (tensor conversion, Python glue)
        stages["other"] = max(0.0, lat["mean"] - sum(stages.values()))
    total_s = float(sum(run.latencies_s))
    sizes = [Path(p).stat().st_size for p in run.artifacts if Path(p).is_file()]
    mb = 1024.0 * 1024.0
    return {
        "name": run.name, "kind": run.kind, "backend": run.backend,
        "precision": str(run.settings.get("precision") or "fp32"), "settings": run.settings,
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


def row_gate_failures(row: dict, max_map_drop: float, min_parity: float = MIN_PARITY,
                      max_map_drop_reduced: float = DEFAULT_MAX_MAP_DROP_REDUCED) -> list[str]:
    """The gate (cellseg.bench.core.gate_failures) of one backend row. An FP32 row must compute
    the baseline's answers: |ΔAP| <= max_map_drop and min_parity of its instances matched. A
    reduced-precision row (fp16, int8) computes an approximation: only |ΔAP| <=
    max_map_drop_reduced is gated, its matched share is reported. The reference row is reported,
    not gated."""
    p = row.get("parity")
    if row.get("kind") != "backend" or not p:
        return []
    reduced = row.get("precision", "fp32") != "fp32"
    return gate_failures(row["name"], p["baseline"], p["delta_ap"], p["matched_share"],
                         max_map_drop_reduced if reduced else max_map_drop, 0.0 if reduced else min_parity,
                         p.get("ref_count"), p.get("match_iou", PARITY_IOU))


def parity_failures(rows: Sequence[dict], max_map_drop: float, min_parity: float = MIN_PARITY,
                    max_map_drop_reduced: float = DEFAULT_MAX_MAP_DROP_REDUCED) -> list[str]:
    """row_gate_failures over every row."""
    return [f for row in rows for f in row_gate_failures(row, max_map_drop, min_parity, max_map_drop_reduced)]


def fastest_in_gate(rows: Sequence[dict], baseline: str | None, max_map_drop: float, min_parity: float,
                    max_map_drop_reduced: float) -> dict | None:
    """The backend row with the lowest mean latency among those that pass their gate (the
    baseline passes by definition): the row to deploy on this machine."""
    passing = [r for r in rows if r.get("kind") == "backend" and r["timed_runs"] and
               (r["name"] == baseline or (r.get("parity") and
                                          not row_gate_failures(r, max_map_drop, min_parity, max_map_drop_reduced)))]
    if not passing:
        return None
    best = min(passing, key=lambda r: r["latency_ms"]["mean"])
    return {"row": best["name"], "mean_ms": best["latency_ms"]["mean"],
            "speedup_vs_reference": best["speedup_vs_reference"],
            "speedup_vs_onnxruntime_fp32": best.get("speedup_vs_onnxruntime_fp32"),
            "delta_ap": (best.get("parity") or {}).get("delta_ap"),
            "matched_share": (best.get("parity") or {}).get("matched_share")}


def add_onnxruntime_speedups(rows: list[dict]) -> None:
    """Each row's speed against onnxruntime FP32 (the CPU default the INT8 goal is stated against)."""
    ort = next((r for r in rows if r.get("backend") == "onnxruntime" and r.get("precision") == "fp32"
                and r["latency_ms"]["mean"] > 0), None)
    for r in rows:
        mean = r["latency_ms"]["mean"]
        r["speedup_vs_onnxruntime_fp32"] = ort["latency_ms"]["mean"] / mean if ort and mean > 0 else None


@dataclass
class Scores:
    rows: list[dict]
    baseline: str | None
    failures: list[str]
    fastest: dict | None = None


def score_rows(gt: dict, runs: list[RowRun], failed: list[RowFailure], max_map_drop: float,
               min_parity: float, max_map_drop_reduced: float = DEFAULT_MAX_MAP_DROP_REDUCED) -> Scores:
    """COCO AP of every row, parity against the baseline (torch, else the reference), the gate;
    failed rows first among the failures."""
    from cellseg.evaluate import evaluate_coco

    metrics = {r.name: evaluate_coco(gt, r.results) for r in runs}
    by_name = {r.name: r for r in runs}
    torch_fp32 = [r.name for r in runs if r.backend == "torch" and r.settings.get("precision", "fp32") == "fp32"]
    baseline = torch_fp32[0] if torch_fp32 else ("reference" if "reference" in by_name else None)
    ref_mean = latency_stats_ms(by_name["reference"].latencies_s)["mean"] if "reference" in by_name else None
    rows = []
    for r in runs:
        parity = None
        if baseline is not None and r.name != baseline:
            b = by_name[baseline]
            parity = parity_figures(baseline, b.results, metrics[baseline], r.results, metrics[r.name])
        rows.append(row_figures(r, metrics[r.name], parity, ref_mean))
    add_onnxruntime_speedups(rows)
    failures = [f"{f.name}: {f.reason}" for f in failed] + \
        parity_failures(rows, max_map_drop, min_parity, max_map_drop_reduced)
    fastest = fastest_in_gate(rows, baseline, max_map_drop, min_parity, max_map_drop_reduced)
    return Scores(rows, baseline, failures, fastest)


# ---------------------------------------------------------------------------------- report
def build_report(plan: BenchPlan, runs: list[RowRun], skipped: list[dict], failed: list[RowFailure],
                 scores: Scores, settings: dict[str, Any]) -> dict:
    data = plan.data
    failures = list(scores.failures)
    if not any(r.kind == "backend" for r in runs) and not failed:
        failures.append("no backend ran: " + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    return {
        "schema": "cellseg-bench-v1",
        "started_utc": plan.started.isoformat(timespec="seconds"),
        "settings": {"model": str(plan.model), "data": str(data.source), **plan.settings, **settings,
                     "parity_iou": PARITY_IOU, "reference": any(r.kind == "reference" for r in plan.rows)},
        "data": {"source": str(data.source), "images": len(data.image_paths), "gt_instances": data.instances,
                 "max_gt_instances_per_image": _max_per_image(data.gt)},
        "environment": environment_info(),
        "parity_baseline": scores.baseline,
        "rows": scores.rows,
        "skipped": skipped,
        "failed_rows": [{"row": f.name, "reason": f.reason,
                         "error": type(f.error).__name__ if f.error is not None else None} for f in failed],
        "failures": failures,
        "fastest_in_gate": scores.fastest,
        "latencies_ms": {r.name: [1000.0 * s for s in r.latencies_s] for r in runs},
    }


def run_bench(model: Path, data: Path, backends: Sequence[str], device: str = "auto", warmup: int = 1,
              iters: int = 3, max_map_drop: float = 0.005, out: Path | None = None, force: bool = False,
              min_parity: float = MIN_PARITY, reference: bool = True, progress: bool = True,
              console: Any = None, isolate: bool = True,
              max_map_drop_reduced: float = DEFAULT_MAX_MAP_DROP_REDUCED) -> dict:
    """Benchmark `backends` (+ the reference row) on `data`: plan -> measure -> score -> report.
    Each entry of `backends` is a backend name (its default precision) or `backend:precision`.
    Returns the report dict, whose "failures" lists one line per failed row or gate
    (`failure_error` turns them into the error to raise). Writes report.json, report.md and
    latency.png into `out` atomically when given."""
    from rich.console import Console

    from cellseg.bench.report import print_report, write_report

    if not (max_map_drop >= 0 and max_map_drop_reduced >= 0):
        raise InputError(f"--max-map-drop {max_map_drop} and --max-map-drop-reduced {max_map_drop_reduced} must be >= 0")
    plan = plan_bench(model, data, backends, device, warmup, iters, out, force, reference)
    console = console or Console()
    outcomes = measure_rows(plan, progress, console, isolate)
    runs = [o for o in outcomes if isinstance(o, RowRun)]
    failed = [o for o in outcomes if isinstance(o, RowFailure) and o.status == "failed"]
    skipped = plan.skipped + [skip_entry(o.name, o.error) for o in outcomes
                              if isinstance(o, RowFailure) and o.status == "skipped" and o.error is not None]
    scores = score_rows(plan.data.gt, runs, failed, max_map_drop, min_parity, max_map_drop_reduced)
    settings = {"max_map_drop": max_map_drop, "min_parity": min_parity, "max_map_drop_reduced": max_map_drop_reduced,
                "rows_in": "one process per row" if isolate else "this process"}
    report = build_report(plan, runs, skipped, failed, scores, settings)
    print_report(report, console)
    if out is not None:
        write_report(report, Path(out), force=force)
    return report


def failure_error(report: dict) -> CellsegError | None:
    """The error a failed run ends with, its message one line summing up the failures: a
    CheckpointError when a row could not load its artifacts (the model is what to fix), a
    BackendUnavailableError or InputError when no backend ran at all because none could,
    else a VerificationError (a gate failed, or a row crashed and so was not verified)."""
    failures = report.get("failures") or []
    if not failures:
        return None
    n = len(failures)
    message = f"bench: {n} failure{'s' if n > 1 else ''}: {failures[0]}" + \
        (f" (and {n - 1} more, listed above and in the report)" if n > 1 else "")
    errors = [f.get("error") for f in report.get("failed_rows", [])]
    if "CheckpointError" in errors:
        return CheckpointError(message)
    if not any(r.get("kind") == "backend" for r in report.get("rows", [])) and not report.get("failed_rows"):
        causes = [s.get("error") for s in report.get("skipped", [])]
        return BackendUnavailableError(message) if "BackendUnavailableError" in causes else InputError(message)
    return VerificationError(message)


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


def check_out_dir(out: Path | None, force: bool) -> None:
    """Refuse an existing, non-empty report folder (or a file in its place) unless `force`."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists and is not empty (pass --force to overwrite)")


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
