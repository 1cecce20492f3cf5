"""Load test of `cellseg serve`: drives the Triton server from localhost with tritonclient (HTTP) at
several concurrency levels for a bounded number of requests each, and checks every response
against `cellseg infer` on the same image.

    python -m cellseg.bench.serve MODEL --data IMAGES [--backend onnxruntime] [--concurrency 1,2,4,8]
        [--requests 48] [--url HOST:PORT] [--instances 1] [--out bench/results] [--force]

Without --url the bench starts the server itself (`python -m cellseg serve`, free ports) and
stops it at the end. The reference is `cellseg infer MODEL IMAGES` run as its own process before
the load (image ids 1..N in infer's order, sent as each request's image_id); a response counts as
identical only when its JSON entries equal infer's for that image exactly. Each level sends
`--requests` requests (images in turn) after one warm-up request per client thread; each thread
has its own HTTP client and sends its next request when the last one returned (closed loop).
Writes <out>/<date>-serve-<N>cpu.{md,json,png}."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.bench.core import environment_info, fmt, fmt_ms, latency_stats_ms
from cellseg.errors import CellsegError, InputError, VerificationError


@dataclass
class Job:
    path: Path
    image_id: int
    data: bytes
    expected: list[dict]


@dataclass
class LevelRun:
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    wall_s: float = 0.0


# -------------------------------------------------------------------------------- reference
def reference_results(model: Path, paths: Sequence[Path], backend: str | None, work: Path) -> tuple[dict[int, list[dict]], float]:
    """`cellseg infer` on `paths` in its own process -> entries by image id, and its wall time."""
    out = work / "infer.json"
    cmd = [sys.executable, "-m", "cellseg", "infer", str(model), *map(str, paths), "--out", str(out), "--quiet"]
    if backend:
        cmd += ["--backend", backend]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise InputError(f"cellseg infer (the reference) failed: {done.stderr.strip().splitlines()[-1:]}")
    by_image: dict[int, list[dict]] = {i: [] for i in range(1, len(paths) + 1)}
    for entry in json.loads(out.read_text()):
        by_image[entry["image_id"]].append(entry)
    return by_image, seconds


def make_jobs(paths: Sequence[Path], expected: dict[int, list[dict]]) -> list[Job]:
    return [Job(p, i, p.read_bytes(), expected[i]) for i, p in enumerate(paths, start=1)]


# ------------------------------------------------------------------------------------- load
def run_level(url: str, jobs: Sequence[Job], concurrency: int, requests: int) -> LevelRun:
    """`requests` requests from `concurrency` closed-loop client threads; every response checked."""
    import tritonclient.http as http

    from cellseg.serve_client import MODEL_NAME, error_line, http_client, image_inputs, results_of

    run = LevelRun(concurrency)
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        client = http_client(url)
        client.infer(MODEL_NAME, image_inputs(http, jobs[0].data, jobs[0].image_id))  # warm-up, not timed
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            job = jobs[i % len(jobs)]
            t0 = time.perf_counter()
            try:
                got = results_of(client.infer(MODEL_NAME, image_inputs(http, job.data, job.image_id)))[0]
            except Exception as err:  # noqa: BLE001 - every failed request is counted, the load goes on
                with lock:
                    run.errors.append(f"{job.path.name}: {error_line(err)}")
                continue
            elapsed = time.perf_counter() - t0
            with lock:
                run.latencies_s.append(elapsed)
                if got != job.expected:
                    run.mismatches.append(f"{job.path.name}: {len(got)} entries, infer wrote {len(job.expected)}")

    start = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    run.wall_s = time.perf_counter() - t0
    return run


def level_figures(run: LevelRun) -> dict:
    done = len(run.latencies_s)
    return {"concurrency": run.concurrency, "requests": done + len(run.errors), "ok": done,
            "errors": len(run.errors), "mismatches": len(run.mismatches), "wall_s": run.wall_s,
            "throughput_rps": done / run.wall_s if run.wall_s > 0 else 0.0,
            "latency_ms": latency_stats_ms(run.latencies_s),
            "latencies_ms": [1000.0 * s for s in run.latencies_s],
            "error_examples": run.errors[:5], "mismatch_examples": run.mismatches[:5]}


# ----------------------------------------------------------------------------------- report
def render_markdown(report: dict) -> str:
    from cellseg.bench.report import _md_table, machine_line

    rows = [[str(r["concurrency"]), str(r["requests"]), str(r["errors"]), str(r["requests"] - r["errors"] - r["mismatches"]),
             fmt(r["throughput_rps"], ".2f"), fmt_ms(r["latency_ms"]["p50"]), fmt_ms(r["latency_ms"]["p90"]),
             fmt_ms(r["latency_ms"]["p99"]), fmt_ms(r["latency_ms"]["mean"])] for r in report["levels"]]
    table = _md_table(("concurrency", "requests", "errors", "identical to infer", "req/s", "p50 ms", "p90 ms",
                       "p99 ms", "mean ms"), rows)
    ref = report["reference"]
    return "\n".join([
        f"# cellseg serve load test ({report['date']})", "",
        f"`{report['command']}`", "",
        f"Model `{report['model']}`, backend {report['backend'] or 'default'}, {report['server']}; "
        f"{report['images']} images from `{report['data']}`, sent in turn with their infer image ids.", "",
        f"Machine: {machine_line(report['environment'])}.", "",
        table, "",
        f"Reference: `cellseg infer` on the same {report['images']} images in its own process: "
        f"{ref['seconds']:.1f} s wall including model load ({ref['instances']} instances).",
        "Latency is per request at the client (HTTP, closed loop: each thread sends its next request when "
        "the last returns); req/s = answered requests / wall time of the level. A response is identical "
        "when its COCO entries equal infer's for the image exactly.", ""])


def plot_levels(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    names = [str(r["concurrency"]) for r in levels]
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4))
    ax_lat.boxplot([r["latencies_ms"] or [0.0] for r in levels], tick_labels=names, showmeans=True)
    ax_lat.set_xlabel("concurrent clients")
    ax_lat.set_ylabel("latency per request (ms)")
    ax_lat.set_title("latency")
    ax_tp.bar(names, [r["throughput_rps"] for r in levels])
    ax_tp.set_xlabel("concurrent clients")
    ax_tp.set_ylabel("requests / s")
    ax_tp.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_paths(out: Path, date: str, force: bool) -> list[Path]:
    """<out>/<date>-serve-<N>cpu.{md,json,png}, checked before any work (never overwritten without --force)."""
    from cellseg.fileio import check_writable

    stem = out / f"{date}-serve-{os.cpu_count()}cpu"
    paths = [stem.with_suffix(s) for s in (".md", ".json", ".png")]
    for p in paths:
        check_writable(p, force)
    return paths


def write_report(report: dict, out: Path, force: bool) -> Path:
    from cellseg.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

    paths = report_paths(out, report["date"], force)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "latency.png"
        plot_levels(report, png)
        atomic_write_bytes(paths[2], png.read_bytes(), force=force)
    slim = {**report, "levels": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in report["levels"]]}
    atomic_write_json(paths[1], {**slim, "latencies_ms": {str(r["concurrency"]): r["latencies_ms"] for r in report["levels"]}},
                      force=force, indent=1)
    atomic_write_text(paths[0], render_markdown(report), force=force)
    return paths[0]


# ------------------------------------------------------------------------------------- main
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cellseg.bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="checkpoint .pt or export folder (also the reference's model)")
    parser.add_argument("--data", type=Path, required=True, help="image folder, files' folder or HW3 root")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--images", type=int, default=0, help="use only the first N images (0 = all)")
    parser.add_argument("--url", default=None, help="target a running server (HOST:PORT, HTTP) instead of starting one")
    parser.add_argument("--instances", type=int, default=1, help="model instances of the started server")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--force", action="store_true")
    return parser.parse_args(argv)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise InputError(f"--concurrency {text!r}: expected positive integers, comma-separated")
    return levels


def run(args: argparse.Namespace, command: str) -> dict:
    from cellseg.infer import collect_inputs
    from cellseg.serve_client import ServerProcess

    levels = _levels(args.concurrency)
    if args.requests < 1:
        raise InputError(f"--requests {args.requests}: must be >= 1")
    paths = collect_inputs([args.data])[: args.images or None]
    with tempfile.TemporaryDirectory(prefix="cellseg-serve-bench-") as tmp:
        expected, ref_seconds = reference_results(args.model, paths, args.backend, Path(tmp))
        jobs = make_jobs(paths, expected)
        server = None if args.url else ServerProcess(args.model, args.backend, ["--instances", str(args.instances)],
                                                     log=Path(tmp) / "server.log")
        if server is not None:
            server.start()
        try:
            url = args.url or server.url
            results = []
            for c in levels:
                results.append(level_figures(run_level(url, jobs, c, args.requests)))
                r = results[-1]
                print(f"concurrency {c}: {r['throughput_rps']:.2f} req/s, p50 {fmt_ms(r['latency_ms']['p50'])} ms, "
                      f"p99 {fmt_ms(r['latency_ms']['p99'])} ms, {r['errors']} errors, {r['mismatches']} mismatches",
                      flush=True)
        finally:
            if server is not None:
                server.stop()
    server_text = f"server at {args.url}" if args.url else f"server started by the bench ({args.instances} instance(s))"
    return {"date": datetime.date.today().isoformat(), "command": command, "model": str(args.model),
            "backend": args.backend, "data": str(args.data), "images": len(paths), "server": server_text,
            "reference": {"seconds": ref_seconds, "instances": sum(len(v) for v in expected.values())},
            "levels": results, "environment": environment_info()}


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    command = "python -m cellseg.bench.serve " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report_paths(args.out, datetime.date.today().isoformat(), args.force)
        report = run(args, command)
        path = write_report(report, args.out, args.force)
        print(f"wrote {path} (and .json, .png)")
        bad = [r for r in report["levels"] if r["errors"] or r["mismatches"]]
        if bad:
            raise VerificationError(f"{sum(r['errors'] for r in bad)} errors and {sum(r['mismatches'] for r in bad)} "
                                    f"responses different from cellseg infer (see {path})")
    except CellsegError as err:
        print(f"cellseg: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
