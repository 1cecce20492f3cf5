"""A text file written piece by piece into a temporary file next to its final path, renamed
into place by commit(); abort() (or any failure) leaves nothing at the final path."""
from __future__ import annotations

import os
from pathlib import Path

from cellseg.errors import OutputError
from cellseg.fileio import check_writable, make_temp_file


class AtomicTextStream:
    def __init__(self, path: Path, force: bool) -> None:
        self.path = check_writable(path, force)
        fd, self.tmp = make_temp_file(self.path)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        try:
            self._fh.write(text)
        except OSError as err:
            self.abort()
            raise OutputError(f"{self.path}: write failed ({err.strerror or err})") from None

    def commit(self) -> Path:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.tmp, 0o666 & ~mask)
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.abort()
            raise OutputError(f"{self.path}: write failed ({err.strerror or err})") from None
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)
