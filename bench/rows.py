"""One bench row: load its pipeline, warm it up, time it over the images; and the same in a child
process of its own, so that a row that raises, runs out of memory or is killed (the kernel's OOM
killer sends SIGKILL) becomes a failed row instead of ending the run.

The children are forked from multiprocessing's fork server: a clean process that has imported
torch and cellseg but run nothing, so no threads or CUDA state are inherited and the imports are
paid once per run instead of once per row ("spawn" where there is no fork server). A child hands
its outcome back as a pickle file, written atomically."""
from __future__ import annotations

import gc
import json
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellseg.bench.core import cuda_used_bytes, peak_rss_bytes, reset_peak_rss, sync
from cellseg.errors import BackendUnavailableError, CellsegError, DataError, InputError

if TYPE_CHECKING:
    from cellseg.bench.harness import BenchData

# Test hook: "ROW:kill" makes that row's process SIGKILL itself once the row has loaded (what the
# kernel's OOM killer does), "ROW:raise" makes the row raise there. Read when the run is planned.
FAULT_ENV = "CELLSEG_BENCH_TEST_FAULT"
# How torch (CPU and CUDA allocators) and onnxruntime word a failed allocation in RuntimeErrors.
OOM_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate memory")
# What the row processes import before they fork, so that each row does not import them again.
CHILD_PRELOAD = ["cellseg.bench.rows", "cellseg.bench.harness", "cellseg.bench.reference", "cellseg.pipeline", "cellseg.data.images"]


@dataclass(frozen=True)
class RowPlan:
    """What one row runs; plain data, so it can be handed to the row's process."""

    name: str
    kind: str  # "reference" or "backend"
    model: Path
    device: str
    backend: str | None = None
    fault: str = ""  # test hook (FAULT_ENV): "kill" or "raise" once loaded
    precision: str | None = None  # None: the backend's default for the model


def row_name(backend: str, precision: str | None) -> str:
    """A backend row's name: the backend for its default precision, else `backend/precision`."""
    return backend if precision is None else f"{backend}/{precision}"


@dataclass
class RowRun:
    """Raw measurements of one row; turned into report figures by `row_figures`."""

    name: str
    kind: str  # "reference" or "backend"
    settings: dict[str, Any]
    load_s: float
    backend: str | None = None
    results: list[dict] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)  # summed over timed images
    peak_rss_bytes: int | None = None
    rss_method: str = ""
    peak_cuda_bytes: int | None = None
    cuda_used_bytes: int | None = None
    artifacts: list[str] = field(default_factory=list)


@dataclass
class RowFailure:
    """A row that did not produce figures. status "skipped": it cannot run here (not a failure
    of the run); "failed": it raised, ran out of memory, or its process died."""

    name: str
    status: str
    reason: str
    error: CellsegError | None = None  # cellseg's own error, when that is what stopped the row


def load_row(row: RowPlan) -> Any:
    """The row's pipeline: anything with `.device`, `.stage_seconds`, `.settings` and
    `.predict_coco(image, image_id)` (a cellseg Predictor, or the seed-style reference)."""
    from cellseg.device import resolve_device

    if row.kind == "reference":
        from cellseg.bench.reference import ReferencePipeline

        return ReferencePipeline(row.model, resolve_device(row.device))
    from cellseg.pipeline import load_predictor

    return load_predictor(row.model, row.backend, row.device, precision=row.precision)


def measure_row(row: RowPlan, data: BenchData, warmup: int, iters: int,
                tick: Callable[[], None] = lambda: None) -> RowRun | RowFailure:
    """Load the row's pipeline, warm it up, time `iters` passes over the images. `tick` after
    each prediction. A row whose runtime or artifacts turn out unusable while loading is
    skipped, as in the plan; a bad image (DataError) is the data's fault and propagates."""
    import torch

    from cellseg.data.images import read_image

    gc.collect()
    rss_method = reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        pipeline = load_row(row)
    except (BackendUnavailableError, InputError) as err:
        if isinstance(err, DataError):
            raise
        return RowFailure(row.name, "skipped", one_line(err), err)
    run = RowRun(row.name, row.kind, dict(pipeline.settings or {}), time.perf_counter() - t,
                 backend=row.backend, rss_method=rss_method)
    _inject_test_fault(row.fault)
    n = len(data.image_paths)
    for i in range(warmup):
        pipeline.predict_coco(read_image(data.image_paths[i % n]), data.image_ids[i % n])
        tick()
    _timed_passes(pipeline, data, iters, run, tick)
    run.peak_rss_bytes = peak_rss_bytes()
    if cuda:
        run.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
        run.cuda_used_bytes = cuda_used_bytes(pipeline.device)
    run.artifacts = [str(p) for p in row_artifacts(row, pipeline)]
    del pipeline
    gc.collect()
    return run


def _timed_passes(pipeline: Any, data: BenchData, iters: int, run: RowRun, tick: Callable[[], None]) -> None:
    """Each image timed end to end (read, predict, JSON text); the pipeline's stage seconds of
    the timed images go into `run.stage_s`, the first pass's results into `run.results`."""
    from cellseg.data.images import read_image

    sync(pipeline.device)
    base = dict(pipeline.stage_seconds)
    stage_s: dict[str, float] = {"read": 0.0, "json": 0.0}
    for it in range(iters):
        for path, image_id in zip(data.image_paths, data.image_ids):
            t0 = time.perf_counter()
            image = read_image(path)
            t1 = time.perf_counter()
            entries = pipeline.predict_coco(image, image_id)
            sync(pipeline.device)
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


def _inject_test_fault(fault: str) -> None:
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault:
        raise RuntimeError(f"fault injected by {FAULT_ENV}")


def row_artifacts(row: RowPlan, pipeline: Any) -> list[Path]:
    """The files a row loads: the checkpoint for the reference, graphs or engines otherwise."""
    if row.kind == "reference":
        return [Path(pipeline.checkpoint)]
    return artifact_files(row.model, str(row.backend), pipeline.settings or {})


def artifact_files(model: Path, backend: str, settings: dict[str, Any]) -> list[Path]:
    """Artifacts of `backend` for `model` (checkpoint file or export folder)."""
    from cellseg.artifacts import CHECKPOINT_COPY, engine_paths, onnx_paths
    from cellseg.backends.base import backend_artifacts

    if model.is_file():
        return [model]
    if backend == "torch":
        return [model / CHECKPOINT_COPY]
    named = settings.get("graphs") or settings.get("engines")
    if isinstance(named, dict):
        files = [model / str(v) for v in named.values()]
    else:
        precisions = backend_artifacts(model).get(backend, [])
        precision = settings.get("precision") if settings.get("precision") in precisions else \
            (precisions[0] if precisions else "fp32")
        files = list((engine_paths if backend == "trt" else onnx_paths)(model, precision).values())
    # ONNX external-data files sit beside their graph.
    extra = [p for f in files for p in model.glob(f.name + "*") if p != f and p.is_file()]
    return [f for f in files + extra if f.is_file()]


def attempt_row(row: RowPlan, data: BenchData, warmup: int, iters: int,
                tick: Callable[[], None] = lambda: None) -> RowRun | RowFailure:
    """measure_row, with whatever stops the row turned into a failed RowFailure that says why,
    except a DataError (a bad image stops the whole run)."""
    try:
        return measure_row(row, data, warmup, iters, tick)
    except DataError:
        raise
    except CellsegError as err:  # e.g. a corrupt graph: report it, bench the others
        return RowFailure(row.name, "failed", one_line(err), err)
    except MemoryError as err:
        return RowFailure(row.name, "failed", f"out of memory: {one_line(err) or 'MemoryError'}")
    except Exception as err:  # noqa: BLE001 - any crash of one row is that row's result
        oom = any(words in str(err).lower() for words in OOM_WORDS)
        return RowFailure(row.name, "failed", f"{'out of memory' if oom else 'crashed'}: "
                                              f"{type(err).__name__}: {one_line(err)}")


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def measure_in_child(row: RowPlan, data: BenchData, warmup: int, iters: int, result: Path,
                     advance: Callable[[int], None]) -> RowRun | RowFailure:
    """attempt_row in a child process (nothing shared with this one, so the row's memory is its
    own). The child pickles its outcome to `result`; a child that dies without one (killed by a
    signal, or exiting hard) is a failed row saying how it died."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        # The server keeps the environment it started with: whatever a row needs from the
        # environment after that (like the test hook) travels in its RowPlan.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(CHILD_PRELOAD)  # used when the server starts (first row)
    else:
        ctx = multiprocessing.get_context("spawn")
    done = ctx.Value("i", 0, lock=False)  # predictions so far, for the progress bar
    proc = ctx.Process(target=_row_process, args=(row, data, warmup, iters, str(result), done),
                       name=f"cellseg-bench-{row.name}", daemon=True)
    proc.start()
    try:
        while proc.is_alive():
            proc.join(0.2)
            advance(done.value)
    finally:
        if proc.is_alive():  # interrupted: do not leave the row running
            proc.terminate()
            proc.join()
    if result.is_file():
        with result.open("rb") as f:
            return pickle.load(f)
    return RowFailure(row.name, "failed", _death_reason(proc.exitcode))


def _row_process(row: RowPlan, data: BenchData, warmup: int, iters: int, result: str, done: Any) -> None:
    def tick() -> None:
        done.value += 1

    try:
        outcome: RowRun | RowFailure = attempt_row(row, data, warmup, iters, tick)
    except DataError as err:
        outcome = RowFailure(row.name, "failed", one_line(err), err)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        return
    tmp = f"{result}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(outcome, f)
    os.replace(tmp, result)  # the parent never reads half an outcome


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"out of memory: the row's process was killed by {name} (most likely the kernel's OOM killer)"
        return f"crashed: the row's process was killed by {name}"
    return f"crashed: the row's process exited with code {exitcode} without a result"
