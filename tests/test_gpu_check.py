"""cellseg.bench.gpu_check on the CPU: the --allow-cpu dry run end to end (tiny random-init
model, tiny synthetic data) writes every report section; without CUDA and without --allow-cpu
it stops at once with one line; the FP16-weights copy; the gates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.bench.gpu_check import check_failures, main, tile_to_size, write_half_checkpoint

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """Random-init light model with tiny heads and few proposals/detections (fast on one core)."""
    from cellseg.checkpoint import make_metadata, save_checkpoint
    from cellseg.data.synth import CLASS_NAMES
    from cellseg.model import LIGHT_ARCH, build_model, spec_from_data

    torch.manual_seed(0)
    spec = spec_from_data(LIGHT_ARCH, CLASS_NAMES, (1, 2, 3, 4), np.full(10, 8.0), 5,
                          box_detections_per_img=20, rpn_pre_nms_top_n_test=60,
                          rpn_post_nms_top_n_test=60, box_head_dim=32, mask_head_channels=(8,))
    root = tmp_path_factory.mktemp("gpu_check")
    return save_checkpoint(root / "model.pt", build_model(spec).state_dict(), make_metadata(spec))


def test_allow_cpu_dry_run_writes_every_section(tiny_model, tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = main(["--allow-cpu", "--model", str(tiny_model), "--out", str(out),
               "--synth-size", "128", "--synth-images", "2", "--latency-size", "128",
               "--runs", "2", "--warmup", "1", "--cpu-runs", "1",
               "--paste-instances", "30,100", "--paste-size", "128", "--paste-repeats", "1"])
    report = json.loads(out.read_text())
    assert {"environment", "model", "data", "settings", "reference", "precisions", "postprocess",
            "failures", "dry_run"} <= set(report)
    env = report["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["torchvision"]
    assert report["data"]["synthetic"] and report["data"]["images"] == 2
    assert report["data"]["sizes_hw"][0] == [128, 128] and report["data"]["gt_instances"] > 0
    assert report["model"] == {"source": str(tiny_model), "random_init": False}
    assert report["latency_image_hw"] == [128, 128]
    ref = report["reference"]
    assert ref["runs"] == 1 and set(ref["metrics"]) == {"segm", "bbox"} and ref["instances"] > 0
    assert [p["instances"] for p in report["postprocess"]] == [30, 100]
    for p in report["postprocess"]:
        assert p["all_identical"] and p["identical"] == p["rles_cpu"] == p["rles_device"] == p["instances"]
        assert p["differing_pixels"] == 0 and p["cpu_ms"] > 0 and p["device_ms"] > 0
    fp32 = report["precisions"]["fp32"]
    assert fp32["runs"] == 2 and fp32["latency_ms"]["p50"] <= fp32["latency_ms"]["p90"]
    assert {"backbone", "rpn", "mask_head", "paste_rle"} <= set(fp32["stages_ms"])
    assert set(fp32["delta_ap"]) == {"segm", "bbox"} and fp32["parity"]["ref_count"] == ref["instances"]
    printed = capsys.readouterr().out
    assert "paste_and_encode" in printed and str(out) in printed
    if CUDA:  # run on a GPU machine: a real check, figures vary
        assert not report["dry_run"] and env["gpu_details"]["name"]
        assert rc in (0, 6) and "peak_cuda_mb" in report["precisions"]["fp16"]
        return
    assert rc == 0 and report["failures"] == []
    assert report["dry_run"] and env["device"] == "cpu" and env["gpu_details"] is None
    # The same CPU computed twice: identical results.
    assert fp32["device"] == "cpu" and fp32["delta_ap"] == {"segm": 0.0, "bbox": 0.0}
    assert fp32["parity"]["matched_share"] == 1.0 and fp32["parity"]["max_score_diff"] == 0.0
    assert fp32["peak_cuda_mb"] is None
    assert report["precisions"]["fp16"]["skipped"].startswith("torch backend: FP16 autocast needs CUDA")


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_without_cuda_exits_with_one_line(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cellseg.bench.gpu_check", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 5
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CUDA is not available: ")
    assert "--allow-cpu" in lines[0] and proc.stdout == "" and not out.exists()


def test_half_copy_halves_weights_and_still_loads(tiny_model, tmp_path):
    from cellseg.checkpoint import load_checkpoint
    from cellseg.model import model_from_checkpoint

    dst = write_half_checkpoint(tiny_model, tmp_path / "half.pt")
    half, full = load_checkpoint(dst), load_checkpoint(tiny_model)
    assert dst.stat().st_size < 0.6 * Path(tiny_model).stat().st_size
    assert all(v.dtype == torch.float16 for v in half.state_dict.values() if v.is_floating_point())
    assert half.spec == full.spec and half.metadata["training"]["weights_stored_as"] == "float16"
    model = model_from_checkpoint(half.state_dict, half.spec)
    name, weight = next((k, v) for k, v in model.state_dict().items() if v.is_floating_point())
    assert weight.dtype == torch.float32
    assert torch.equal(weight, full.state_dict[name].half().float())
    with pytest.raises(Exception, match="already exists"):
        write_half_checkpoint(tiny_model, dst)


def test_tile_to_size_wraps_and_crops():
    image = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    tiled = tile_to_size(image, 5)
    assert tiled.shape == (5, 5, 3) and tiled.flags["C_CONTIGUOUS"]
    assert np.array_equal(tiled[2:4, 3:5], image[:, :2]) and np.array_equal(tile_to_size(image, 1), image[:1, :1])


def _report(delta: float, share: float, random_init: bool, identical: bool) -> dict:
    parity = {"matched_share": share}
    return {"model": {"random_init": random_init},
            "precisions": {"fp32": {"device": "cuda", "delta_ap": {"segm": delta, "bbox": 0.0}, "parity": parity},
                           "fp16": {"device": "cuda", "delta_ap": {"segm": 0.5, "bbox": 0.5}, "parity": {"matched_share": 0.1}}},
            "postprocess": [{"instances": 3, "identical": 3 if identical else 2, "rles_cpu": 3,
                             "device": "cuda", "all_identical": identical, "differing_pixels": 0 if identical else 4}]}


def test_gates_fp32_parity_and_paste_identity_only():
    assert check_failures(_report(0.001, 1.0, False, True), 0.005, 0.99) == []
    failed = check_failures(_report(-0.01, 0.9, False, False), 0.005, 0.99)
    assert len(failed) == 3 and failed[0].startswith("fp32 on cuda: segm AP differs from the CPU by -0.0100")
    assert "90.0%" in failed[1] and "2/3 RLEs identical" in failed[2] and "4 pixels differ" in failed[2]
    # random init: parity is informative only; the paste gate still applies
    assert check_failures(_report(-0.01, 0.9, True, True), 0.005, 0.99) == []


def test_random_init_model_is_sized_from_the_data(tmp_path):
    from cellseg.bench.gpu_check import prepare_data, prepare_model
    from cellseg.checkpoint import load_checkpoint
    from cellseg.evaluate import gt_instances_per_image

    bench, info = prepare_data(None, tmp_path, 96, 3, 0, max_images=2)
    assert info["images"] == 2 and info["images_available"] == 3 and len(bench.image_paths) == 2
    assert {a["image_id"] for a in bench.gt["annotations"]} <= set(bench.image_ids)
    path, model_info = prepare_model(None, bench, tmp_path, "maskrcnn_resnet18_fpn", 0)
    spec = load_checkpoint(path).spec
    assert model_info["random_init"] and model_info["source"] is None
    assert spec.class_names == ("class1", "class2", "class3", "class4")
    assert spec.box_detections_per_img == max(1000, 2 * max(gt_instances_per_image(bench.gt).values()))


def test_failed_gates_exit_with_the_verification_code(monkeypatch, tmp_path, capsys):
    """main's exit codes are the cellseg error classes' own: a failed gate is a VerificationError."""
    import cellseg.bench.gpu_check as gpu_check
    from cellseg.errors import VerificationError

    monkeypatch.setattr(gpu_check, "choose_device", lambda allow_cpu: "cpu")
    monkeypatch.setattr(gpu_check, "run_gpu_check", lambda cfg, console=None: {"failures": ["fp32 on cpu: x", "y"]})
    monkeypatch.setattr(gpu_check, "print_report", lambda report, out=None: None)
    assert main(["--allow-cpu", "--out", str(tmp_path / "check.json")]) == VerificationError.exit_code
    assert capsys.readouterr().err.strip().splitlines() == ["2 gate(s) failed: fp32 on cpu: x; y"]
