"""Atomic output writing: results are written to a temporary file in the target folder and
renamed into place, so an interrupted run never leaves a half-written file behind."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg.errors import DataError, OutputExistsError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to overwrite an existing file unless `force`; create the parent folder."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists (pass --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A temporary folder in `parent` with ordinary permissions (mkdtemp makes 0700), to be
    filled and renamed into place."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = True) -> Path:
    """Call `write(tmp_path)` then rename tmp_path onto `path` (same folder, so the rename is
    atomic on POSIX). On any exception the temporary file is removed and `path` is untouched."""
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, force: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), force)


def atomic_write_text(path: str | os.PathLike, text: str, force: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_text(text), force)


def atomic_write_json(path: str | os.PathLike, obj: Any, force: bool = True, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent), force)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a one-line DataError that
    names the file and says what it should have been (`what`, e.g. "COCO GT file")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
