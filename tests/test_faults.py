"""kill -9 at random points: train, export and infer run as subprocesses (`python -m cellseg`)
and are killed with SIGKILL after a delay drawn from a seeded RNG. Then:
- no partial final output: each final file is absent or complete (loads / parses);
- a clean `--resume` (train) or re-run (export, infer) succeeds;
- no temporary file or folder is left once that next run is done.
The default run has one fast case (infer); the full sweep is marked slow."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import save_tiny_checkpoint, tiny_spec

SEED = 13
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cellseg(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "cellseg", *map(str, args)]


def run_ok(cmd: list[str], timeout: float = 600) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}"


def kill_after(cmd: list[str], delay: float) -> bool:
    """Start `cmd`, SIGKILL it after `delay` s; True when it was killed, False if it finished."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        proc.wait(timeout=delay)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed before the kill ({proc.returncode})"
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def leftovers(*folders: Path) -> list[str]:
    """Temporary files or folders (any name ending in .tmp, or an aside-moved .old) in folders."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found += [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".old" in p.name]
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    ws = tmp_path_factory.mktemp("faults")
    run_ok(cellseg("data", "synth", ws / "data", "--n-train", "4", "--n-test", "3", "--size", "64", "--seed", "2"))
    spec = tiny_spec(class_names=("class1", "class2", "class3", "class4"), category_ids=(1, 2, 3, 4))
    return {"data": ws / "data", "model": save_tiny_checkpoint(ws / "model.pt", spec)}


def _time(cmd: list[str]) -> float:
    start = time.monotonic()
    run_ok(cmd)
    return time.monotonic() - start


def _delays(rng: random.Random, full: float, n: int) -> list[float]:
    """n kill points spread over a run that takes `full` seconds (the last part is where the
    outputs are written, so half of the points land in its second half)."""
    return sorted(rng.uniform(0.3, full * 1.05) for _ in range(n))


# --------------------------------------------------------------------------------- infer
def check_infer_killed_and_rerun(inputs, folder: Path, delay: float) -> None:
    out = folder / "r.json"
    cmd = cellseg("infer", inputs["model"], inputs["data"] / "test_release", "--out", out, "--quiet")
    kill_after(cmd, delay)
    if out.exists():  # complete or absent, never half-written
        assert isinstance(json.loads(out.read_text()), list)
    run_ok(cmd + ["--force"])
    assert isinstance(json.loads(out.read_text()), list)
    assert leftovers(folder) == []


# Each write streams 40 chunks with a pause between them, so a kill nearly always lands while a
# temporary is open, however fast the machine's disk.
WRITER = """
import sys, time
from cellseg.fileio import atomic_write

def write_slowly(path, byte):
    with open(path, "wb") as f:
        for _ in range(40):
            f.write(byte * 100_000)
            f.flush()
            time.sleep(0.002)

for i in range(10**6):  # writes in a loop until killed
    atomic_write(sys.argv[1], lambda p: write_slowly(p, bytes([i % 256])))
"""


def test_killed_writer_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    """The fast variant: a process that only writes atomically (no torch import, so it starts in
    a fraction of a second) is killed mid-write at seeded random points; the final file is
    always whole, and the next write by another process removes the dead writer's temporary."""
    from cellseg.fileio import atomic_write_bytes

    rng = random.Random(SEED)
    out = tmp_path / "big.bin"
    killed_mid_write = 0
    for _ in range(20):  # until two kills have landed mid-write (how often depends on the load)
        if killed_mid_write >= 2:
            break
        out.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env=ENV)
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:  # started writing (slow when loaded)
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid_write += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        if out.exists():
            data = out.read_bytes()
            assert len(data) == 4_000_000 and data.count(data[:1]) == len(data), "partial final output"
        atomic_write_bytes(out, b"next run")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"], "temporaries left"
        from cellseg import fileio
        fileio._cleaned_folders.clear()  # each loop stands for a new process
    assert killed_mid_write, "no kill landed during a write: the test checked nothing"


@pytest.mark.slow
def test_infer_killed_at_random_points(inputs, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    full = _time(cellseg("infer", inputs["model"], inputs["data"] / "test_release", "--out", tmp_path / "t.json",
                         "--quiet"))
    for i, delay in enumerate(_delays(rng, full, 5)):
        check_infer_killed_and_rerun(inputs, tmp_path / f"k{i}", delay)


# -------------------------------------------------------------------------------- export
@pytest.mark.slow
def test_export_killed_at_random_points(inputs, tmp_path: Path) -> None:
    from cellseg.errors import CellsegError

    rng = random.Random(SEED + 2)
    full = _time(cellseg("export", inputs["model"], "--out", tmp_path / "first"))
    for i, delay in enumerate(_delays(rng, full, 4)):
        folder = tmp_path / f"k{i}"
        folder.mkdir()
        out = folder / "exp"
        kill_after(cellseg("export", inputs["model"], "--out", out), delay)
        if out.exists():  # the folder appears only complete, with its description
            info = json.loads((out / "cellseg.json").read_text())
            assert all((out / f).is_file() for f in info["graphs"]["fp32"].values())
        run_ok(cellseg("export", inputs["model"], "--out", out, "--force"))
        assert leftovers(folder) == [], "a killed export left temporaries"
        try:
            from cellseg.pipeline import load_predictor
            load_predictor(out, backend="onnxruntime", device="cpu")
        except CellsegError as err:  # onnxruntime absent here: the folder itself was checked above
            assert "onnxruntime" in str(err)


# --------------------------------------------------------------------------------- train
@pytest.mark.slow
def test_train_killed_at_random_points_then_resumed(inputs, tmp_path: Path) -> None:
    from cellseg.checkpoint import load_checkpoint

    rng = random.Random(SEED + 3)
    args = ("--epochs", "3", "--max-iters-per-epoch", "2", "--crop-size", "48", "--val-fraction", "0.25",
            "--set", "box_detections_per_img=20")
    full = _time(cellseg("train", inputs["data"], "--out", tmp_path / "first", *args))
    for i, delay in enumerate(_delays(rng, full, 4)):
        run = tmp_path / f"k{i}"
        kill_after(cellseg("train", inputs["data"], "--out", run, *args), delay)
        if (run / "last.pt").exists():
            load_checkpoint(run / "last.pt")  # complete: it loads
            run_ok(cellseg("train", inputs["data"], "--out", run, "--resume", *args))
        else:
            run_ok(cellseg("train", inputs["data"], "--out", run, *args))
        assert load_checkpoint(run / "last.pt").train_state["epoch"] >= 2
        assert (run / "best.pt").is_file()
        assert leftovers(run) == [], "a killed run left temporaries after the resumed one"
