"""`cellseg infer --engine ray`: images predicted on Ray Data actors, results merged and written
by this process exactly as a local run writes them.

Each actor loads its own predictor (cellseg.pipeline.load_predictor) with cores / workers threads
and runs its images through cellseg.infer.image_tile_results: the local run's per-image path
(open, plan tiles, tissue check, predict + paste + RLE per tile). It sends back the image's tile
results as JSON; this process feeds them to cellseg.infer.infer_to_outputs, which merges seams,
journals and writes in input order, so every output is byte-identical to a local run's.

Failures: an actor that dies (killed, out of memory) is restarted and its unfinished batch
retried (Ray Data's actor fault tolerance: max_restarts and max_task_retries -1, without limit). Results are keyed by image
index: a repeated one is dropped, a missing one is an error. A CellsegError in a worker (a bad
image) comes back as data and is raised here with its own message and exit code, at the image
where a local run raises it.

Ray is imported only in this module, and only when the engine runs."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg import errors
from cellseg.errors import BackendUnavailableError, CellsegError
from cellseg.infer import (InferenceStats, InferSettings, OutputPlan, image_tile_results, infer_to_outputs,
                           journal_complete, journal_path, tile_from_record, tile_record)
from cellseg.tiling import TilePlan, TileResult

# Test hook: "N" makes one actor exit hard (os._exit, as the kernel's OOM killer would) after it has
# predicted N images, before it returns them; once per run: the first to create the marker file
# dies ("N:PATH" names it, else it lies in the run's work folder and goes with it).
KILL_ENV = "CELLSEG_RAY_TEST_KILL"
KILL_MARKER = "ray-test-kill.done"


@dataclass(frozen=True)
class WorkerSpec:
    """What each actor needs to load its predictor and run an image: plain, picklable data."""

    model: str
    backend: str
    device: str
    threads: int
    precision: str | None
    settings: InferSettings
    kill_after: int = 0
    kill_marker: str = ""


def infer_with_ray(predictor, model: Path, device: str, paths: Sequence[Path], image_ids: Sequence[int],
                   plan: OutputPlan, settings: InferSettings, workers: int = 2,
                   address: str | None = None, precision: str | None = None) -> InferenceStats:
    """infer_to_outputs with every image predicted by one of `workers` Ray actors."""
    ray = _import_ray()
    todo = images_to_run(len(paths), plan.work, settings.resume)
    with _ray_session(ray, address) as cpus:
        spec = WorkerSpec(str(Path(model).resolve()), predictor.backend_name, device,
                          max(1, int(cpus // workers)), precision, settings, *_kill_hook(plan.work))
        items = [{"index": i, "path": str(Path(paths[i]).resolve()), "image_id": int(image_ids[i])} for i in todo]
        rows = _predicted_rows(ray, spec, items, workers, cpus / workers)
        remote = RemoteResults(rows, todo, paths, ray.exceptions.RayError)
        try:
            stats = infer_to_outputs(predictor, paths, image_ids, plan, settings, computed=remote.for_image)
        finally:
            _stop(rows)
    stats.seconds["predict"] += remote.predict_seconds
    if remote.duplicates:
        stats.notes.append(f"ray: dropped {remote.duplicates} repeated image results (retried batches)")
    return stats


def images_to_run(count: int, work: Path, resume: bool) -> list[int]:
    """Image indices the workers must predict: all, less those a resumed run has fully journalled."""
    return [i for i in range(count) if not (resume and journal_complete(journal_path(work, i)))]


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise BackendUnavailableError(f"--engine ray: ray is not installed ({err}); "
                                      f"pip install 'cellseg[ray]'") from None
    return ray


@contextmanager
def _ray_session(ray, address: str | None) -> Iterator[float]:
    """A Ray session for this run, yielding its CPU count: the cluster at `address`, else a local
    one sized to this machine's cores; an already started session is used and left running."""
    started = not ray.is_initialized()
    if started:
        quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                from cellseg.device import physical_cores

                ray.init(num_cpus=physical_cores(), **quiet)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
            raise BackendUnavailableError(f"ray: cannot start or reach a cluster"
                                          f"{f' at {address}' if address else ''}: {_one_line(err)}") from None
    try:
        yield float(ray.cluster_resources().get("CPU", 1.0))
    finally:
        if started:
            ray.shutdown()


def _kill_hook(work: Path) -> tuple[int, str]:
    count, _, marker = os.environ.get(KILL_ENV, "").strip().partition(":")
    if not count.isdigit():
        return 0, ""
    return int(count), marker or str(work / KILL_MARKER)


def _predicted_rows(ray, spec: WorkerSpec, items: list[dict], workers: int,
                    cpus_per_worker: float) -> Iterator[dict]:
    """The rows {index, payload} of a Ray Data run over `items`, in the order they finish."""
    if not items:
        return iter(())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows its own bar over merged images
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    dataset = ray.data.from_items(items, override_num_blocks=len(items))  # one image per task: even shares
    # Ray Data restarts a dead actor and retries its batch by default (max_restarts and
    # max_task_retries -1); passing them is deprecated since Ray 2.60.
    dataset = dataset.map_batches(PredictorActor, fn_constructor_args=(spec,), batch_size=1,
                                  compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker)
    return iter(dataset.iter_rows())


def _stop(rows: Iterator[dict]) -> None:
    """End the Ray Data run (its actors too) when this process stops reading early: an error, an
    interrupt; in a session that outlives the run, they would hold its CPUs."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()


# ------------------------------------------------------------------------------------ the worker
class PredictorActor:
    """One Ray Data actor: a predictor, loaded once, run on one image at a time."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.predictor = load_worker_predictor(spec)
        self.images = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"index": [], "payload": []}
        for index, path, image_id in zip(batch["index"], batch["path"], batch["image_id"]):
            out["index"].append(int(index))
            out["payload"].append(self.predict(Path(str(path)), int(image_id)))
            self.images += 1
            _maybe_die(self.spec, self.images)
        return out

    def predict(self, path: Path, image_id: int) -> str:
        """The image's tile results as JSON, or the CellsegError it raised."""
        t0 = time.perf_counter()
        try:
            results = image_tile_results(self.predictor, path, image_id, self.spec.settings)
        except CellsegError as err:
            return json.dumps({"error": type(err).__name__, "message": str(err)})
        return json.dumps({"seconds": time.perf_counter() - t0, "tiles": [tile_record(r) for r in results]})


def load_worker_predictor(spec: WorkerSpec):
    """The driver's backend and precision, with `spec.threads` threads for torch, onnxruntime and
    openvino, so that the actors on one machine share its cores instead of each taking all of them."""
    import torch

    from cellseg.pipeline import load_predictor

    torch.set_num_threads(spec.threads)
    return load_predictor(spec.model, backend=spec.backend, device=spec.device, precision=spec.precision,
                          threads=spec.threads)


def _maybe_die(spec: WorkerSpec, images: int) -> None:
    if not spec.kill_after or images < spec.kill_after:
        return
    try:
        os.close(os.open(spec.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:  # already killed once (or no work folder): carry on
        return
    os._exit(1)


# ------------------------------------------------------------------------------------ the driver
class RemoteResults:
    """The workers' rows, handed to infer_to_outputs image by image in input order: rows that
    come early wait here, a repeated one (a retried batch) is dropped."""

    def __init__(self, rows: Iterator[dict], todo: Sequence[int], paths: Sequence[Path],
                 ray_error: type[Exception] = Exception) -> None:
        self._rows, self._todo, self._paths, self._ray_error = rows, set(todo), paths, ray_error
        self._waiting: dict[int, dict] = {}
        self._taken: set[int] = set()
        self.duplicates = 0
        self.predict_seconds = 0.0

    def for_image(self, index: int, tile_plan: TilePlan) -> dict[int, TileResult]:
        if index not in self._todo:
            return {}  # fully journalled: the driver replays it
        while index not in self._waiting:
            self._take(self._next_row(index))
        payload = self._waiting.pop(index)
        self._taken.add(index)
        return self._tile_results(index, payload, tile_plan)

    def _next_row(self, index: int) -> dict:
        try:
            return next(self._rows)
        except StopIteration:
            raise BackendUnavailableError(f"{self._paths[index]}: the ray workers returned no result") from None
        except self._ray_error as err:
            raise BackendUnavailableError(f"ray workers failed: {_one_line(err)}") from None

    def _take(self, row: dict) -> None:
        index = int(row["index"])
        if index in self._waiting or index in self._taken:
            self.duplicates += 1
            return
        self._waiting[index] = json.loads(row["payload"])

    def _tile_results(self, index: int, payload: dict, tile_plan: TilePlan) -> dict[int, TileResult]:
        if "error" in payload:
            kind = getattr(errors, payload["error"], None)
            if not (isinstance(kind, type) and issubclass(kind, CellsegError)):
                kind = CellsegError
            raise kind(payload["message"])
        self.predict_seconds += float(payload["seconds"])
        tiles = {t.index: t for t in tile_plan.tiles()}
        records = payload["tiles"]
        if sorted(r["tile"] for r in records) != sorted(tiles):
            raise BackendUnavailableError(f"{self._paths[index]}: a ray worker planned other tiles than this "
                                          f"process (another cellseg version or settings?)")
        return {r["tile"]: tile_from_record(r, tiles) for r in records}


def _one_line(err: BaseException) -> str:
    """The last line of an error's text: where Ray puts the original exception."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__
