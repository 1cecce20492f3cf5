"""COCO results JSON written as the entries come: a JSON list, one entry per line."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cellseg.outputs.stream import AtomicTextStream


class CocoResultsWriter:
    """`add(entries)` any number of times, then `close()` (atomic rename) or `abort()`."""

    def __init__(self, path: Path, force: bool = False) -> None:
        self._out = AtomicTextStream(path, force)
        self._out.write("[")
        self.count = 0

    @property
    def path(self) -> Path:
        return self._out.path

    def add(self, entries: Iterable[dict]) -> None:
        for entry in entries:
            self._out.write(("\n" if self.count == 0 else ",\n") + json.dumps(entry))
            self.count += 1

    def close(self) -> Path:
        self._out.write("\n]\n")
        return self._out.commit()

    def abort(self) -> None:
        self._out.abort()
