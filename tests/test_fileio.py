"""Atomic outputs: never half-written, never silently overwritten, ordinary permissions."""
from __future__ import annotations

import json
import os
import stat

import pytest

from cellseg.errors import OutputExistsError
from cellseg.fileio import atomic_write, atomic_write_json, check_writable, make_temp_dir


def test_atomic_write_json_writes_and_refuses_overwrite_without_force(tmp_path):
    out = tmp_path / "sub" / "r.json"
    atomic_write_json(out, [1, 2], force=False)
    assert json.loads(out.read_text()) == [1, 2]
    with pytest.raises(OutputExistsError, match="--force"):
        atomic_write_json(out, [3], force=False)
    assert json.loads(out.read_text()) == [1, 2]
    atomic_write_json(out, [3], force=True)
    assert json.loads(out.read_text()) == [3]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")

    def boom(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, boom, force=True)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = atomic_write_json(tmp_path / "r.json", {})
        folder = make_temp_dir(tmp_path, ".x.")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_check_writable_creates_parent(tmp_path):
    path = check_writable(tmp_path / "a" / "b.json")
    assert path.parent.is_dir() and not path.exists()
