"""Every command x every class of bad input, through the real CLI (typer's CliRunner).

Each case asserts what the README promises: the documented exit code (2 input/data,
3 checkpoint, 4 output exists, 8 output cannot be written), stderr is one line starting
"cellseg: error:" that names the offending file (or option), no traceback, and nothing new or
changed at the output path.

"Unwritable output" uses a path under a regular file (FILE/out): that cannot be created even by
root, where chmod would not stop anything. Cases whose fix lives in another area of the code say
so in their `fixed_by` note; they fail until that fix has landed."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from cellseg.cli import app
from helpers import save_tiny_checkpoint, tiny_spec

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    command: str
    kind: str  # the bad-input class
    argv: tuple[str, ...]  # templates: {ws} = shared workspace, {o} = this case's own folder
    code: int
    names: str  # what the message must name (template)
    out: str  # the output path that must not appear or change (template)
    fixed_by: str = ""  # the area whose fix this case needs, when not the data/eval/io layer

    @property
    def id(self) -> str:
        return f"{self.command}-{self.kind}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Good and bad inputs shared by all cases (read-only for them)."""
    ws = tmp_path_factory.mktemp("matrix")
    res = runner.invoke(app, ["data", "synth", str(ws / "data"), "--n-train", "3", "--n-test", "1",
                              "--size", "64", "--seed", "1"])
    assert res.exit_code == 0, res.output
    spec = tiny_spec(class_names=("class1", "class2", "class3", "class4"), category_ids=(1, 2, 3, 4))
    save_tiny_checkpoint(ws / "model.pt", spec)
    res = runner.invoke(app, ["data", "convert", str(ws / "data"), "--out", str(ws / "gt.json")])
    assert res.exit_code == 0, res.output
    (ws / "image.tif").write_bytes(next((ws / "data" / "test_release").iterdir()).read_bytes())
    (ws / "results.json").write_text("[]")
    (ws / "blocker.txt").write_text("a regular file, so blocker.txt/x cannot be created")
    (ws / "empty.pt").write_bytes(b"")
    (ws / "empty.tif").write_bytes(b"")
    (ws / "empty.json").write_bytes(b"")
    (ws / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    (ws / "garbage.tif").write_bytes(b"II*\x00" + np.random.default_rng(1).bytes(3000))
    (ws / "garbage.json").write_bytes(np.random.default_rng(2).bytes(300))
    (ws / "object.json").write_text(json.dumps({"image_id": 1}))
    (ws / "list.json").write_text(json.dumps([1, 2, 3]))
    (ws / "counts.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5,
                                                 "segmentation": {"size": [64, 64], "counts": "~~garbage~~"}}]))
    (ws / "unknown_id.json").write_text(json.dumps([{"image_id": 999, "category_id": 1, "score": 0.5,
                                                     "bbox": [1, 1, 2, 2]}]))
    (ws / "unsafe.pt").write_bytes(_unsafe_checkpoint())
    (ws / "empty_dir").mkdir()
    _garbage_hw3(ws / "garbage_data")
    _existing_outputs(ws)
    return ws


def _unsafe_checkpoint() -> bytes:
    """A torch zip whose pickle names a global (os.system): weights_only must refuse it."""
    import io

    import torch

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, ("true",))

    buf = io.BytesIO()
    torch.save({"state_dict": {}, "metadata": Payload()}, buf)
    return buf.getvalue()


def _garbage_hw3(root: Path) -> None:
    """An HW3 root whose one image.tif is a TIFF header followed by garbage."""
    sample = root / "train" / "s1"
    sample.mkdir(parents=True)
    (sample / "image.tif").write_bytes(b"II*\x00" + b"\x13" * 200)
    tifffile.imwrite(sample / "class1.tif", np.ones((8, 8), np.uint8))


def _existing_outputs(ws: Path) -> None:
    (ws / "exists.json").write_text('"keep me"')
    for name in ("exists_dir", "exists_run"):
        (ws / name).mkdir()
    (ws / "exists_dir" / "keep.txt").write_text("keep me")
    (ws / "exists_run" / "last.pt").write_text("keep me")


MISSING, EMPTY, GARBAGE, WRONG_JSON = "missing file", "empty file", "garbage bytes", "wrong JSON type"
UNWRITABLE, EXISTS, BAD_NUMBER = "unwritable output", "existing output", "bad number"
TRAIN_FIX = "training (helper B): validate options and the run folder before work"
BENCH_FIX = "bench (helper C): typed errors and exit codes"
EXPORT_FIX = "export/exporter.py (unowned in round 2): check the output folder with fileio.ensure_writable_folder"
MODEL_PATH_FIX = "pipeline.load_predictor: a missing model path is a CheckpointError (3), as in load_checkpoint"
SYNTH_FIX = "data/synth.py (unowned in round 2): check the output folder with fileio.ensure_writable_folder"

T = "--max-iters-per-epoch", "1", "--epochs", "1", "--crop-size", "32"

CASES = [
    # ---- train
    Case("train", MISSING, ("train", "{ws}/nope", "--out", "{o}/run", *T), 2, "nope", "{o}/run"),
    Case("train", EMPTY, ("train", "{ws}/empty_dir", "--out", "{o}/run", *T), 2, "empty_dir", "{o}/run"),
    Case("train", GARBAGE, ("train", "{ws}/garbage_data", "--out", "{o}/run", *T), 2, "image.tif", "{o}/run",
         TRAIN_FIX),
    Case("train", UNWRITABLE, ("train", "{ws}/data", "--out", "{ws}/blocker.txt/run", *T), 8, "blocker.txt",
         "{ws}/blocker.txt/run", TRAIN_FIX),
    Case("train", EXISTS, ("train", "{ws}/data", "--out", "{ws}/exists_run", *T), 4, "exists_run",
         "{ws}/exists_run"),
    Case("train", BAD_NUMBER + " --batch-size 0", ("train", "{ws}/data", "--out", "{o}/run", "--batch-size", "0", *T),
         2, "batch", "{o}/run", TRAIN_FIX),
    Case("train", BAD_NUMBER + " --lr -1", ("train", "{ws}/data", "--out", "{o}/run", "--lr", "-1", *T), 2, "lr",
         "{o}/run", TRAIN_FIX),
    Case("train", BAD_NUMBER + " --epochs 0", ("train", "{ws}/data", "--out", "{o}/run", "--epochs", "0"), 2,
         "epochs", "{o}/run", TRAIN_FIX),
    # ---- infer
    Case("infer", MISSING + " (model)", ("infer", "{ws}/nope.pt", "{ws}/image.tif", "--out", "{o}/r.json"), 3,
         "nope.pt", "{o}/r.json", MODEL_PATH_FIX),
    Case("infer", EMPTY + " (model)", ("infer", "{ws}/empty.pt", "{ws}/image.tif", "--out", "{o}/r.json"), 3,
         "empty.pt", "{o}/r.json"),
    Case("infer", GARBAGE + " (model)", ("infer", "{ws}/garbage.pt", "{ws}/image.tif", "--out", "{o}/r.json"), 3,
         "garbage.pt", "{o}/r.json"),
    Case("infer", MISSING + " (image)", ("infer", "{ws}/model.pt", "{ws}/nope.tif", "--out", "{o}/r.json"), 2,
         "nope.tif", "{o}/r.json"),
    Case("infer", EMPTY + " (image)", ("infer", "{ws}/model.pt", "{ws}/empty.tif", "--out", "{o}/r.json"), 2,
         "empty.tif", "{o}/r.json"),
    Case("infer", GARBAGE + " (image)", ("infer", "{ws}/model.pt", "{ws}/garbage.tif", "--out", "{o}/r.json"), 2,
         "garbage.tif", "{o}/r.json"),
    Case("infer", WRONG_JSON + " (--id-map)", ("infer", "{ws}/model.pt", "{ws}/image.tif", "--out", "{o}/r.json",
                                                "--id-map", "{ws}/object.json"), 2, "object.json", "{o}/r.json"),
    Case("infer", UNWRITABLE, ("infer", "{ws}/model.pt", "{ws}/image.tif", "--out", "{ws}/blocker.txt/r.json"), 8,
         "blocker.txt", "{ws}/blocker.txt/r.json"),
    Case("infer", EXISTS, ("infer", "{ws}/model.pt", "{ws}/image.tif", "--out", "{ws}/exists.json"), 4,
         "exists.json", "{ws}/exists.json"),
    # ---- eval
    Case("eval", MISSING, ("eval", "{ws}/nope.json", "--gt", "{ws}/gt.json", "--json", "{o}/m.json"), 2,
         "nope.json", "{o}/m.json"),
    Case("eval", EMPTY, ("eval", "{ws}/empty.json", "--gt", "{ws}/gt.json", "--json", "{o}/m.json"), 2,
         "empty.json", "{o}/m.json"),
    Case("eval", GARBAGE, ("eval", "{ws}/garbage.json", "--gt", "{ws}/gt.json", "--json", "{o}/m.json"), 2,
         "garbage.json", "{o}/m.json"),
    Case("eval", WRONG_JSON, ("eval", "{ws}/object.json", "--gt", "{ws}/gt.json", "--json", "{o}/m.json"), 2,
         "object.json", "{o}/m.json"),
    Case("eval", WRONG_JSON + " (entries)", ("eval", "{ws}/list.json", "--gt", "{ws}/gt.json"), 2,
         "list.json: result #0", "{o}/m.json"),
    Case("eval", GARBAGE + " (RLE counts)", ("eval", "{ws}/counts.json", "--gt", "{ws}/gt.json"), 2,
         "counts.json: result #0", "{o}/m.json"),
    Case("eval", BAD_NUMBER + " (unknown image id)", ("eval", "{ws}/unknown_id.json", "--gt", "{ws}/gt.json"), 2,
         "unknown_id.json: result #0", "{o}/m.json"),
    Case("eval", MISSING + " (GT)", ("eval", "{ws}/results.json", "--gt", "{ws}/nope.json"), 2, "nope.json",
         "{o}/m.json"),
    Case("eval", GARBAGE + " (GT)", ("eval", "{ws}/results.json", "--gt", "{ws}/garbage.json"), 2,
         "garbage.json", "{o}/m.json"),
    Case("eval", WRONG_JSON + " (GT)", ("eval", "{ws}/results.json", "--gt", "{ws}/list.json"), 2, "list.json",
         "{o}/m.json"),
    Case("eval", UNWRITABLE, ("eval", "{ws}/results.json", "--gt", "{ws}/gt.json", "--json",
                              "{ws}/blocker.txt/m.json"), 8, "blocker.txt", "{ws}/blocker.txt/m.json"),
    Case("eval", EXISTS, ("eval", "{ws}/results.json", "--gt", "{ws}/gt.json", "--json", "{ws}/exists.json"), 4,
         "exists.json", "{ws}/exists.json"),
    # ---- export
    Case("export", MISSING, ("export", "{ws}/nope.pt", "--out", "{o}/exp"), 3, "nope.pt", "{o}/exp"),
    Case("export", EMPTY, ("export", "{ws}/empty.pt", "--out", "{o}/exp"), 3, "empty.pt", "{o}/exp"),
    Case("export", GARBAGE, ("export", "{ws}/garbage.pt", "--out", "{o}/exp"), 3, "garbage.pt", "{o}/exp"),
    Case("export", GARBAGE + " (unsafe pickle)", ("export", "{ws}/unsafe.pt", "--out", "{o}/exp"), 3,
         "unsafe.pt", "{o}/exp"),
    Case("export", UNWRITABLE, ("export", "{ws}/model.pt", "--out", "{ws}/blocker.txt/exp"), 8, "blocker.txt",
         "{ws}/blocker.txt/exp", EXPORT_FIX),
    Case("export", EXISTS, ("export", "{ws}/model.pt", "--out", "{ws}/exists_dir"), 4, "exists_dir",
         "{ws}/exists_dir"),
    Case("export", BAD_NUMBER + " --opset 3", ("export", "{ws}/model.pt", "--out", "{o}/exp", "--opset", "3"), 2,
         "opset", "{o}/exp"),
    # ---- bench
    Case("bench", MISSING + " (model)", ("bench", "{ws}/nope.pt", "--data", "{ws}/data", "--backends", "torch",
                                         "--out", "{o}/rep"), 3, "nope.pt", "{o}/rep", MODEL_PATH_FIX),
    Case("bench", GARBAGE + " (model)", ("bench", "{ws}/garbage.pt", "--data", "{ws}/data", "--backends", "torch",
                                         "--out", "{o}/rep"), 3, "garbage.pt", "{o}/rep", BENCH_FIX),
    Case("bench", MISSING + " (data)", ("bench", "{ws}/model.pt", "--data", "{ws}/nope", "--backends", "torch",
                                        "--out", "{o}/rep"), 2, "nope", "{o}/rep", BENCH_FIX),
    Case("bench", UNWRITABLE, ("bench", "{ws}/model.pt", "--data", "{ws}/data", "--backends", "torch",
                               "--out", "{ws}/blocker.txt/rep"), 8, "blocker.txt", "{ws}/blocker.txt/rep", BENCH_FIX),
    Case("bench", EXISTS, ("bench", "{ws}/model.pt", "--data", "{ws}/data", "--backends", "torch",
                           "--out", "{ws}/exists_dir"), 4, "exists_dir", "{ws}/exists_dir"),
    Case("bench", BAD_NUMBER + " --iters 0", ("bench", "{ws}/model.pt", "--data", "{ws}/data", "--backends", "torch",
                                              "--iters", "0", "--out", "{o}/rep"), 2, "iters", "{o}/rep", BENCH_FIX),
    # ---- data convert
    Case("data convert", MISSING, ("data", "convert", "{ws}/nope", "--out", "{o}/gt.json"), 2, "nope",
         "{o}/gt.json"),
    Case("data convert", EMPTY, ("data", "convert", "{ws}/empty_dir", "--out", "{o}/gt.json"), 2, "empty_dir",
         "{o}/gt.json"),
    Case("data convert", GARBAGE, ("data", "convert", "{ws}/garbage_data", "--out", "{o}/gt.json"), 2,
         "image.tif", "{o}/gt.json"),
    Case("data convert", UNWRITABLE, ("data", "convert", "{ws}/data", "--out", "{ws}/blocker.txt/gt.json"), 8,
         "blocker.txt", "{ws}/blocker.txt/gt.json"),
    Case("data convert", EXISTS, ("data", "convert", "{ws}/data", "--out", "{ws}/exists.json"), 4, "exists.json",
         "{ws}/exists.json"),
    # ---- data synth
    Case("data synth", UNWRITABLE, ("data", "synth", "{ws}/blocker.txt/syn", "--n-train", "1", "--n-test", "0"), 8,
         "blocker.txt", "{ws}/blocker.txt/syn", SYNTH_FIX),
    Case("data synth", EXISTS, ("data", "synth", "{ws}/exists_dir", "--n-train", "1", "--n-test", "0"), 4,
         "exists_dir", "{ws}/exists_dir"),
    Case("data synth", BAD_NUMBER + " --size 0", ("data", "synth", "{o}/syn", "--size", "0"), 2, "size",
         "{o}/syn"),
    Case("data synth", BAD_NUMBER + " --n-train -1", ("data", "synth", "{o}/syn", "--n-train", "-1"), 2, "n_train",
         "{o}/syn"),
]


def _snapshot(path: Path) -> str | None:
    """A digest of what is at `path` (file bytes, or a folder's names and bytes); None if absent."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_case(case: Case, ws: Path, own: Path):
    fill = lambda s: s.format(ws=ws, o=own)  # noqa: E731
    out = Path(fill(case.out))
    before = _snapshot(out)
    result = runner.invoke(app, [fill(a) for a in case.argv])
    return result, out, before, fill(case.names)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path) -> None:
    result, out, before, names = run_case(case, ws, tmp_path)
    output = result.output
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), \
        f"[{case.fixed_by or 'data/io'}] escaped: {result.exception!r}\n{output[-2000:]}"
    stderr = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(stderr) == 1 and stderr[0].startswith("cellseg: error:"), \
        f"[{case.fixed_by or 'data/io'}] stderr is not one error line:\n{result.stderr[-2000:]}"
    assert names in stderr[0], f"message does not name {names!r}: {stderr[0]}"
    assert result.exit_code == case.code, f"[{case.fixed_by or 'data/io'}] exit {result.exit_code}: {stderr[0]}"
    assert _snapshot(out) == before, f"{out} was created or changed"
    assert "weights_only" not in stderr[0] and "file an issue" not in stderr[0]


def test_mask_in_another_format_is_read_not_ignored(ws: Path, tmp_path: Path) -> None:
    """class1.png next to image.tif: its instances are in the converted GT (not silently lost)."""
    from PIL import Image

    root = tmp_path / "hw3" / "train" / "s1"
    root.mkdir(parents=True)
    tifffile.imwrite(root / "image.tif", np.zeros((20, 24, 3), np.uint8), photometric="rgb")
    labels = np.zeros((20, 24), np.uint8)
    labels[2:5, 2:6], labels[10:14, 10:12] = 1, 2
    Image.fromarray(labels).save(root / "class1.png")
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "hw3"), "--out", str(tmp_path / "gt.json")])
    assert result.exit_code == 0, result.output
    gt = json.loads((tmp_path / "gt.json").read_text())
    assert [a["area"] for a in gt["annotations"]] == [12, 8]
    (root / "class2.jpg").write_bytes(b"\xff\xd8 a lossy mask")
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "hw3"), "--out", str(tmp_path / "gt2.json")])
    assert result.exit_code == 2 and "class2.jpg" in result.stderr and "lossless" in result.stderr
