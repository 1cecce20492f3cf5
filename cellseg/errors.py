"""One exception hierarchy. The CLI maps each class to a one-line message and an exit code.

Exit codes: 2 input/data, 3 checkpoint, 4 output exists, 5 backend unavailable, 6 verification,
7 training, 8 output cannot be written. `foreign_errors` is the one place where exceptions of
other libraries (tifffile, Pillow, json, torch.load, pycocotools, onnxruntime) become cellseg
errors in cellseg's own words."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator


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


class OutputError(CellsegError):
    """An output cannot be written: its folder is missing and cannot be created, is not a folder,
    is read-only, or the disk is full. Checked before the work starts where possible."""

    exit_code = 8


class OutputExistsError(OutputError):
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


_MAX_DETAIL = 160


def describe_foreign(err: BaseException) -> str:
    """The foreign exception's first non-empty line, shortened, or its class name when it has no
    text. Used inside parentheses after cellseg's own statement of the problem."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL - 3] + "..."


@contextlib.contextmanager
def foreign_errors(path: str | os.PathLike, what: str, error: type[CellsegError] = DataError,
                   explain: Callable[[BaseException], str | None] | None = None) -> Iterator[None]:
    """Turn any non-cellseg exception raised in the block into `error("<path>: ...")`.

    `what` names the thing being read ("image", "COCO GT file", "ONNX graph"); the message is
    "<path>: cannot read <what> (<first line of the foreign message>)", or
    "<path>: <explain(err)>" when `explain` returns a sentence for that exception (so a caller
    can say what is wrong in its own words, e.g. "truncated checkpoint"). CellsegErrors and
    BaseExceptions that are not Exceptions (KeyboardInterrupt, SystemExit) pass through;
    MemoryError becomes a one-line error too (its frames are dropped, so the memory is freed).
    The message is the whole report; the foreign exception stays as __cause__ for debugging."""
    try:
        yield
    except CellsegError:
        raise
    except MemoryError:
        raise error(f"{path}: not enough memory to read {what}") from None
    except Exception as err:  # noqa: BLE001 - this is the one place that catches them all
        sentence = explain(err) if explain is not None else None
        if sentence:
            raise error(f"{path}: {sentence}") from err
        raise error(f"{path}: cannot read {what} ({describe_foreign(err)})") from err
