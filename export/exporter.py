"""`cellseg export`: checkpoint -> export folder, in the layout of cellseg.artifacts.

The FP32 dense graphs are verified against PyTorch, FP16 ones (--fp16) within the FP16
tolerance; model.onnx is the end-to-end graph; --int8 adds QDQ INT8 graphs calibrated on real
images and verified by ΔAP on held-out ones (cellseg.export.int8); --trt adds engines and their sidecars.

ONNX files are written into a temporary sibling folder and renamed into place only after every
graph verified, so a failed export leaves nothing half-written. Engines are built afterwards from
the verified graphs; when TensorRT or CUDA is missing that step fails alone, ONNX files intact."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cellseg.errors import BackendUnavailableError, InputError, OutputExistsError, VerificationError

try:
    import onnx
except ImportError:  # the export stage needs the cpu or gpu extra
    raise BackendUnavailableError("onnx is not installed (pip install 'cellseg[cpu]' or 'cellseg[gpu]')") from None

from cellseg.artifacts import (CHECKPOINT_COPY, END_TO_END_ONNX, EXPORT_FORMAT, EXPORT_JSON, GRAPH_NAMES,
                               METADATA_KEY, onnx_metadata, onnx_paths)
from cellseg.export.fp16 import convert_to_fp16
from cellseg.export.int8 import (DEFAULT_CALIB_IMAGES, DEFAULT_HOLDOUT_IMAGES, DEFAULT_MAX_MAP_DROP, DataImages,
                                 QuantSettings, calibrate_and_quantize, check_map_drop, open_data, progress_bars,
                                 split_images, verify_int8)
from cellseg.export.onnx_graphs import example_inputs, export_graph
from cellseg.export.verify import (END_TO_END_MASK_TOLERANCE, END_TO_END_TOLERANCE, FP16_TOLERANCE,
                                   FP32_TOLERANCE, OnnxRunner, check_graph, relative_error, summarise,
                                   verification_images, verification_inputs)
from cellseg.fileio import atomic_write_json, ensure_writable_folder, make_temp_dir
from cellseg.graphs import graph_io, graph_modules


def _set_metadata(proto: onnx.ModelProto, text: str) -> onnx.ModelProto:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: text})
    return proto


def _slim_if_equal(graph: str, proto: onnx.ModelProto, module, cases, outputs) -> tuple[onnx.ModelProto, str]:
    """onnxslim's result when it still verifies against PyTorch and agrees with the unslimmed graph."""
    try:
        import onnxslim

        slim = onnxslim.slim(proto)
        onnx.checker.check_model(slim)
        check_graph(graph, module, OnnxRunner(slim.SerializeToString()), cases, outputs, FP32_TOLERANCE)
        raw_runner, slim_runner = OnnxRunner(proto.SerializeToString()), OnnxRunner(slim.SerializeToString())
        for _, x in cases:
            for a, b in zip(raw_runner(x.numpy()), slim_runner(x.numpy())):
                if not relative_error(b, a) <= FP32_TOLERANCE:
                    return proto, "kept unslimmed: onnxslim changed outputs"
        return slim, "onnxslim"
    except ImportError:
        return proto, "kept unslimmed: onnxslim not installed"
    except VerificationError as err:
        return proto, f"kept unslimmed: {err}"
    except Exception as err:  # a slimmer bug must not fail the export: the raw graph is verified
        return proto, f"kept unslimmed: onnxslim failed ({type(err).__name__})"


def write_onnx_graphs(model, spec, metadata: dict[str, Any], digest: str, folder: Path, opset: int,
                      fp16: bool) -> dict[str, Any]:
    """Export, check, slim and verify the three graphs (and FP16 variants) into `folder`."""
    io = graph_io(model, spec.size_divisible)
    modules = graph_modules(model)
    examples = example_inputs(model, spec.size_divisible)
    cases = verification_inputs(model, spec)
    report: dict[str, Any] = {"fp32": {}, "fp16": {}, "slim": {}}
    fp32_results, fp16_results = [], []
    for graph in GRAPH_NAMES:
        raw_path = folder / f"{graph}.raw.onnx"
        export_graph(modules[graph], examples[graph], io[graph], graph, raw_path, opset)
        proto = onnx.load(str(raw_path))
        raw_path.unlink()
        onnx.checker.check_model(proto)
        fp32_results += check_graph(graph, modules[graph], OnnxRunner(proto.SerializeToString()), cases[graph],
                                    io[graph].outputs, FP32_TOLERANCE)
        proto, how = _slim_if_equal(graph, proto, modules[graph], cases[graph], io[graph].outputs)
        report["slim"][graph] = how
        if fp16:
            half = convert_to_fp16(proto)
            runner = OnnxRunner(half.SerializeToString())
            # onnx's reference evaluator is slow: small cases only when onnxruntime lacks kernels.
            limit = None if runner.kind == "onnxruntime" else 200_000
            fp16_results += check_graph(graph, modules[graph], runner, cases[graph], io[graph].outputs,
                                        FP16_TOLERANCE, max_elements=limit)
            report["fp16"]["runner"] = runner.kind
            _set_metadata(half, onnx_metadata(metadata, digest, graph, "fp16"))
            onnx.save(half, str(onnx_paths(folder, "fp16")[graph]))
        _set_metadata(proto, onnx_metadata(metadata, digest, graph, "fp32"))
        onnx.save(proto, str(onnx_paths(folder, "fp32")[graph]))
    report["fp32"] = {"tolerance": FP32_TOLERANCE, "graphs": summarise(fp32_results)}
    if fp16:
        report["fp16"].update({"tolerance": FP16_TOLERANCE, "graphs": summarise(fp16_results)})
    else:
        del report["fp16"]
    report["io"] = {g: {"inputs": list(io[g].inputs), "outputs": list(io[g].outputs)} for g in GRAPH_NAMES}
    return report


def write_end_to_end(model, spec, metadata: dict[str, Any], digest: str, folder: Path, opset: int) -> dict[str, Any]:
    from cellseg.export.end_to_end import export_end_to_end, verify_end_to_end

    path = folder / END_TO_END_ONNX
    d = spec.size_divisible
    export_end_to_end(model, path, opset, example_hw=(3 * d + 5, 4 * d - 3))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    _set_metadata(proto, onnx_metadata(metadata, digest, "end_to_end", "fp32"))
    onnx.save(proto, str(path))
    worst = verify_end_to_end(model, path, verification_images(d), END_TO_END_TOLERANCE, END_TO_END_MASK_TOLERANCE)
    return {"tolerance": END_TO_END_TOLERANCE, "mask_tolerance": END_TO_END_MASK_TOLERANCE, "max_error": worst,
            "min_matched": 0.99, "cases": list(verification_images(d))}


@dataclass(frozen=True)
class Int8Request:
    """What `--int8` asks for: calibration data, image counts and the ΔAP gate. Without `calib`
    (only with --no-onnx --trt) the folder's existing INT8 graphs are built into engines."""

    calib: Path | None
    calib_images: int = DEFAULT_CALIB_IMAGES
    holdout_images: int = DEFAULT_HOLDOUT_IMAGES
    max_map_drop: float = DEFAULT_MAX_MAP_DROP
    settings: QuantSettings = QuantSettings()


def _checked_int8(request: Int8Request) -> tuple[DataImages, list[int], list[int]]:
    """The calibration data opened and split, before any export work (a bad --calib is one line)."""
    if not request.max_map_drop >= 0:
        raise InputError(f"--max-map-drop {request.max_map_drop} must be >= 0")
    images = open_data(request.calib)
    calib, holdout = split_images(images, request.calib_images, request.holdout_images)
    return images, calib, holdout


def write_int8_graphs(model, spec, metadata: dict[str, Any], digest: str, folder: Path, request: Int8Request,
                      split: tuple[DataImages, list[int], list[int]]) -> dict[str, Any]:
    """g.int8.onnx for every graph in `folder` (beside its FP32 graphs), with cellseg metadata;
    VerificationError when INT8 loses more segm AP on the held-out images than allowed."""
    images, calib, holdout = split
    with progress_bars() as progress:
        graphs = calibrate_and_quantize(model, spec, digest, folder, images, calib, request.settings, progress)
        for graph, path in onnx_paths(folder, "int8").items():
            proto = onnx.load(str(path))
            _set_metadata(proto, onnx_metadata(metadata, digest, graph, "int8"))
            onnx.save(proto, str(path))
        held_out = verify_int8(model, spec, digest, folder, images, holdout, progress)
    check_map_drop(held_out, request.max_map_drop, images.source)
    return {"settings": request.settings.to_dict(), "max_map_drop": request.max_map_drop, "graphs": graphs,
            "calibration": {"data": str(images.source), "images": [str(images.paths[i]) for i in calib]},
            "held_out": {**held_out, "data": str(images.source),
                         "image_files": [str(images.paths[i]) for i in holdout]}}


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: already exists (pass --force to overwrite)")
    ensure_writable_folder(out.parent)  # before the export's minutes of work, not after


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder onto `out` (the old one goes only after the new is in)."""
    old = None
    if out.exists():
        old = make_temp_dir(out.parent, f".{out.name}.old.")  # a killed run's leftover is cleaned
        old.rmdir()
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(checkpoint: str | Path, out_dir: str | Path, onnx: bool = True, trt: bool = False,
                 fp16: bool = False, opset: int = 17, min_size: int = 64, opt_size: int = 512,
                 max_size: int = 2560, max_rois: int = 0, force: bool = False,
                 int8: Int8Request | None = None) -> Path:
    """Write the export folder; returns its path. See the module docstring for the layout."""
    from cellseg.checkpoint import load_checkpoint, weights_hash
    from cellseg.model import model_from_checkpoint

    if not (onnx or trt):
        raise InputError("nothing to export: pass --onnx and/or --trt")
    if not 11 <= opset <= 20:
        raise InputError(f"opset {opset} is not supported (11..20; TensorRT 10 parses up to 20)")
    quantize = int8 is not None and onnx
    if quantize and int8.calib is None:
        raise InputError("--int8 needs --calib DATA: real images to calibrate on and to verify against")
    if quantize and trt and not int8.settings.tensorrt_compatible:
        raise InputError("--trt --int8 needs INT8 graphs in TensorRT's scheme (QuantSettings.for_target('tensorrt'))")
    checkpoint, out = Path(checkpoint), Path(out_dir)
    split = _checked_int8(int8) if quantize else None
    ckpt = load_checkpoint(checkpoint)
    digest = weights_hash(ckpt.state_dict)
    if onnx:
        _prepare_out(out, force)
        torch.set_grad_enabled(False)
        try:
            model = model_from_checkpoint(ckpt.state_dict, ckpt.spec, str(checkpoint)).cpu().eval()
            tmp = make_temp_dir(out.parent, f".{out.name}.")
            try:
                report = write_onnx_graphs(model, ckpt.spec, ckpt.metadata, digest, tmp, opset, fp16)
                report["end_to_end"] = write_end_to_end(model, ckpt.spec, ckpt.metadata, digest, tmp, opset)
                if quantize:
                    report["int8"] = write_int8_graphs(model, ckpt.spec, ckpt.metadata, digest, tmp, int8, split)
                shutil.copy2(checkpoint, tmp / CHECKPOINT_COPY)
                precisions = ("fp32",) + (("fp16",) if fp16 else ()) + (("int8",) if quantize else ())
                info = {"format": EXPORT_FORMAT, "metadata": ckpt.metadata, "weights_sha256": digest,
                        "source_checkpoint": str(checkpoint), "checkpoint": CHECKPOINT_COPY, "opset": opset,
                        "graphs": {p: {g: f.name for g, f in onnx_paths(tmp, p).items()} for p in precisions},
                        "end_to_end": END_TO_END_ONNX, "verification": report, "engines": {}}
                atomic_write_json(tmp / EXPORT_JSON, info, indent=1)
                _replace_folder(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            torch.set_grad_enabled(True)
    if trt:
        from cellseg.export.tensorrt_build import build_engines

        try:
            build_engines(out, ckpt.spec, digest, fp16=fp16, int8=int8 is not None, min_size=min_size,
                          opt_size=opt_size, max_size=max_size, max_rois=max_rois, force=force or onnx)
        except BackendUnavailableError as err:
            done = f"; the ONNX export in {out} is complete" if onnx else ""
            raise BackendUnavailableError(f"cannot build TensorRT engines: {err}{done}") from None
    return out
