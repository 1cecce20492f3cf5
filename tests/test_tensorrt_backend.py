"""TensorRT build/runtime logic on the CPU, with the TensorRT module faked at the module boundary
(profile selection, sidecar checks, version-dependent builder settings for 10.x vs 11.x, RoI
chunking). The real GPU test at the end is skipped without CUDA + TensorRT."""
from __future__ import annotations

import enum
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.artifacts import (SIDECAR_FORMAT, Profile, check_sidecar, read_sidecar, select_profile, sidecar_path,
                               sidecar_profiles)
from cellseg.errors import BackendUnavailableError, CheckpointError, InputError
from cellseg.export.tensorrt_build import build_engines, builder_plan, engine_profiles
from helpers import tiny_spec

torch.set_num_threads(1)


# ------------------------------------------------------------------ fake TensorRT module
def fake_tensorrt(version: str, log: list) -> types.ModuleType:
    """Just enough of the TensorRT Python API for build_engine; 11.x lacks FP16/INT8 flags."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
    flags = {"TF32": 6} if major >= 11 else {"FP16": 0, "INT8": 1, "TF32": 6}
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"CACHE"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            log.append(("pool", pool, size))

        def set_flag(self, flag):
            log.append(("set_flag", flag.name))

        def clear_flag(self, flag):
            log.append(("clear_flag", flag.name))

        def create_timing_cache(self, data):
            log.append(("timing_cache_in", bytes(data)))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            log.append(("profile", profile.shapes))

    class OptProfile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            log.append(("parse", Path(path).name))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_export, tiny_weights_hash) -> tuple[Path, str]:
    """A copy of conftest's session export (engines get built into it) and its weights hash."""
    out = Path(shutil.copytree(tiny_export, tmp_path_factory.mktemp("trt") / "out"))
    return out, tiny_weights_hash


# ------------------------------------------------------------------ builder settings
def test_builder_plan_tensorrt_10_and_11_strongly_typed_without_precision_flags():
    for version in ("10.8.0.43", "11.4.0"):
        trt = fake_tensorrt(version, [])
        for precision in ("fp32", "fp16"):
            plan = builder_plan(trt, precision)
            assert plan.network_flags == 1 << 0 and plan.network_flag_names == ("STRONGLY_TYPED",)
            assert not {"FP16", "INT8"} & set(plan.set_flags)
            assert plan.clear_flags == (("TF32",) if precision == "fp32" else ())


def test_builder_plan_11_without_the_deprecated_flag_and_too_old_versions():
    trt = fake_tensorrt("11.4.0", [])
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"PREFER_JIT_PYTHON_PLUGINS": 3})
    plan = builder_plan(trt, "fp16")
    assert plan.network_flags == 0 and any("strongly typed" in n for n in plan.notes)
    trt10 = fake_tensorrt("10.0.1", [])
    trt10.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0})
    with pytest.raises(BackendUnavailableError, match="STRONGLY_TYPED"):
        builder_plan(trt10, "fp32")
    with pytest.raises(BackendUnavailableError, match="too old"):
        builder_plan(fake_tensorrt("8.6.1", []), "fp32")
    with pytest.raises(InputError, match="precision"):
        builder_plan(fake_tensorrt("10.8.0", []), "int4")


@pytest.mark.parametrize("version", ["10.8.0.43", "11.4.0"])
def test_build_engines_with_fake_tensorrt(export_dir, version):
    folder, digest = export_dir
    log: list = []
    trt = fake_tensorrt(version, log)
    engines = build_engines(folder, tiny_spec(), digest, fp16=True, min_size=60, opt_size=256, max_size=1000,
                            max_rois=0, force=True, workspace_bytes=1 << 30, trt=trt, gpu=("Fake GPU", (9, 0)))
    assert set(engines) == {f"{g}.{p}" for g in ("backbone", "box_head", "mask_head") for p in ("fp32", "fp16")}
    parsed = [e[1] for e in log if e[0] == "parse"]
    assert parsed == ["backbone.onnx", "box_head.onnx", "mask_head.onnx",
                      "backbone.fp16.onnx", "box_head.fp16.onnx", "mask_head.fp16.onnx"]
    assert {e[1] for e in log if e[0] == "network_flags"} == {1}
    assert not [e for e in log if e[0] == "set_flag"]  # never FP16/INT8: precision is in the graph
    assert [e[1] for e in log if e[0] == "clear_flag"] == ["TF32"] * 3  # fp32 engines only
    assert all(e[2] == 1 << 30 for e in log if e[0] == "pool")
    profiles = [e[1] for e in log if e[0] == "profile"]
    assert profiles[0] == ("images", (1, 3, 64, 64), (1, 3, 256, 256), (1, 3, 1024, 1024))  # rounded to /32
    assert profiles[1] == ("box_features", (1, 256, 7, 7), (100, 256, 7, 7), (100, 256, 7, 7))
    assert profiles[2][0] == "mask_features" and profiles[2][3] == (100, 256, 14, 14)
    assert [e[1] for e in log if e[0] == "timing_cache_in"][:2] == [b"", b"CACHE"]  # cache reused
    sidecar = json.loads((folder / "backbone.fp16.json").read_text())
    assert sidecar["tensorrt_version"] == version and sidecar["compute_capability"] == [9, 0]
    assert sidecar["precision"] == "fp16" and sidecar["weights_sha256"] == digest
    assert (folder / "backbone.fp16.engine").read_bytes() == b"ENGINE"
    info = json.loads((folder / "cellseg.json").read_text())
    assert info["engines"]["mask_head.fp32"]["engine"] == "mask_head.fp32.engine"
    from cellseg.artifacts import artifacts_present
    assert artifacts_present(folder)["trt"] == ["fp16", "fp32"]


def test_build_engines_refuses_other_weights_and_parse_errors(export_dir):
    folder, digest = export_dir
    trt = fake_tensorrt("10.8.0", [])
    with pytest.raises(CheckpointError, match="other weights"):
        build_engines(folder, tiny_spec(), "0" * 64, trt=trt, gpu=("g", (8, 0)), force=True)

    class BadParser:
        num_errors = 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return False

        def get_error(self, i):
            return "Unsupported ONNX op Foo"

    trt.OnnxParser = BadParser
    with pytest.raises(CheckpointError, match="cannot parse.*Foo"):
        build_engines(folder, tiny_spec(), digest, trt=trt, gpu=("g", (8, 0)), force=True)


# ------------------------------------------------------------------ runtime pure-Python parts
def test_profile_selection_and_refusal():
    profiles = [Profile("images", (1, 3, 64, 64), (1, 3, 512, 512), (1, 3, 1024, 1024)),
                Profile("images", (1, 3, 1024, 1024), (1, 3, 2048, 2048), (1, 3, 4096, 4096))]
    assert select_profile(profiles, (1, 3, 64, 1024), "trt backbone") == 0
    assert select_profile(profiles, (1, 3, 2048, 1056), "trt backbone") == 1
    with pytest.raises(InputError) as err:
        select_profile(profiles, (1, 3, 32, 64), "trt backbone")
    assert "outside the engine's optimisation profile" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError):
        select_profile(profiles[:1], (2, 3, 64, 64), "trt backbone")  # batch beyond profile


def test_engine_profiles_validate_sizes():
    with pytest.raises(InputError, match="min"):
        engine_profiles(tiny_spec(), 256, 7, 14, min_size=512, opt_size=256, max_size=1024, max_rois=0)
    p = engine_profiles(tiny_spec(), 256, 7, 14, min_size=64, opt_size=512, max_size=2560, max_rois=300)
    assert p["box_head"].max[0] == 300 and p["mask_head"].opt[0] == 12


def test_sidecar_checks():
    sidecar = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.8.0", "compute_capability": [8, 9],
               "gpu_name": "L4", "weights_sha256": "abc"}
    path = Path("backbone.fp16.engine")
    check_sidecar(sidecar, path, "10.8.0", "NVIDIA L4", (8, 9), "abc")
    with pytest.raises(CheckpointError, match="TensorRT 10.8.0, running 11.4.0"):
        check_sidecar(sidecar, path, "11.4.0", "L4", (8, 9), "abc")
    with pytest.raises(CheckpointError, match="compute capability"):
        check_sidecar(sidecar, path, "10.8.0", "H100", (9, 0), "abc")
    with pytest.raises(CheckpointError, match="hash"):
        check_sidecar(sidecar, path, "10.8.0", "L4", (8, 9), "other")
    with pytest.raises(CheckpointError, match="sidecar"):
        check_sidecar({**sidecar, "format": "x"}, path, "10.8.0", "L4", (8, 9), "abc")


@pytest.mark.parametrize("text, words", [
    ("", "unreadable"), ("{not json", "unreadable"), ("\x00\xff\xfe", "unreadable"),
    ("[1, 2]", "not a JSON object"), ('"engine"', "not a JSON object"),
])
def test_damaged_sidecar_is_a_one_line_checkpoint_error(tmp_path, text, words):
    engine = tmp_path / "backbone.fp16.engine"
    sidecar_path(engine).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as err:
        read_sidecar(engine)
    message = str(err.value)
    assert words in message and "backbone.fp16.json" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="missing.fp16.json: engine sidecar unreadable"):
        read_sidecar(tmp_path / "missing.fp16.engine")  # no sidecar at all


@pytest.mark.parametrize("profiles", [None, [], "x", [{"input": "images"}], [{"input": "i", "min": 1, "opt": 2, "max": 3}]])
def test_sidecar_without_valid_profiles_is_refused(profiles):
    sidecar = {"format": SIDECAR_FORMAT} if profiles is None else {"format": SIDECAR_FORMAT, "profiles": profiles}
    with pytest.raises(CheckpointError, match="no valid optimisation profiles"):
        sidecar_profiles(sidecar, Path("box_head.fp32.json"))
    good = {"input": "images", "min": [1, 3, 64, 64], "opt": [1, 3, 128, 128], "max": [1, 3, 256, 256]}
    assert sidecar_profiles({"profiles": [good]}, Path("x.json")) == [Profile.from_dict(good)]
    assert Profile.from_dict(good).to_dict() == good


def test_sidecar_with_malformed_capability_is_refused():
    sidecar = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.8.0", "compute_capability": 89}
    with pytest.raises(CheckpointError, match="compute capability 89"):
        check_sidecar(sidecar, Path("e.engine"), "10.8.0", "L4", (8, 9), None)


def test_head_batches_beyond_profile_are_chunked():
    from cellseg.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend.__new__(TensorRTBackend)  # no GPU: only the chunking logic
    backend._profiles = {"mask_head": [Profile("mask_features", (1, 4, 14, 14), (8, 4, 14, 14), (8, 4, 14, 14))]}
    seen = []

    def fake_execute(graph, x):
        seen.append(x.shape[0])
        assert x.shape[0] <= 8
        return [x[:, :3, :1, :1] * 2]

    backend._execute = fake_execute
    pooled = torch.randn(21, 4, 14, 14)
    out = backend.run_mask_head(pooled)
    assert seen == [8, 8, 5] and torch.equal(out, pooled[:, :3, :1, :1] * 2)


def test_is_available_names_what_is_missing():
    from cellseg.backends.tensorrt_backend import TensorRTBackend

    ok, reason = TensorRTBackend.is_available()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if not has_trt:
        assert not ok and reason.startswith("tensorrt is not installed")
    elif not torch.cuda.is_available():
        assert not ok and reason.startswith("CUDA is not available")
    else:
        assert ok


# ------------------------------------------------------------------ real GPU (skipped here)
@pytest.mark.gpu
def test_trt_engines_match_torch_on_gpu(export_dir):
    from cellseg.backends.tensorrt_backend import TensorRTBackend

    ok, reason = TensorRTBackend.is_available()
    if not ok:
        pytest.skip(reason)
    from cellseg.checkpoint import load_checkpoint
    from cellseg.export.exporter import export_model
    from cellseg.pipeline import load_predictor

    folder, _ = export_dir
    ckpt = folder / "model.pt"
    out = export_model(ckpt, folder.parent / "gpu_out", trt=True, fp16=True, min_size=64, opt_size=128,
                       max_size=256, force=True)
    trt_pred = load_predictor(out, backend="trt", precision="fp32")
    torch_pred = load_predictor(out, backend="torch", device="cuda")
    image = np.random.default_rng(0).random((96, 128, 3), dtype=np.float32)
    a, b = trt_pred.predict(image), torch_pred.predict(image)
    assert a.boxes.shape == b.boxes.shape
    torch.testing.assert_close(a.boxes, b.boxes, atol=1e-2, rtol=0)
    assert load_checkpoint(ckpt).spec == trt_pred.spec
