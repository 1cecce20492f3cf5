"""The bench core shared by `cellseg bench` (harness.py) and the GPU check (gpu_check.py): device
sync, the parity constants, figures and gate, latency statistics, number formatting, the
environment a figure was measured in, and peak-memory readings."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PARITY_IOU = 0.95  # mask IoU at which a row's instance counts as the baseline's
MIN_PARITY = 0.99  # share of the baseline's instances a gated row must match

# /proc/cpuinfo flag -> the name used in reports, in the order reports list them.
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
             ("avx_vnni", "AVX-VNNI"), ("amx_tile", "AMX"))
VERSIONED = ("cellseg", "torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "openvino", "numpy", "pycocotools", "faster-coco-eval")


# ------------------------------------------------------------------------------------- device
def sync(device: Any) -> None:
    """Wait for the device's queued work, so a clock read after it measures the work, not its
    launch. `device`: a torch.device or a name ("cpu", "cuda", "cuda:1")."""
    if str(getattr(device, "type", device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize(None if device == "cuda" else device)  # bare "cuda": the current one


# ------------------------------------------------------------------------------------- parity
def delta_ap(metrics: dict, baseline_metrics: dict) -> dict[str, float | None]:
    """AP of each IoU type (segm, bbox) minus the baseline's; None where either is undefined."""
    out: dict[str, float | None] = {}
    for iou_type, m in metrics.items():
        a, b = m.get("AP"), baseline_metrics.get(iou_type, {}).get("AP")
        out[iou_type] = (a - b) if a is not None and b is not None else None
    return out


def parity_figures(baseline_name: str, baseline_results: list[dict], baseline_metrics: dict,
                   results: list[dict], metrics: dict, iou: float = PARITY_IOU) -> dict:
    """ΔAP (row minus baseline, per IoU type) and one-to-one instance matching against the
    baseline (cellseg.evaluate.match_instances: share matched, mean IoU, max score difference)."""
    from cellseg.evaluate import match_instances

    match = match_instances(baseline_results, results, iou=iou)
    return {"baseline": baseline_name, "delta_ap": delta_ap(metrics, baseline_metrics), "match_iou": iou,
            **match}


def gate_failures(row: str, baseline: str, deltas: dict[str, float | None], matched_share: float,
                  max_map_drop: float, min_parity: float = MIN_PARITY, ref_count: int | None = None,
                  iou: float = PARITY_IOU) -> list[str]:
    """The parity gate: one line per breach. |ΔAP| beyond `max_map_drop` fails in either
    direction (a gain means the row computes something else too); so does a share of the
    baseline's instances matched at mask IoU >= `iou` below `min_parity`."""
    failures = [f"{row}: {iou_type} AP differs from {baseline} by {d:+.4f} (allowed ±{max_map_drop:g})"
                for iou_type, d in sorted(deltas.items()) if d is not None and abs(d) > max_map_drop]
    if matched_share < min_parity:
        counted = f"{baseline}'s {ref_count} instances" if ref_count is not None else f"{baseline}'s instances"
        failures.append(f"{row}: only {100 * matched_share:.1f}% of {counted} matched at mask IoU "
                        f">= {iou:g} (need {100 * min_parity:g}%)")
    return failures


# ------------------------------------------------------------------------------------ latency
def latency_stats_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99, min, max in milliseconds (zeros when nothing was timed)."""
    a = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {k: 0.0 for k in ("mean", "p50", "p90", "p99", "min", "max")}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def stages_ms(stage_s: dict[str, float], timed: int) -> dict[str, float]:
    """Summed stage seconds -> mean milliseconds per timed image."""
    return {k: 1000.0 * v / timed for k, v in stage_s.items()} if timed else {}


# --------------------------------------------------------------------------------- formatting
def fmt(value: float | None, spec: str = ".1f") -> str:
    """`value` formatted with the format spec, "-" for a missing figure."""
    return "-" if value is None else format(value, spec)


def fmt_ms(value: float | None) -> str:
    """Milliseconds with about four significant digits."""
    if value is None:
        return "-"
    return fmt(value, ".0f" if value >= 1000 else ".1f" if value >= 10 else ".2f")


# -------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def cpu_isa(cpuinfo: str | None = None) -> list[str]:
    """The vector / matrix extensions the CPU reports (AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI,
    AMX), read from the first `flags` line of /proc/cpuinfo; [] where that is not readable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return [name for flag, name in ISA_FLAGS if flag in flags]


def library_versions() -> dict[str, str | None]:
    import torch
    import torchvision

    versions: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    # The modules' own strings carry the build tag (e.g. 2.14.1+cu130), which matters for speed.
    versions["torch"], versions["torchvision"] = torch.__version__, torchvision.__version__
    return versions


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def environment_info() -> dict[str, Any]:
    """Where the figures were measured: host, CPU (model, ISA, cores, threads), GPU, versions."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model(), "cpu_isa": cpu_isa(), "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": library_versions(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda,
        "gpu_driver": gpu_driver() if cuda else None,
    }


# ------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark so what follows has its own peak (Linux >= 4.0); returns
    how `peak_rss_bytes` will then be measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM (reset per row)"
    except OSError:
        return "getrusage ru_maxrss (process peak so far)"


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux, else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def cuda_used_bytes(device: Any) -> int | None:
    """Device memory in use (every allocator, not only torch's) on a CUDA device, else None."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)
