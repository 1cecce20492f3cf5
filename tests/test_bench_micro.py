"""The micro-benchmarks (python -m cellseg.bench.postprocess / .roi_align) run end to end on tiny
inputs and report their outputs equal to the torchvision reference they time against."""
from __future__ import annotations

import json
import subprocess
import sys

from cellseg.bench import postprocess as bench_postprocess
from cellseg.bench import roi_align as bench_roi_align


def test_postprocess_benchmark_reports_identical_rles():
    result = bench_postprocess.main(["--instances", "20", "--size", "128", "--rounds", "1"])
    assert result["n"] == 20 and result["identical"] == 20 and result["cellseg_ms"] > 0


def test_roi_align_benchmark_reports_equal_pooling(capsys):
    result = bench_roi_align.main(["--rois", "60", "--size", "96", "--channels", "8", "--output", "14",
                                   "--rounds", "1"])
    assert result["rois"] == 60 and result["max_abs_diff"] < 1e-5 and result["cellseg_ms"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_roi_align_benchmark_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "cellseg.bench.roi_align", "--rois", "10", "--size", "64",
                           "--channels", "4", "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_diff"] < 1e-5
