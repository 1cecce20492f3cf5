"""`cellseg serve`: a Triton Inference Server (nvidia-pytriton: the bundled tritonserver binary and
its Python backend) around cellseg predictors.

Model `cellseg`, dynamic batching, one batch row per image:
  inputs   image         BYTES [1]  the encoded file (tif / png / jpg), decoded like `cellseg infer`
           score_thresh  FP32  [1]  optional: keep detections scoring at least this
           image_id      INT64 [1]  optional: the COCO image_id written into the entries (default 0)
  outputs  results       BYTES [1]  that image's COCO results entries, as JSON (a list)
Each row is exactly what `cellseg infer` writes for the same file: an image up to one tile is
one Predictor.predict_coco call in both. Larger images (--max-image-px defaults to one tile) are
refused: tiled whole-slide runs are for `cellseg infer`.

Errors: a bad row (corrupt or empty image, an image beyond the size limit, a bad score_thresh)
fails its request with the problem in one line; Triton itself refuses wrong dtypes and shapes
before the model sees them. pytriton reports an inference error for a whole batch, so rows are
all decoded and checked before any is run, and a request batched together with a bad one gets
the same error (it can be retried). The server stays up and healthy either way.

Each of --instances model instances has its own predictor, loaded once at start (Predictor is
not thread-safe: it adjusts the model's detection budgets per image size while it runs).
pytriton is imported only here (extra `serve`)."""
from __future__ import annotations

import json
import os
import signal
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.errors import BackendUnavailableError, CellsegError, InputError

MODEL_NAME = "cellseg"
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000  # how long Triton may hold a request to batch it with others


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_image_px: int | None = None  # None: one tile of the model (tiling.tile_settings)
    max_batch_size: int = DEFAULT_MAX_BATCH
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    log_verbose: int = 0


@dataclass(frozen=True)
class Row:
    image: np.ndarray
    image_id: int
    score_thresh: float | None


# ------------------------------------------------------------------------------ requests
def image_limit(spec, requested: int | None) -> int:
    """The largest image (pixels) served: one tile of the model, or less when asked."""
    from cellseg.data.images import MAX_IMAGE_PIXELS
    from cellseg.tiling import tile_settings

    tile, _ = tile_settings(spec, None, None)
    one_tile = min(tile * tile, MAX_IMAGE_PIXELS)
    if requested is None:
        return one_tile
    if requested < 1:
        raise InputError(f"--max-image-px {requested}: must be >= 1")
    if requested > one_tile:
        raise InputError(f"--max-image-px {requested}: the server runs whole images of at most one tile "
                         f"({tile} x {tile} = {one_tile} px); larger images are for `cellseg infer` (tiled)")
    return requested


def _column(request, name: str, rows: int, dtype) -> np.ndarray | None:
    if name not in request.keys():
        return None
    values = np.asarray(request[name])
    if values.shape[0] != rows or values.size != rows:
        raise InputError(f"input {name!r}: shape {values.shape}, expected [{rows}, 1] (one value per image)")
    return values.reshape(rows).astype(dtype)


def decode_rows(request, max_pixels: int, request_index: int = 0) -> list[Row]:
    """One request's batch rows -> decoded images with their image_id and score threshold;
    InputError (one line, naming the row) for anything that cannot be served."""
    from cellseg.data.images import read_image_bytes

    images = np.asarray(request["image"])
    n = images.shape[0]
    ids = _column(request, "image_id", n, np.int64)
    thresholds = _column(request, "score_thresh", n, np.float64)
    rows = []
    for i in range(n):
        name = f"request {request_index} row {i} image"
        thresh = None if thresholds is None else float(thresholds[i])
        if thresh is not None and not np.isfinite(thresh):
            raise InputError(f"{name}: score_thresh {thresh} is not a finite number")
        data = images.reshape(n, -1)[i, 0]
        image = read_image_bytes(data if isinstance(data, bytes) else bytes(data), name, max_pixels)
        rows.append(Row(image, 0 if ids is None else int(ids[i]), thresh))
    return rows


def results_tensor(entries_per_row: Sequence[list[dict]]) -> np.ndarray:
    """[rows, 1] object array of UTF-8 JSON (object dtype: numpy's bytes_ would drop trailing NULs)."""
    out = np.empty((len(entries_per_row), 1), dtype=object)
    for i, entries in enumerate(entries_per_row):
        out[i, 0] = json.dumps(entries).encode("utf-8")
    return out


def make_infer_func(predictor, max_pixels: int) -> Callable[[list], list[dict]]:
    """The pytriton inference callable of one model instance: requests -> one response each."""

    def infer(requests: list) -> list[dict]:
        from pytriton.exceptions import PyTritonBadParameterError

        try:  # every row of the batch is checked before any runs (errors are per batch)
            decoded = [decode_rows(request, max_pixels, k) for k, request in enumerate(requests)]
        except CellsegError as err:
            raise PyTritonBadParameterError(str(err)) from None
        responses = []
        for rows in decoded:
            entries = [predictor.predict_coco(r.image, r.image_id, r.score_thresh) for r in rows]
            responses.append({"results": results_tensor(entries)})
        return responses

    return infer


# -------------------------------------------------------------------------------- server
def _require_pytriton() -> None:
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("serving needs nvidia-pytriton (pip install 'cellseg[serve]')") from None


def _embed_this_python() -> None:
    """Triton's Python backend stub loads libpython through the dynamic linker, which may find a
    system libpython of another patch release than the interpreter whose standard library it then
    imports (here: Debian's 3.11.2 against pyenv's 3.11.7, and multiprocessing fails inside the
    stub). Putting this interpreter's own library folder first makes the two agree."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).is_file():
        return  # a static build: the stub finds the system library, as before
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir not in current.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, current]) if current else libdir


def model_tensors():
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="image", dtype=np.object_, shape=(1,)),
              Tensor(name="score_thresh", dtype=np.float32, shape=(1,), optional=True),
              Tensor(name="image_id", dtype=np.int64, shape=(1,), optional=True)]
    outputs = [Tensor(name="results", dtype=np.object_, shape=(1,))]
    return inputs, outputs


def triton_config(settings: ServeSettings):
    from pytriton.triton import TritonConfig

    return TritonConfig(http_address=settings.host, http_port=settings.http_port, grpc_address=settings.host,
                        grpc_port=settings.grpc_port, metrics_address=settings.host,
                        metrics_port=settings.metrics_port, log_verbose=settings.log_verbose, exit_on_error=True)


def bind_model(triton, predictors: Sequence[Any], max_pixels: int, settings: ServeSettings) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig

    inputs, outputs = model_tensors()
    config = ModelConfig(max_batch_size=settings.max_batch_size,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=settings.queue_delay_us))
    triton.bind(model_name=MODEL_NAME, infer_func=[make_infer_func(p, max_pixels) for p in predictors],
                inputs=inputs, outputs=outputs, config=config, strict=True)


def load_predictors(model: str | Path, backend: str | None, device: str, instances: int,
                    precision: str | None = None) -> list:
    """One predictor per model instance; the instances share the physical cores between them."""
    from cellseg.device import physical_cores
    from cellseg.pipeline import load_predictor

    threads = max(1, physical_cores() // instances)
    return [load_predictor(model, backend=backend, device=device, precision=precision, threads=threads)
            for _ in range(instances)]


def _check_settings(settings: ServeSettings) -> None:
    ports = (settings.http_port, settings.grpc_port, settings.metrics_port)
    if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != 3:
        raise InputError(f"ports {ports}: need three distinct ports in 1..65535 (http, grpc, metrics)")
    if settings.instances < 1:
        raise InputError(f"--instances {settings.instances}: must be >= 1")
    if settings.max_batch_size < 1:
        raise InputError(f"--max-batch-size {settings.max_batch_size}: must be >= 1")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm() -> None:
    """SIGTERM ends the server the way Ctrl+C does: the wait loop ends and Triton is stopped."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _wait_while_alive(triton, period_s: float = 1.0) -> None:
    try:
        while triton.is_alive():
            time.sleep(period_s)
    except KeyboardInterrupt:
        pass


def serve(model: str | Path, backend: str | None = None, device: str = "auto",
          settings: ServeSettings = ServeSettings(), on_ready: Callable[[str], None] | None = None,
          precision: str | None = None) -> None:
    """Load the predictors, start Triton and serve until SIGINT / SIGTERM or the server dies."""
    _check_settings(settings)
    _require_pytriton()
    from pytriton.triton import Triton

    predictors = load_predictors(model, backend, device, settings.instances, precision)
    max_pixels = image_limit(predictors[0].spec, settings.max_image_px)
    _stop_on_sigterm()
    _embed_this_python()
    with Triton(config=triton_config(settings)) as triton:
        bind_model(triton, predictors, max_pixels, settings)
        triton.run()
        if on_ready is not None:
            on_ready(f"serving model {MODEL_NAME!r} ({predictors[0].backend_name}, {settings.instances} instance(s), "
                     f"images up to {max_pixels:,} px) on http://{settings.host}:{settings.http_port} and "
                     f"grpc {settings.host}:{settings.grpc_port}; Ctrl+C or SIGTERM stops it")
        _wait_while_alive(triton)


# ------------------------------------------------------------------- a plain model repository
def start_bundled_tritonserver(repo: Path, work: Path, ports: tuple[int, int, int], log: Path):
    """pytriton's bundled tritonserver (Python backend only, CPU) on a model repository, as a
    subprocess: how a repository written by `cellseg export-triton` is checked here. The stub for
    this Python goes into a copy of the bundle, as pytriton itself does."""
    import shutil
    import subprocess
    import sys

    _require_pytriton()
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    server = work / "tritonserver"
    shutil.copytree(get_root_module_path() / "tritonserver", server,
                    ignore=shutil.ignore_patterns("python_backend_stubs", "triton_python_backend_stub"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                server / "backends" / "python" / "triton_python_backend_stub")
    _embed_this_python()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(get_libs_path())) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
           f"--backend-directory={server / 'backends'}", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
           f"--metrics-port={ports[2]}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--log-verbose=0",
           "--exit-timeout-secs=10"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
