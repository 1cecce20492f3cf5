"""Client side of `cellseg serve`, shared by the load test (cellseg.bench.serve) and the tests:
request tensors for one image, the results of one call, readiness polling, and a server started
as a subprocess (`python -m cellseg serve ...`) that is always stopped. tritonclient (extra
`serve`) is imported only here and in the bench."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.errors import BackendUnavailableError, InputError

MODEL_NAME = "cellseg"  # cellseg.serve.MODEL_NAME, repeated so that clients need no pytriton


def image_inputs(module, data: bytes, image_id: int | None = None, score_thresh: float | None = None) -> list:
    """tritonclient InferInputs (module: tritonclient.http or tritonclient.grpc) for one image."""
    image = module.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=object))  # object: bytes_ would drop trailing NULs
    inputs = [image]
    if image_id is not None:
        ids = module.InferInput("image_id", [1, 1], "INT64")
        ids.set_data_from_numpy(np.array([[image_id]], dtype=np.int64))
        inputs.append(ids)
    if score_thresh is not None:
        thresh = module.InferInput("score_thresh", [1, 1], "FP32")
        thresh.set_data_from_numpy(np.array([[score_thresh]], dtype=np.float32))
        inputs.append(thresh)
    return inputs


def results_of(response) -> list[list[dict]]:
    """The COCO entries of each batch row of a response."""
    return [json.loads(bytes(row[0])) for row in response.as_numpy("results")]


def error_line(err: BaseException) -> str:
    """The one-line reason in a server error (pytriton sends a traceback; its cause ends it)."""
    text = err.message() if hasattr(err, "message") else str(err)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.strip().startswith(("At:", "/"))]
    for ln in reversed(lines):
        if "Error: " in ln:
            return ln.split("Error: ", 1)[1]
    return lines[-1] if lines else ""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_client(url: str, concurrency: int = 1):
    try:
        import tritonclient.http as http
    except ImportError:
        raise BackendUnavailableError("the serve client needs tritonclient (pip install 'cellseg[serve]')") from None
    return http.InferenceServerClient(url, concurrency=concurrency, connection_timeout=600.0, network_timeout=600.0)


def wait_until_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll the server's model readiness (Triton's /v2/models/cellseg/ready) until it is ready."""
    client = http_client(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InputError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if client.is_model_ready(MODEL_NAME):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise InputError(f"{url}: the server was not ready within {timeout_s:.0f} s")


@dataclass
class ServerProcess:
    """`python -m cellseg serve MODEL ...` on free local ports; use as a context manager."""

    model: Path
    backend: str | None = None
    extra_args: Sequence[str] = ()
    ready_timeout_s: float = 300.0
    log: Path | None = None

    def __post_init__(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "cellseg", "serve", str(self.model), "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port), *self.extra_args]
        if self.backend:
            cmd += ["--backend", self.backend]
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_ready(self.url, self.ready_timeout_s, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL of its process group if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
