"""`cellseg infer --engine ray`: the same bytes as a local run (also with a worker killed mid-run
and after a resume), one-line errors, and no Ray import without the engine.

One Ray session serves the whole module (starting Ray takes many seconds); the engine uses a
session that is already running and leaves it running. The runs on Ray are marked slow (Ray
starts an actor process per worker, each loading its predictor: a minute or more on 2 cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import error_line, invoke

SETTINGS = ["--backend", "onnxruntime", "--tile", "128", "--overlap", "32", "--device", "cpu", "--quiet",
            "--score-thresh", "0.05"]


@pytest.fixture(scope="module")
def ray_session():
    pytest.importorskip("ray.data")
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of four images: a 320 px synthetic slide (9 tiles of 128 px) and three crops of it."""
    out = tmp_path_factory.mktemp("ray_images")
    res = invoke("data", "synth", out / "synth", "--slide", 320, "--seed", 2)
    assert res.exit_code == 0, res.output
    pixels = tifffile.imread(out / "synth" / "slide.tif")
    folder = out / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a_slide.tif", pixels)
    for k, (y, x) in enumerate([(0, 0), (100, 180), (200, 40)]):
        Image.fromarray(np.ascontiguousarray(pixels[y:y + 96, x:x + 120])).save(folder / f"crop{k}.png")
    return folder


@pytest.fixture(scope="module")
def local_run(tiny_export, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "r.json"
    res = invoke("infer", tiny_export, images, "--out", out, "--format", "coco,geojson", *SETTINGS)
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    assert results and {r["image_id"] for r in results} == {1, 2, 3, 4}
    return out


def same_outputs(local: Path, other: Path) -> None:
    assert other.read_bytes() == local.read_bytes()
    for g in sorted(local.parent.glob("*.geojson")):
        assert (other.parent / g.name).read_bytes() == g.read_bytes()
    assert not list(other.parent.glob(".*"))  # no temp file, no work folder left


@pytest.mark.slow
def test_two_workers_write_what_a_local_run_writes(ray_session, tiny_export, images, local_run, tmp_path):
    out = tmp_path / "r.json"
    res = invoke("infer", tiny_export, images, "--out", out, "--format", "coco,geojson", *SETTINGS,
                 "--engine", "ray", "--workers", 2)
    assert res.exit_code == 0, res.output
    same_outputs(local_run, out)


@pytest.mark.slow
def test_a_killed_worker_loses_and_repeats_nothing(ray_session, tiny_export, images, local_run, tmp_path,
                                                  monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("CELLSEG_RAY_TEST_KILL", f"1:{marker}")
    out = tmp_path / "out" / "r.json"
    res = invoke("infer", tiny_export, images, "--out", out, "--format", "coco,geojson", *SETTINGS,
                 "--engine", "ray", "--workers", 2)
    assert res.exit_code == 0, res.output
    assert marker.is_file()  # a worker did die after its first image
    same_outputs(local_run, out)


@pytest.mark.slow
def test_resume_sends_only_unfinished_images(ray_session, tiny_export, images, local_run, tmp_path, monkeypatch):
    from cellseg import ray_engine

    out = tmp_path / "r.json"
    real = ray_engine.RemoteResults.for_image

    def interrupted_at_third(self, index, tile_plan):
        if index == 2:
            raise KeyboardInterrupt
        return real(self, index, tile_plan)

    monkeypatch.setattr(ray_engine.RemoteResults, "for_image", interrupted_at_third)
    res = invoke("infer", tiny_export, images, "--out", out, *SETTINGS, "--engine", "ray")
    assert res.exit_code == 130 and not out.exists()
    monkeypatch.setattr(ray_engine.RemoteResults, "for_image", real)
    sent = []
    real_run = ray_engine.images_to_run
    monkeypatch.setattr(ray_engine, "images_to_run", lambda *a: sent.extend(real_run(*a)) or sent)
    res = invoke("infer", tiny_export, images, "--out", out, *SETTINGS, "--engine", "ray", "--resume")
    assert res.exit_code == 0, res.output
    assert sent == [2, 3]
    assert out.read_bytes() == local_run.read_bytes()


@pytest.mark.slow
def test_a_bad_image_fails_as_in_a_local_run(ray_session, tiny_export, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "crop1.png").write_bytes(b"not a png")
    local = invoke("infer", tiny_export, folder, "--out", tmp_path / "local.json", *SETTINGS)
    remote = invoke("infer", tiny_export, folder, "--out", tmp_path / "ray.json", *SETTINGS, "--engine", "ray")
    assert local.exit_code == remote.exit_code == 2
    assert error_line(remote) == error_line(local) and "crop1.png" in error_line(remote)
    assert not (tmp_path / "ray.json").exists()


def test_worker_threads_share_the_cores(tiny_export):
    from cellseg.infer import InferSettings
    from cellseg.ray_engine import WorkerSpec, load_worker_predictor

    import torch

    before = torch.get_num_threads()
    try:
        predictor = load_worker_predictor(WorkerSpec(str(tiny_export), "onnxruntime", "cpu", 1, None, InferSettings()))
        assert predictor.backend.settings["intra_op_num_threads"] == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("options, words", [
    (["--engine", "spark"], "--engine 'spark': choose one of local, ray"),
    (["--workers", "2"], "--workers and --address need --engine ray"),
    (["--engine", "ray", "--workers", "0"], "--workers 0: must be at least 1"),
])
def test_bad_engine_options(tiny_export, images, tmp_path, options, words):
    res = invoke("infer", tiny_export, images, "--out", tmp_path / "r.json", *options)
    assert res.exit_code == 2
    assert error_line(res) == f"cellseg: error: {words}"
    assert not list(tmp_path.iterdir())


def test_without_the_engine_ray_is_never_imported(tiny_checkpoint, images, tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom cellseg.cli import app\n"
            f"res = CliRunner().invoke(app, ['infer', {str(tiny_checkpoint)!r}, {str(images / 'crop0.png')!r}, "
            f"'--out', {str(tmp_path / 'r.json')!r}, '--device', 'cpu', '--quiet'])\n"
            "assert res.exit_code == 0, res.output\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "r.json").is_file()
