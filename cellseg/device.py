"""The one place that turns a device name (auto | cpu | cuda | cuda:N) into a torch.device, and
the machine's physical core count that CPU runtimes size their thread pools by."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cellseg.errors import BackendUnavailableError, InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def cuda_unavailable_reason() -> str | None:
    """None when torch sees a CUDA device, else why not (one line)."""
    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} is {build} and sees no GPU"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` takes CUDA when torch sees a GPU, else the CPU. A bare `cuda` means this process's
    GPU (`local_rank` under torchrun); `cuda:N` is taken as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"--device {name}: CUDA is not available ({reason}); use --device cpu or auto")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    raise InputError(f"unknown device {name!r} (choose from {', '.join(DEVICE_CHOICES)})")


def physical_cores() -> int:
    """Physical cores (hyper-threads excluded), for intra-op threads; falls back to os.cpu_count()."""
    try:
        pairs = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if ":" in line:
                k, v = line.split(":", 1)
                block[k.strip()] = v.strip()
            elif block:
                pairs.add((block.get("physical id"), block.get("core id")))
                block = {}
        if pairs and (None, None) not in pairs:
            return max(1, len(pairs))
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)
