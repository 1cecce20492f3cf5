"""One exception hierarchy. The CLI maps each class to a one-line message and an exit code."""
from __future__ import annotations


class CellsegError(Exception):
    """Base of every error cellseg raises on purpose. `str(err)` is the one-line message."""

    exit_code = 1


class InputError(CellsegError):
    """Bad user input: a file that cannot be read, a wrong shape, a bad option value."""

    exit_code = 2


class DataError(InputError):
    """A data file (image, mask, annotation JSON) is unreadable or inconsistent."""


class CheckpointError(CellsegError):
    """A checkpoint or export artifact is missing, corrupt, or not described by its metadata."""

    exit_code = 3


class OutputExistsError(CellsegError):
    """An output already exists and --force was not given: we never silently overwrite."""

    exit_code = 4


class BackendUnavailableError(CellsegError):
    """A backend's runtime (CUDA, onnxruntime, TensorRT) is not installed or not usable here."""

    exit_code = 5


class VerificationError(CellsegError):
    """An exported graph disagrees with PyTorch, or a parity gate failed."""

    exit_code = 6


class TrainingError(CellsegError):
    """Training cannot start or continue (e.g. no samples, diverged loss)."""

    exit_code = 7
