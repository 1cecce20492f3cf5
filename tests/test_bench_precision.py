"""cellseg.bench rows per backend x precision: `backend:precision` specs, row names, the gate of
reduced-precision rows (ΔAP only, matched share reported) and the fastest row inside the gate."""
from __future__ import annotations

import io
import json
from importlib.util import find_spec

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cellseg.bench.harness import fastest_in_gate, parity_failures, parse_row_spec, run_bench
from cellseg.errors import InputError

HAS_OPENVINO = find_spec("openvino") is not None


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    from cellseg.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("bench_precision") / "data", n_train=1, n_test=1, seed=0, size=64)


def test_precision_rows_end_to_end(tiny_export, bench_data, tmp_path):
    """Each row in its own process (row names with a '/' included); every row gated against torch."""
    specs = ["torch", "onnxruntime", "onnxruntime:fp16", "onnxruntime:int8"] + (["openvino"] if HAS_OPENVINO else [])
    out = tmp_path / "report"
    report = run_bench(tiny_export, bench_data, specs, device="cpu", warmup=0, iters=1, out=out,
                       reference=False, progress=False, console=Console(file=io.StringIO(), width=140))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["torch", "onnxruntime", "onnxruntime/fp16"] + (["openvino"] if HAS_OPENVINO else [])
    # The tiny export has no int8 graphs: that row is skipped with the reason, not failed.
    assert [(s["backend"], "no int8 artifacts for onnxruntime" in s["reason"]) for s in report["skipped"]] == \
        [("onnxruntime/int8", True)]
    half = rows["onnxruntime/fp16"]
    assert (half["backend"], half["precision"]) == ("onnxruntime", "fp16")
    assert half["settings"]["graphs"]["backbone"] == "backbone.fp16.onnx"
    assert all(p.endswith(".fp16.onnx") for p in half["artifacts"])
    assert (rows["onnxruntime"]["precision"], rows["torch"]["precision"]) == ("fp32", "fp32")
    assert rows["onnxruntime"]["speedup_vs_onnxruntime_fp32"] == pytest.approx(1.0)
    assert half["speedup_vs_onnxruntime_fp32"] > 0 and half["parity"]["baseline"] == "torch"
    fp32_rows = [n for n in rows if rows[n]["precision"] == "fp32"]
    assert not [f for f in report["failures"] if f.split(":")[0] in fp32_rows]  # FP32 rows agree with torch
    best = report["fastest_in_gate"]
    assert best["row"] in rows and best["mean_ms"] == min(
        rows[n]["latency_ms"]["mean"] for n in rows if not any(f.startswith(n + ":") for f in report["failures"]))
    saved = json.loads((out / "report.json").read_text())
    assert saved["fastest_in_gate"] == best and saved["settings"]["max_map_drop_reduced"] == 0.01
    md = (out / "report.md").read_text()
    assert "| onnxruntime/fp16 |" in md and "Fastest row inside the gate" in md and best["row"] in md
    assert "× ort" in md and "(ISA: " in md


def _row(name: str, precision: str, mean_ms: float, delta: float, share: float) -> dict:
    parity = {"baseline": "torch", "delta_ap": {"segm": delta, "bbox": 0.0}, "matched_share": share,
              "ref_count": 100, "match_iou": 0.95}
    return {"name": name, "kind": "backend", "precision": precision, "timed_runs": 3,
            "latency_ms": {"mean": mean_ms}, "parity": parity, "speedup_vs_reference": None}


def test_reduced_precision_rows_are_gated_on_delta_ap_only():
    rows = [{"name": "torch", "kind": "backend", "precision": "fp32", "timed_runs": 3, "latency_ms": {"mean": 900.0},
             "parity": None, "speedup_vs_reference": 1.0},
            _row("onnxruntime", "fp32", 600.0, 0.0, 1.0),
            _row("openvino/int8", "int8", 200.0, -0.008, 0.60),  # passes: |ΔAP| <= 0.01, share not gated
            _row("onnxruntime/int8", "int8", 150.0, -0.02, 0.90),  # fastest, but beyond the ΔAP gate
            _row("openvino", "fp32", 500.0, 0.0, 0.95)]  # FP32 row with 95% matched: fails
    failures = parity_failures(rows, 0.005, 0.99, 0.01)
    assert [f.split(":")[0] for f in failures] == ["onnxruntime/int8", "openvino"]
    assert "allowed ±0.01" in failures[0] and "95.0%" in failures[1]
    best = fastest_in_gate(rows, "torch", 0.005, 0.99, 0.01)
    assert best["row"] == "openvino/int8" and best["mean_ms"] == 200.0 and best["matched_share"] == 0.60
    assert fastest_in_gate(rows, "torch", 0.005, 0.99, 0.001)["row"] == "onnxruntime"
    assert fastest_in_gate([rows[3]], "torch", 0.005, 0.99, 0.01) is None


def test_row_specs_and_bad_precisions(tiny_export, bench_data):
    assert parse_row_spec("openvino:int8") == ("openvino", "int8")
    assert parse_row_spec(" torch ") == ("torch", None)
    with pytest.raises(InputError, match="unknown precision"):
        run_bench(tiny_export, bench_data, ["onnxruntime:int4"], progress=False)
    with pytest.raises(InputError, match="backends"):
        run_bench(tiny_export, bench_data, ["tensorflow:fp32"], progress=False)


def test_cli_bad_precision_exits_2_in_one_line(tiny_export, bench_data):
    from cellseg.cli import app

    res = CliRunner().invoke(app, ["bench", str(tiny_export), "--data", str(bench_data),
                                   "--backends", "torch,openvino:bf3"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bf3" in lines[0] and lines[0].startswith("cellseg: error:")
