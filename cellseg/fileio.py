"""Atomic output writing: results are written to a temporary file in the target folder and
renamed into place, so an interrupted run never leaves a half-written file behind.

Temporary names carry the writer's process id: `.<final name>.<pid>.<random>.tmp` (files and
folders). A run killed with SIGKILL cannot remove its own temporary; the next cellseg process that
writes into that folder (any atomic write, temporary folder or writability check) removes those
whose process is no longer alive. Temporaries of live processes are never touched, so two concurrent writers of
one path do not disturb each other.

Writability is checked before the work starts (`check_writable`, `ensure_writable_folder`): the
folder is created if needed and probed with a real temporary file, so a read-only or impossible
output folder fails in one line before any compute, not in a traceback after it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg.errors import DataError, OutputError, OutputExistsError

TEMP_SUFFIX = ".tmp"
_PROBE_PREFIX = ".cellseg-write-probe."
# A temporary's name: "." + final name or caller's prefix + "<pid>.<8 random chars of mkstemp /
# mkdtemp>.tmp". Strict, so that nothing but cellseg's own temporaries ever matches.
_TEMP_NAME = re.compile(r"\..+\.([0-9]+)\.[a-z0-9_]{8}\.tmp")


# ------------------------------------------------------------------------ stale temporaries
def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie (a killed child that its parent
    has not reaped yet still answers kill(pid, 0))."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) said it exists
    return state not in ("Z", "X")


def stale_temps(folder: Path) -> list[Path]:
    """cellseg temporaries `.<name>.<pid>.<random>.tmp` in `folder` whose writer is dead."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(".")]
    except OSError:
        return []
    stale = []
    for name in names:
        match = _TEMP_NAME.fullmatch(name)
        if match and not pid_alive(int(match.group(1))):
            stale.append(folder / name)
    return stale


_cleaned_folders: set[str] = set()


def remove_stale_temps(folder: str | os.PathLike, again: bool = False) -> list[Path]:
    """Delete what `stale_temps` finds (files or folders); returns what was removed. Done once
    per folder and process (unless `again`): leftovers come from processes that died before
    this one wrote there, and listing a folder of 10,000 overlays at every write would be
    quadratic. Errors are ignored: a leftover we cannot delete must not stop the new run."""
    folder = Path(folder)
    key = os.path.abspath(folder)
    if key in _cleaned_folders and not again:
        return []
    removed = []
    for entry in stale_temps(folder):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    _cleaned_folders.add(key)
    return removed


def _temp_prefix(prefix: str) -> str:
    return f"{prefix}{os.getpid()}."


# ------------------------------------------------------------------------------ writability
def _blocking_file(folder: Path) -> Path | None:
    """The nearest existing ancestor (or `folder` itself) that is not a folder, if any."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def ensure_writable_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents) if needed and prove that a file can be created in it;
    an OutputError (exit 8) naming the folder otherwise."""
    folder = Path(folder)
    blocker = _blocking_file(folder)
    if blocker is not None:
        raise OutputError(f"{folder}: cannot create output folder ({blocker} is a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create output folder ({err.strerror or err})") from None
    remove_stale_temps(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(_PROBE_PREFIX), suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{folder}: output folder is not writable ({err.strerror or err})") from None
    return folder


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Before the work starts: refuse to overwrite an existing file unless `force`
    (OutputExistsError, exit 4), refuse a folder where a file is expected, and make sure the
    parent folder exists (created if needed) and is writable (OutputError, exit 8)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a file name to write")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists (pass --force to overwrite)")
    ensure_writable_folder(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A temporary folder `<prefix><pid>.<random>.tmp` in `parent` with ordinary permissions
    (mkdtemp makes 0700), to be filled and renamed into place. Folders with the same prefix that
    killed runs left behind are removed first."""
    parent = Path(parent)
    remove_stale_temps(parent)
    try:
        path = Path(tempfile.mkdtemp(prefix=_temp_prefix(prefix), suffix=TEMP_SUFFIX, dir=parent))
        os.chmod(path, 0o777 & ~_umask())
    except OSError as err:
        raise OutputError(f"{parent}: cannot create a temporary folder ({err.strerror or err})") from None
    return path


def make_temp_file(path: str | os.PathLike) -> tuple[int, Path]:
    """(open fd, path) of a new temporary file `.<name>.<pid>.<random>.tmp` beside `path`, after
    removing what killed runs left there; to be filled and renamed onto `path`."""
    path = Path(path)
    remove_stale_temps(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(f".{path.name}."), suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
    return fd, Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = True) -> Path:
    """Call `write(tmp_path)` then rename tmp_path onto `path` (same folder, so the rename is
    atomic on POSIX). On any exception the temporary file is removed and `path` is untouched; an
    OSError (disk full, read-only folder) becomes a one-line OutputError naming `path`."""
    path = check_writable(path, force)
    fd, tmp_path = make_temp_file(path)
    os.close(fd)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from err
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


# ---------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a one-line DataError that
    names the file and says what it should have been (`what`, e.g. "COCO GT file")."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a {what}")
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not data.strip():
        raise DataError(f"{path}: empty file, expected a {what}")
    try:
        return json.loads(data)  # bytes: the UTF-8/16/32 encoding (and a BOM) is detected
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except (ValueError, RecursionError) as err:  # 5000-digit integers, nesting 1000 deep
        raise DataError(f"{path}: not valid JSON for a {what} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else 'too deep'})") from None
