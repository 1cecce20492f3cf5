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


# ---- writability before the work, write failures in one line
def test_check_writable_refuses_a_folder_under_a_regular_file(tmp_path):
    from cellseg.errors import OutputError

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=r"file.txt/sub: cannot create output folder \(.*file.txt is a file") as err:
        check_writable(tmp_path / "file.txt" / "sub" / "r.json")
    assert err.value.exit_code == 8
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path)


def test_check_writable_probes_a_read_only_folder(tmp_path, monkeypatch):
    """Root ignores chmod, so the probe's failure is simulated where the OS would report it."""
    import tempfile as tempfile_module

    from cellseg.errors import OutputError

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile_module, "mkstemp", refuse)
    with pytest.raises(OutputError, match="not writable .Permission denied"):
        check_writable(tmp_path / "r.json")


def test_atomic_write_turns_oserror_into_one_line_and_leaves_nothing(tmp_path):
    from cellseg.errors import OutputError

    def disk_full(path):
        path.write_text("part")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"r.json: cannot write \(No space left on device\)") as err:
        atomic_write(tmp_path / "r.json", disk_full)
    assert err.value.exit_code == 8 and list(tmp_path.iterdir()) == []


# ---- temporaries that killed runs left behind
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_carry_the_pid_and_stale_ones_are_removed(tmp_path):
    from cellseg.fileio import pid_alive

    dead = _dead_pid()
    assert not pid_alive(dead) and pid_alive(os.getpid())
    stale_file = tmp_path / f".r.json.{dead}.abcd_123.tmp"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".exp.{dead}.zz99zz99.tmp"
    stale_dir.mkdir()
    (stale_dir / "graph.onnx").write_bytes(b"half")
    live = tmp_path / f".other.json.{os.getppid()}.abcdefgh.tmp"  # a concurrent writer, alive
    live.write_text("in progress")
    legacy_like = tmp_path / ".notes.txt"
    legacy_like.write_text("not ours")
    seen = []
    atomic_write(tmp_path / "r.json", lambda p: seen.append(p.name) or p.write_text("[]"))
    assert seen[0].startswith(f".r.json.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".notes.txt", live.name, "r.json"])


def test_make_temp_dir_cleans_a_killed_export(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".exp.{dead}.abcdefgh.tmp").mkdir()
    folder = make_temp_dir(tmp_path, ".exp.")
    assert folder.name.startswith(f".exp.{os.getpid()}.")
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_two_concurrent_writers_do_not_disturb_each_other(tmp_path):
    """Writer B starts (and cleans) while writer A's temporary exists: A's survives."""
    from cellseg.fileio import remove_stale_temps

    def write_a(path):
        path.write_text("A")
        assert remove_stale_temps(tmp_path, again=True) == []  # B's cleanup, A alive
        assert path.exists()

    atomic_write(tmp_path / "a.json", write_a)
    assert (tmp_path / "a.json").read_text() == "A"


# ---- reading JSON
@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 100000, "not valid JSON"),
    (b"1" * 5000, "not valid JSON"),
])
def test_read_json_refuses_in_one_line(tmp_path, content, message):
    from cellseg.errors import DataError
    from cellseg.fileio import read_json

    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_json(path, "results file")
    assert "\n" not in str(err.value) and "x.json" in str(err.value)
