"""TensorRT engines from the verified dense graphs, with the TensorRT Python API (10.x and 11.x).

- Network: strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED; on 11.x every network is
  strongly typed and the flag is only kept for compatibility). So the precision of an engine is
  the precision written in the ONNX graph: FP32 engines from `g.onnx`, FP16 engines from
  `g.fp16.onnx`. BuilderFlag.FP16/INT8 are never set (gone in 11.x; not allowed with strong
  typing in 10.x). For FP32 engines TF32 is switched off where the flag exists, so they match the
  verified FP32 graphs.
- INT8 engines (`--trt --int8`) come from `g.int8.onnx`: explicit quantization, the graphs' Q/DQ
  nodes (signed INT8, zero point 0, per-channel weight scales on axis 0: the only scheme TensorRT
  accepts) say which tensors are INT8; the layers the exporter left unquantised run in FP32 (TF32
  off, as for FP32 engines). No calibrator and no INT8 builder flag: the scales are in the graph.
- One optimisation profile per engine: images min/opt/max side (padded to size_divisible), RoIs
  1/opt/max for the heads (the backend splits larger RoI batches).
- A timing cache (DIR/timing.trt<version>.sm<cc>.cache) shared by the builds, the workspace memory-pool limit.
- A sidecar JSON per engine (cellseg.artifacts' SIDECAR_FORMAT): TensorRT version, GPU name and
  compute capability, precision, profiles, weights hash; the trt backend checks it before
  deserialising.
Not run on a GPU in this repository's CI: written to the TensorRT 10 / 11 Python API docs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from cellseg.artifacts import (BACKBONE_INPUT, BOX_HEAD_INPUT, EXPORT_JSON, GRAPH_NAMES, MASK_HEAD_INPUT,
                               SIDECAR_FORMAT, Profile, engine_paths, gpu_identity, onnx_paths, read_export_json,
                               sidecar_path)
from cellseg.errors import BackendUnavailableError, CheckpointError, InputError, OutputExistsError
from cellseg.fileio import atomic_write_bytes, atomic_write_json

DEFAULT_WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class BuilderPlan:
    """Version-dependent builder settings, decided without touching a GPU."""

    major: int
    network_flags: int
    network_flag_names: tuple[str, ...]
    set_flags: tuple[str, ...] = ()
    clear_flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise BackendUnavailableError(f"cannot read the TensorRT version {version!r}") from None


def builder_plan(trt: ModuleType, precision: str) -> BuilderPlan:
    """Network-creation flags and builder flags for this TensorRT module and engine precision."""
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"unknown engine precision {precision!r} (fp32, fp16, int8)")
    major = trt_major(trt.__version__)
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old (cellseg builds with 10.x or 11.x)")
    flags, names, notes = 0, [], []
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
        names.append("STRONGLY_TYPED")
    elif major == 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} lacks STRONGLY_TYPED networks")
    else:
        notes.append("TensorRT >= 11: every network is strongly typed")
    clear = []
    if precision in ("fp32", "int8") and hasattr(trt.BuilderFlag, "TF32"):
        clear.append("TF32")  # match the verified FP32 graphs / layers; TF32 keeps only 10 mantissa bits
    if precision == "int8":
        notes.append("precision int8 comes from the graph's Q/DQ nodes (explicit quantization); "
                     "unquantised layers stay FP32")
    else:
        notes.append(f"precision {precision} comes from the ONNX graph's types (no FP16/INT8 builder flags)")
    return BuilderPlan(major, flags, tuple(names), (), tuple(clear), tuple(notes))


def _round_up(n: int, d: int) -> int:
    return -(-int(n) // d) * d


def engine_profiles(spec, channels: int, box_pool: int, mask_pool: int, min_size: int, opt_size: int,
                    max_size: int, max_rois: int, max_batch: int = 1) -> dict[str, Profile]:
    if not 0 < min_size <= opt_size <= max_size:
        raise InputError(f"engine sizes must satisfy 0 < min ({min_size}) <= opt ({opt_size}) <= max ({max_size})")
    d = spec.size_divisible
    lo, mid, hi = (_round_up(s, d) for s in (min_size, opt_size, max_size))
    rois = max_rois if max_rois > 0 else max(spec.rpn_post_nms_top_n_test, spec.box_detections_per_img)
    box_opt = max(1, min(rois, spec.rpn_post_nms_top_n_test))
    mask_opt = max(1, min(rois, max(1, spec.box_detections_per_img // 4)))
    return {
        "backbone": Profile(BACKBONE_INPUT, (1, 3, lo, lo), (1, 3, mid, mid), (max_batch, 3, hi, hi)),
        "box_head": Profile(BOX_HEAD_INPUT, (1, channels, box_pool, box_pool),
                            (box_opt, channels, box_pool, box_pool), (rois, channels, box_pool, box_pool)),
        "mask_head": Profile(MASK_HEAD_INPUT, (1, channels, mask_pool, mask_pool),
                             (mask_opt, channels, mask_pool, mask_pool), (rois, channels, mask_pool, mask_pool)),
    }


def require_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("tensorrt is not installed (pip install tensorrt; needs CUDA)") from None
    return tensorrt


def build_engine(trt: ModuleType, onnx_path: Path, profile: Profile, plan: BuilderPlan, timing_cache: Path,
                 workspace_bytes: int) -> bytes:
    """Parse `onnx_path` into a strongly typed network and build a serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(plan.network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CheckpointError(f"{onnx_path}: TensorRT cannot parse it ({errors[0] if errors else 'no detail'})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile.input, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckpointError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_engines(folder: Path, spec, weights_sha256: str, fp16: bool = False, int8: bool = False,
                  min_size: int = 64, opt_size: int = 512, max_size: int = 2560, max_rois: int = 0, force: bool = False,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, trt: ModuleType | None = None,
                  gpu: tuple[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Build backbone/box_head/mask_head engines (FP32, FP16 with `fp16`, INT8 from the QDQ graphs
    with `int8`) next to their ONNX graphs in `folder`; record them in cellseg.json. `trt`/`gpu`
    are injectable for tests."""
    folder = Path(folder)
    trt = trt or require_tensorrt()
    gpu_name, capability = gpu or gpu_identity()
    info = _export_info(folder, weights_sha256)
    precisions = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 else [])
    _require_graphs(folder, precisions)
    if int8:
        _require_tensorrt_int8_scheme(info, folder)
    profiles = _profiles_from_graphs(folder, spec, min_size, opt_size, max_size, max_rois)
    engines: dict[str, Any] = dict(info.get("engines") or {})
    # A timing cache is only valid for one TensorRT version and GPU: one file per pair.
    cache_path = folder / f"timing.trt{trt.__version__}.sm{capability[0]}{capability[1]}.cache"
    for precision in precisions:
        plan = builder_plan(trt, precision)
        sources, targets = onnx_paths(folder, precision), engine_paths(folder, precision)
        for graph in GRAPH_NAMES:
            engine_path = targets[graph]
            if engine_path.exists() and not force:
                raise OutputExistsError(f"{engine_path}: already exists (pass --force to overwrite)")
            data = build_engine(trt, sources[graph], profiles[graph], plan, cache_path, workspace_bytes)
            sidecar = {"format": SIDECAR_FORMAT, "graph": graph, "precision": precision,
                       "onnx": sources[graph].name, "tensorrt_version": str(trt.__version__),
                       "gpu_name": gpu_name, "compute_capability": list(capability),
                       "profiles": [profiles[graph].to_dict()],
                       "network_flags": list(plan.network_flag_names), "cleared_builder_flags": list(plan.clear_flags),
                       "workspace_bytes": int(workspace_bytes), "weights_sha256": weights_sha256}
            atomic_write_bytes(engine_path, data)
            atomic_write_json(sidecar_path(engine_path), sidecar, indent=1)
            engines[f"{graph}.{precision}"] = {"engine": engine_path.name, "sidecar": sidecar_path(engine_path).name}
    info["engines"] = engines
    atomic_write_json(folder / EXPORT_JSON, info, indent=1)
    return engines


def _export_info(folder: Path, weights_sha256: str) -> dict[str, Any]:
    """The folder's cellseg.json, refused when it records other weights than the checkpoint's."""
    if not (folder / EXPORT_JSON).is_file():
        raise CheckpointError(f"{folder}: no {EXPORT_JSON} (export the ONNX graphs first: --onnx)")
    info = read_export_json(folder)
    if info.get("weights_sha256") != weights_sha256:
        raise CheckpointError(f"{folder / EXPORT_JSON}: graphs come from other weights than this checkpoint")
    return info


def _require_tensorrt_int8_scheme(info: dict[str, Any], folder: Path) -> None:
    """TensorRT takes only signed INT8 with zero point 0; the CPU scheme (uint8 asymmetric
    activations) is refused before any build."""
    settings = ((info.get("verification") or {}).get("int8") or {}).get("settings") or {}
    symmetric = settings.get("activation_type") == "QInt8" and settings.get("activation_symmetric") is True
    if not symmetric:
        raise CheckpointError(f"{folder}: its INT8 graphs use onnxruntime's CPU scheme (uint8 asymmetric activations), "
                              "which TensorRT cannot run; export again with --trt --int8 --calib DATA")


def _require_graphs(folder: Path, precisions: list[str]) -> None:
    missing = [f for p in precisions for f in onnx_paths(folder, p).values() if not f.is_file()]
    if missing:
        flags = "".join(f" --{p}" for p in ("fp16", "int8") if p in precisions)
        calib = " --calib DATA" if "int8" in precisions else ""
        raise CheckpointError(f"{missing[0]}: ONNX graph missing (export with --onnx{flags}{calib})")


def _profiles_from_graphs(folder: Path, spec, min_size: int, opt_size: int, max_size: int,
                          max_rois: int) -> dict[str, Profile]:
    """Engine profiles sized from the FP32 graphs' static channel count and pool sides."""
    import onnx

    graphs = onnx_paths(folder, "fp32")
    backbone = onnx.load(str(graphs["backbone"]), load_external_data=False)
    channels = _static_dim(backbone, 1)
    box_pool, mask_pool = _pool_side(graphs["box_head"]), _pool_side(graphs["mask_head"])
    return engine_profiles(spec, channels, box_pool, mask_pool, min_size, opt_size, max_size, max_rois)


def _static_dim(proto, axis: int, output: int = 0) -> int:
    dim = proto.graph.output[output].type.tensor_type.shape.dim[axis]
    if not dim.HasField("dim_value"):
        raise CheckpointError(f"graph {proto.graph.name}: output dimension {axis} is not static")
    return int(dim.dim_value)


def _pool_side(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[2]
    return int(dim.dim_value)
