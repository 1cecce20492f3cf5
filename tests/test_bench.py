"""cellseg.bench: the harness end to end on a tiny random-init model (plumbing: a random model
detects junk, which is fine), the report files, skipped backends, and the parity gate."""
from __future__ import annotations

import dataclasses

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tifffile
import torch
from rich.console import Console

from cellseg.bench.harness import (check_out_dir, load_bench_data, parity_failures, parity_figures,
                                   replace_dir_atomically, run_bench)
from cellseg.errors import CheckpointError, InputError, OutputExistsError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Two 64x80 HW3 samples (two classes) and a random-init light-model checkpoint."""
    from cellseg.checkpoint import make_metadata, save_checkpoint
    from cellseg.model import LIGHT_ARCH, build_model, spec_from_data

    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    for s in range(2):
        d = root / "data" / "train" / f"sample{s}"
        d.mkdir(parents=True)
        label = np.zeros((64, 80), np.uint16)
        for i in range(5):
            y, x = int(rng.integers(0, 54)), int(rng.integers(0, 70))
            label[y:y + 8, x:x + 8] = i + 1
        tifffile.imwrite(d / "image.tif", (rng.random((64, 80, 3)) * 255).astype(np.uint8))
        tifffile.imwrite(d / "class1.tif", label)
        tifffile.imwrite(d / "class2.tif", (label == 3).astype(np.uint16))
    torch.manual_seed(0)
    spec = spec_from_data(LIGHT_ARCH, ("class1", "class2"), (1, 2), np.full(10, 8.0), 5,
                          box_detections_per_img=20)
    ckpt = save_checkpoint(root / "model.pt", build_model(spec).state_dict(), make_metadata(spec))
    return {"root": root, "data": root / "data", "model": Path(ckpt)}


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_run_bench_tiny_model_writes_report(tiny):
    out = tiny["root"] / "report"
    console = _quiet()
    report = run_bench(tiny["model"], tiny["data"], ["torch", "onnxruntime"], device="cpu", warmup=1,
                       iters=2, out=out, progress=False, console=console)
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "report.json", "report.md"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["failures"] == report["failures"] == []
    rows = {r["name"]: r for r in saved["rows"]}
    assert set(rows) == {"reference", "torch"}
    # A checkpoint runs only on torch: onnxruntime is listed as skipped, with the reason.
    assert [s["backend"] for s in saved["skipped"]] == ["onnxruntime"]
    assert "torch backend" in saved["skipped"][0]["reason"]
    assert saved["data"] == {"source": str(tiny["data"]), "images": 2, "gt_instances": 12,
                             "max_gt_instances_per_image": 6}
    for row in rows.values():
        assert row["timed_runs"] == 4 and len(saved["latencies_ms"][row["name"]]) == 4
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert row["throughput_ips"] == pytest.approx(1000.0 / lat["mean"], rel=1e-6)
        assert row["stages_ms"]["read"] > 0 and row["stages_ms"]["json"] >= 0
        assert sum(row["stages_ms"].values()) == pytest.approx(lat["mean"], rel=0.05)
        assert row["peak_rss_mb"] > 0 and row["artifact_mb"] > 0
        assert set(row["metrics"]) == {"segm", "bbox"} and row["metrics"]["segm"]["max_dets"] >= 100
    assert {"backbone", "rpn", "mask_head", "paste_rle"} <= set(rows["torch"]["stages_ms"])
    assert {"roi_heads", "paste", "threshold_rle"} <= set(rows["reference"]["stages_ms"])
    assert rows["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    # The seed-style pipeline and cellseg's torch backend + shared postprocess agree exactly.
    assert saved["parity_baseline"] == "torch" and rows["torch"]["parity"] is None
    parity = rows["reference"]["parity"]
    assert parity["ref_count"] == rows["torch"]["instances"] > 0
    assert parity["matched_share"] == 1.0 and parity["delta_ap"] == {"segm": 0.0, "bbox": 0.0}
    env = saved["environment"]
    assert env["cpu_cores"] and env["versions"]["torch"] == torch.__version__
    md = (out / "report.md").read_text()
    assert "| reference |" in md and "| torch |" in md and "onnxruntime:" in md
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reference" in console.file.getvalue()

    # An existing report is never overwritten silently; --force replaces it whole.
    with pytest.raises(OutputExistsError):
        run_bench(tiny["model"], tiny["data"], ["torch"], out=out, progress=False, console=_quiet())
    (out / "stale.txt").write_text("old")
    run_bench(tiny["model"], tiny["data"], ["torch"], device="cpu", warmup=0, iters=1, out=out,
              force=True, reference=False, progress=False, console=_quiet(), isolate=False)
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "report.json", "report.md"]
    assert [r["name"] for r in json.loads((out / "report.json").read_text())["rows"]] == ["torch"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.")]


def test_run_bench_fails_when_a_backend_disagrees(tiny, monkeypatch):
    """A backend that loses detections fails the parity gate (the CLI then exits non-zero)."""
    import cellseg.bench.harness as harness
    import cellseg.pipeline as pipeline

    real = pipeline.load_predictor

    def load_predictor(model, backend=None, device="auto", **kw):
        predictor = real(model, "torch", "cpu")
        if backend != "onnxruntime":
            return predictor
        predict = predictor.predict

        def lossy(image, *args, **kwargs):  # drops every other detection
            d = predict(image, *args, **kwargs)
            keep = torch.arange(len(d.scores)) % 2 == 0
            return type(d)(d.boxes[keep], d.scores[keep], d.labels[keep], d.mask_probs[keep])

        predictor.predict = lossy
        predictor.backend_name = "onnxruntime"
        return predictor

    monkeypatch.setattr(pipeline, "load_predictor", load_predictor)
    # The stand-in runs from a checkpoint, which the plan would skip for onnxruntime; the rows run
    # in this process so that the patched loader is the one they call.
    monkeypatch.setattr(harness, "backend_unavailable", lambda model, backend, precision=None: None)
    report = run_bench(tiny["model"], tiny["data"], ["torch", "onnxruntime"], device="cpu", warmup=0,
                       iters=1, reference=False, progress=False, console=_quiet(), isolate=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["onnxruntime"]["parity"]["matched_share"] == pytest.approx(0.5, abs=0.05)
    assert any(f.startswith("onnxruntime: only") and "matched" in f for f in report["failures"])
    assert all("\n" not in f for f in report["failures"])


def test_run_bench_rejects_bad_arguments(tiny):
    with pytest.raises(InputError, match="backends"):
        run_bench(tiny["model"], tiny["data"], ["tensorflow"], progress=False, console=_quiet())
    with pytest.raises(InputError, match="iters"):
        run_bench(tiny["model"], tiny["data"], ["torch"], iters=0, progress=False, console=_quiet())
    with pytest.raises(CheckpointError, match="no such"):  # exit 3, like an unreadable checkpoint
        run_bench(tiny["root"] / "missing.pt", tiny["data"], ["torch"], progress=False, console=_quiet())


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _results(shift: int, n: int = 10) -> list[dict]:
    out = []
    for i in range(n):
        m = np.zeros((60, 60), bool)
        m[5 * i:5 * i + 4, 10 + shift:20 + shift] = True
        out.append({"image_id": 1, "category_id": 1, "segmentation": _rle(m), "score": 0.9 - 0.01 * i})
    return out


def _row(name: str, parity: dict | None, kind: str = "backend") -> dict:
    return {"name": name, "kind": kind, "parity": parity}


def test_parity_gate_on_synthetic_results():
    base = _results(0)
    metrics = {"segm": {"AP": 0.50}, "bbox": {"AP": 0.60}}
    same = parity_figures("torch", base, metrics, base, {"segm": {"AP": 0.50}, "bbox": {"AP": 0.601}})
    assert same["matched_share"] == 1.0 and same["delta_ap"]["bbox"] == pytest.approx(0.001)
    shifted = parity_figures("torch", base, metrics, _results(1), {"segm": {"AP": 0.40}, "bbox": {"AP": 0.60}})
    assert shifted["matched_share"] == 0.0  # 4x10 box shifted 1 px: IoU 36/44 < 0.95
    failures = parity_failures([_row("onnxruntime", same), _row("trt", shifted),
                                _row("reference", shifted, kind="reference"), _row("torch", None)],
                               max_map_drop=0.005)
    assert len(failures) == 2 and all(f.startswith("trt: ") for f in failures)
    assert "segm AP differs from torch by -0.1000" in failures[0]
    assert "0.0% of torch's 10 instances matched" in failures[1]
    # An AP gain beyond the limit is a disagreement too; so is a share just under 99%.
    assert parity_failures([_row("x", {**same, "delta_ap": {"segm": 0.02}})], 0.005)
    assert parity_failures([_row("x", {**same, "matched_share": 0.989})], 0.005)
    assert not parity_failures([_row("x", {**same, "matched_share": 0.99})], 0.005)


def test_report_dir_is_replaced_atomically(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("old report")
    with pytest.raises(OutputExistsError):
        check_out_dir(out, force=False)

    def broken(folder: Path) -> None:
        (folder / "report.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted half way

    with pytest.raises(KeyboardInterrupt):
        replace_dir_atomically(out, broken, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left
    replace_dir_atomically(out, lambda f: (f / "report.json").write_text("{}"), force=True)
    assert [p.name for p in out.iterdir()] == ["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    check_out_dir(tmp_path / "new", force=False)  # absent or empty is fine


def test_bench_data_from_coco_json_with_images_folder(tiny, tmp_path):
    from cellseg.data.coco import hw3_to_coco

    gt = hw3_to_coco(tiny["data"])
    shutil.copytree(tiny["data"] / "train", tmp_path / "images")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    data = load_bench_data(tmp_path / "gt.json")
    assert data.image_ids == (1, 2) and data.instances == 12
    assert data.image_paths[0] == tmp_path / "images" / "sample0" / "image.tif"
    hw3 = load_bench_data(tiny["data"])
    assert hw3.image_paths[1] == tiny["data"] / "train" / "sample1" / "image.tif"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(InputError, match="images"):
        load_bench_data(tmp_path / "elsewhere" / "gt.json")


def test_artifact_files_of_an_export_folder(tmp_path):
    from cellseg.bench.rows import artifact_files
    from cellseg.artifacts import CHECKPOINT_COPY, onnx_paths

    for p in onnx_paths(tmp_path, "fp32").values():
        p.write_bytes(b"x" * 10)
    first = next(iter(onnx_paths(tmp_path, "fp32").values()))
    (tmp_path / (first.name + ".data")).write_bytes(b"y")  # ONNX external data beside its graph
    (tmp_path / CHECKPOINT_COPY).write_bytes(b"z")
    files = artifact_files(tmp_path, "onnxruntime", {})
    assert sorted(files) == sorted([*onnx_paths(tmp_path, "fp32").values(), tmp_path / (first.name + ".data")])
    named = artifact_files(tmp_path, "onnxruntime", {"graphs": {"backbone": first.name}})
    assert named == [first, tmp_path / (first.name + ".data")]
    assert artifact_files(tmp_path, "torch", {}) == [tmp_path / CHECKPOINT_COPY]
    assert artifact_files(tmp_path / CHECKPOINT_COPY, "torch", {}) == [tmp_path / CHECKPOINT_COPY]


def test_reference_row_skipped_without_checkpoint(tiny, tmp_path):
    from cellseg.bench.reference import reference_checkpoint
    from cellseg.errors import BackendUnavailableError

    assert reference_checkpoint(tiny["model"]) == tiny["model"]
    with pytest.raises(BackendUnavailableError, match="model.pt missing"):
        reference_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ faults and exits
def _bench_cli(*args: object):
    from typer.testing import CliRunner

    from cellseg.cli import app

    return CliRunner().invoke(app, ["bench", *map(str, args)])


def _last_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return lines[-1]


def test_cli_killed_row_is_reported_the_others_measured_exit_6(tiny, monkeypatch):
    """The kernel's OOM killer sends SIGKILL: the row's process dies, the run goes on, the
    report is written, and the command ends with one line and exit code 6."""
    from cellseg.bench.rows import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "reference:kill")
    out = tiny["root"] / "killed"
    result = _bench_cli(tiny["model"], "--data", tiny["data"], "--backends", "torch,trt", "--device", "cpu",
                        "--warmup", "0", "--iters", "1", "--out", out)
    assert result.exit_code == 6, result.output
    assert _last_line(result.output).startswith("cellseg: error: bench: 1 failure: reference: out of memory: ")
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["rows_in"] == "one process per row"
    assert [r["name"] for r in report["rows"]] == ["torch"] and report["rows"][0]["instances"] > 0
    assert report["rows"][0]["timed_runs"] == 2 and report["rows"][0]["peak_rss_mb"] > 0
    [failed] = report["failed_rows"]
    assert failed["row"] == "reference" and failed["reason"].startswith("out of memory:")
    assert "SIGKILL" in failed["reason"] and report["failures"] == [f"reference: {failed['reason']}"]
    assert "- reference: out of memory:" in (out / "report.md").read_text()
    # A backend that is simply not installed here is skipped, not a failure.
    assert [s["backend"] for s in report["skipped"]] == (["trt"] if not torch.cuda.is_available() else [])


def test_row_process_hands_back_a_failure_it_raised(tiny, tmp_path):
    """What a row's process writes when the row raises (run here in-process: the same code)."""
    import pickle

    from cellseg.bench.rows import FAULT_ENV, RowFailure, RowPlan, _row_process

    class Counter:
        value = 0

    result = tmp_path / "torch.pickle"
    row = RowPlan("torch", "backend", tiny["model"], "cpu", backend="torch", fault="raise")
    _row_process(row, load_bench_data(tiny["data"]), 0, 1, str(result), Counter())
    outcome = pickle.loads(result.read_bytes())
    assert isinstance(outcome, RowFailure) and outcome.status == "failed"
    assert outcome.reason == f"crashed: RuntimeError: fault injected by {FAULT_ENV}"
    assert [p.name for p in tmp_path.iterdir()] == ["torch.pickle"]  # no temporary file left


def test_a_row_that_raises_in_process_is_reported(tiny, monkeypatch):
    from cellseg.bench.rows import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "torch:raise")
    report = run_bench(tiny["model"], tiny["data"], ["torch"], device="cpu", warmup=0, iters=1,
                       progress=False, console=_quiet(), isolate=False)
    assert [r["name"] for r in report["rows"]] == ["reference"]
    assert report["failed_rows"] == [{"row": "torch", "reason": f"crashed: RuntimeError: fault injected by {FAULT_ENV}",
                                      "error": None}]
    # Without torch the reference is the parity baseline; it has no parity of its own.
    assert report["parity_baseline"] == "reference" and report["rows"][0]["parity"] is None


@pytest.mark.parametrize("content", [b"", b"\x80\x02 not a checkpoint at all", None])
def test_cli_unreadable_model_exits_3_with_a_reason(tiny, tmp_path, content):
    if content is None:  # truncated: the first half of a real checkpoint
        data = tiny["model"].read_bytes()
        content = data[: len(data) // 2]
    model = tmp_path / "bad.pt"
    model.write_bytes(content)
    result = _bench_cli(model, "--data", tiny["data"], "--backends", "torch", "--device", "cpu")
    assert result.exit_code == 3, result.output
    line = _last_line(result.output)
    assert line.startswith("cellseg: error: ") and str(model) in line and len(line) > len("cellseg: error: ") + len(str(model))
    assert not list(tmp_path.glob("*report*"))


def test_cli_export_folder_without_cellseg_json_exits_3(tiny, tmp_path):
    result = _bench_cli(tmp_path, "--data", tiny["data"], "--backends", "torch", "--device", "cpu")
    assert result.exit_code == 3, result.output
    assert "cellseg.json" in _last_line(result.output)


def test_cli_only_unavailable_backends_exit_with_their_reason(tiny):
    from cellseg.pipeline import backend_class

    trt_ok, _ = backend_class("trt").is_available()
    if not trt_ok:  # asked only for a backend whose runtime is missing: 5, its reason
        result = _bench_cli(tiny["model"], "--data", tiny["data"], "--backends", "trt", "--device", "cpu")
        assert result.exit_code == 5, result.output
        assert "no requested backend can run here: trt backend: " in _last_line(result.output)
    # A checkpoint holds nothing onnxruntime can run: bad input (2), said in one line.
    result = _bench_cli(tiny["model"], "--data", tiny["data"], "--backends", "onnxruntime", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "runs only on the torch backend" in _last_line(result.output)
    if not torch.cuda.is_available():
        result = _bench_cli(tiny["model"], "--data", tiny["data"], "--backends", "torch", "--device", "cuda")
        assert result.exit_code == 5 and "CUDA is not available" in _last_line(result.output)


def test_failure_error_picks_the_class_of_what_went_wrong():
    from cellseg.bench.harness import failure_error
    from cellseg.errors import BackendUnavailableError, CheckpointError, VerificationError

    torch_row = {"name": "torch", "kind": "backend"}
    assert failure_error({"failures": [], "rows": [torch_row]}) is None
    gate = failure_error({"failures": ["a: x", "b: y"], "rows": [torch_row], "failed_rows": []})
    assert isinstance(gate, VerificationError)
    assert str(gate) == "bench: 2 failures: a: x (and 1 more, listed above and in the report)"
    corrupt = failure_error({"failures": ["onnxruntime: bad graph"], "rows": [torch_row],
                             "failed_rows": [{"row": "onnxruntime", "reason": "bad graph", "error": "CheckpointError"}]})
    assert isinstance(corrupt, CheckpointError)
    none_ran = failure_error({"failures": ["no backend ran: trt: x"], "rows": [], "failed_rows": [],
                              "skipped": [{"backend": "trt", "reason": "x", "error": "BackendUnavailableError"}]})
    assert isinstance(none_ran, BackendUnavailableError)


def test_death_reasons_name_the_signal():
    import signal

    from cellseg.bench.rows import _death_reason

    assert _death_reason(-signal.SIGKILL).startswith("out of memory: the row's process was killed by SIGKILL")
    assert _death_reason(-signal.SIGSEGV) == "crashed: the row's process was killed by SIGSEGV"
    assert _death_reason(3) == "crashed: the row's process exited with code 3 without a result"


def test_reference_pastes_in_chunks_exactly_as_torchvision_pastes_all(tiny, monkeypatch):
    """The reference row bounds its memory by pasting PASTE_CHUNK masks at a time; the RLEs are
    those of the seed's eager model([image]) with every mask pasted at once."""
    import cellseg.bench.reference as reference
    from cellseg.checkpoint import load_checkpoint
    from cellseg.data.images import read_image
    from cellseg.model import model_from_checkpoint

    monkeypatch.setattr(reference, "PASTE_CHUNK", 3)
    image = read_image(tiny["data"] / "train" / "sample0" / "image.tif")
    pipe = reference.ReferencePipeline(tiny["model"], torch.device("cpu"))
    pipe.spec = dataclasses.replace(pipe.spec, score_floor=0.0, mask_nms_thresh=1.0,
                                    mask_score_decay="none")  # every mask and score, as the seed
    chunked = pipe.predict_coco(image, 7)
    ckpt = load_checkpoint(tiny["model"])
    seed = model_from_checkpoint(ckpt.state_dict, ckpt.spec).eval()
    with torch.no_grad():
        out = seed([torch.from_numpy(image).permute(2, 0, 1).float()])[0]
    masks = (out["masks"] > ckpt.spec.mask_thresh).numpy()
    assert len(chunked) == len(masks) > 3  # more than one chunk
    assert [e["segmentation"] for e in chunked] == [_rle(m[0]) for m in masks]
    assert [e["score"] for e in chunked] == out["scores"].tolist()
    assert pipe.stage_seconds["paste"] > 0 and pipe.stage_seconds["threshold_rle"] > 0


def test_report_names_the_cpu_isa():
    from cellseg.bench.core import cpu_isa, environment_info
    from cellseg.bench.report import machine_line

    flags = "flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile avx_vnni\nflags : none\n"
    assert cpu_isa(flags) == ["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-VNNI", "AMX"]
    assert cpu_isa("flags : sse4_2 avx2 fma\n") == ["AVX2"] and cpu_isa("") == []
    env = environment_info()
    assert isinstance(env["cpu_isa"], list)
    assert "(ISA: " in machine_line(env)
    assert machine_line({"cpu_model": "Xeon", "cpu_isa": ["AVX2", "AVX-512"]}).startswith("Xeon (ISA: AVX2, AVX-512)")


@pytest.mark.parametrize("raised, reason", [
    (MemoryError(), "out of memory: MemoryError"),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 18 GB"),
     "out of memory: RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate 18 GB"),
    (ValueError("bad\nsecond line"), "crashed: ValueError: bad"),
])
def test_attempt_row_says_why_a_row_stopped(monkeypatch, raised, reason):
    import cellseg.bench.rows as rows

    def measure_row(*args, **kwargs):
        raise raised

    monkeypatch.setattr(rows, "measure_row", measure_row)
    outcome = rows.attempt_row(rows.RowPlan("torch", "backend", Path("m.pt"), "cpu", "torch"), None, 0, 1)
    assert isinstance(outcome, rows.RowFailure) and (outcome.status, outcome.reason) == ("failed", reason)
