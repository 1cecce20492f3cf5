"""The `cellseg` command line: thin typer commands over typed library functions.

Every CellsegError becomes one line on stderr and the exit code of its class (cellseg.errors);
that mapping lives in `_errors_to_exit_codes` and nowhere else."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Optional

import typer

from cellseg.config import TrainConfig
from cellseg.errors import CellsegError, InputError
from cellseg.recipes import RECIPES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, export and run Mask R-CNN cell instance segmentation.")
data_app = typer.Typer(no_args_is_help=True, help="Convert and synthesise data sets.")
app.add_typer(data_app, name="data")


def _errors_to_exit_codes(fn):
    """The one place where cellseg's exceptions become a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CellsegError as err:
            typer.echo(f"cellseg: error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("cellseg: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def command(group: typer.Typer, name: str | None = None):
    def register(fn):
        return group.command(name)(_errors_to_exit_codes(fn))

    return register


def _echo_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


# ----------------------------------------------------------------------------------------- data
@command(data_app, "convert")
def data_convert(root: Path = typer.Argument(..., help="HW3 layout root (ROOT or ROOT/train)"),
                 out: Path = typer.Option(..., "--out", help="COCO GT JSON to write"),
                 force: bool = typer.Option(False, "--force", help="overwrite an existing file")):
    """HW3 layout -> COCO ground-truth JSON (RLE masks)."""
    from cellseg.data.coco import hw3_to_coco, write_coco_gt
    from cellseg.fileio import check_writable

    check_writable(out, force)
    gt = hw3_to_coco(root)
    write_coco_gt(gt, out, force=force)
    typer.echo(f"wrote {out}: {len(gt['images'])} images, {len(gt['annotations'])} instances")


@command(data_app, "synth")
def data_synth(out: Path = typer.Argument(..., help="folder to create"),
               n_train: int = typer.Option(16, "--n-train"), n_test: int = typer.Option(4, "--n-test"),
               seed: int = typer.Option(0, "--seed"), size: int = typer.Option(256, "--size"),
               crowded: bool = typer.Option(False, "--crowded", help=">= 300 cells per 1024^2"),
               slide: int = typer.Option(0, "--slide", help="instead: one SIDE x SIDE tiled pyramidal TIFF + its COCO GT"),
               force: bool = typer.Option(False, "--force")):
    """A synthetic HW3-layout data set with every awkward real-format trait (or, with --slide,
    one large tiled pyramidal TIFF with its ground truth)."""
    from cellseg.data.synth import synthesize, synthesize_slide

    if slide:
        path = synthesize_slide(out, slide, seed=seed, crowded=crowded, force=force)
    else:
        path = synthesize(out, n_train=n_train, n_test=n_test, seed=seed, size=size, crowded=crowded, force=force)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------- train
def _train_default(field: str, extra: str = "") -> str:
    """Help of a training option: its plain default and the cpu-scratch recipe's (the default
    recipe without pretrained weights), both read from where they are set."""
    plain = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[field]
    return f"default {plain}; cpu-scratch: {RECIPES['cpu-scratch'].train.get(field, plain)}{extra}"


@command(app)
def train(data: Path = typer.Argument(..., help="HW3 layout root (ROOT or ROOT/train)"),
          out: Path = typer.Option(..., "--out", help="run folder (last.pt, best.pt, metrics.jsonl)"),
          recipe: Optional[str] = typer.Option(None, "--recipe", help="cpu-scratch | none (default: cpu-scratch "
                                               "with --weights none, else none); options given here win"),
          time_budget: Optional[str] = typer.Option(None, "--time-budget", help="wall-clock budget, e.g. 2h, "
                                                    "90m, 45s: the LR schedule is fitted to it, best epoch kept"),
          arch: Optional[str] = typer.Option(None, "--arch", help=_train_default("arch")),
          epochs: Optional[int] = typer.Option(None, "--epochs", help=_train_default("epochs", " (a cap of 1000 with --time-budget)")),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", help=_train_default("batch_size")),
          lr: Optional[float] = typer.Option(None, "--lr", help=_train_default("lr")),
          weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=_train_default("weight_decay")),
          val_fraction: float = typer.Option(0.15, "--val-fraction"),
          split: str = typer.Option("classes", "--split", help="validation groups: classes (each class's share "
                                    "of instances matched too) | groups (sample count only)"),
          device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
          weights: str = typer.Option("none", "--weights", help="none | default | PATH to a .pth state dict"),
          resume: bool = typer.Option(False, "--resume", help="continue from RUN_DIR/last.pt"),
          seed: int = typer.Option(0, "--seed"),
          split_seed: Optional[int] = typer.Option(None, "--split-seed", help="seed of the validation split "
                                                   "(default: --seed); another --seed on the same split "
                                                   "measures run-to-run noise"),
          crop_size: Optional[int] = typer.Option(None, "--crop-size", help="train on random crops of this side (0 = whole images)"),
          max_iters_per_epoch: int = typer.Option(0, "--max-iters-per-epoch", help="cap iterations per epoch (0 = all)"),
          scale: float = typer.Option(1.0, "--scale", help="resize factor applied to every image (1 = native pixels)"),
          workers: int = typer.Option(0, "--workers"),
          scheduler: Optional[str] = typer.Option(None, "--scheduler", help="cosine | multistep (per iteration)"),
          warmup_iters: Optional[int] = typer.Option(None, "--warmup-iters",
                                                     help="linear LR warmup (default: min(1000, one epoch); at most 10 % of the run)"),
          augment: Optional[str] = typer.Option(None, "--augment", help="basic | cells (scale + stain jitter)"),
          repeat_factor_threshold: Optional[float] = typer.Option(
              None, "--repeat-factor-threshold", help="LVIS repeat-factor sampling of rare-class crops (0 = off)"),
          cache: bool = typer.Option(False, "--cache", help="keep decoded training samples in memory"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bars or per-epoch lines"),
          model_set: list[str] = typer.Option([], "--set", help="model setting KEY=VALUE (a ModelSpec field, "
                                              "e.g. box_score_thresh=0.1); repeatable")):
    """Train Mask R-CNN; validation COCO AP every epoch; resumable."""
    import time

    started_at = time.perf_counter()  # a --time-budget counts the imports below too
    from cellseg.recipes import default_recipe, parse_duration, recipe_config
    from cellseg.train import fit

    budget_s = parse_duration(time_budget) if time_budget is not None else 0.0
    chosen = dict(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  crop_size=crop_size, scheduler=scheduler, warmup_iters=warmup_iters, augment=augment,
                  repeat_factor_threshold=repeat_factor_threshold)
    given = {k: v for k, v in chosen.items() if v is not None}
    if budget_s and epochs is None:
        given["epochs"] = 1000  # the budget ends the run; epochs only caps it
    cfg = recipe_config(recipe or default_recipe(weights), dict(
        given, data=str(data), out=str(out), val_fraction=val_fraction, split=split, device=device, weights=weights,
        resume=resume, seed=seed, split_seed=split_seed, workers=workers, max_iters_per_epoch=max_iters_per_epoch, scale=scale,
        model_overrides=tuple(_parse_settings(model_set).items()), progress=not quiet, cache=cache,
        time_budget_s=budget_s))
    best = fit(cfg, started_at)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(f"best checkpoint: {best}")


def _parse_settings(items: list[str]) -> dict:
    """KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, lists), else as a string."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


# ---------------------------------------------------------------------------------------- infer
@command(app)
def infer(model: Path = typer.Argument(..., help="checkpoint .pt or export folder"),
          inputs: list[Path] = typer.Argument(..., help="image files or folders (any size: large ones run tile by tile)"),
          out: Path = typer.Option(..., "--out", help="COCO results JSON (per-image outputs go next to it)"),
          backend: Optional[str] = typer.Option(None, "--backend", help="torch | onnxruntime | trt"),
          id_map: Optional[Path] = typer.Option(None, "--id-map", help="test_image_name_to_ids.json"),
          device: str = typer.Option("auto", "--device"),
          score_thresh: Optional[float] = typer.Option(None, "--score-thresh", help="output floor: detections scoring "
                                                       "below it get no mask and are not output (default: the "
                                                       "model's score_floor)"),
          formats: str = typer.Option("coco", "--format", help="coco, geojson, labels: one or more, comma-separated"),
          out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="folder for per-image GeoJSON / label images (default: --out's folder)"),
          tile: Optional[int] = typer.Option(None, "--tile", help="tile side in px (default from the checkpoint)"),
          overlap: Optional[int] = typer.Option(None, "--overlap", help="tile overlap in px (default: the largest training object)"),
          skip_background: bool = typer.Option(True, "--skip-background/--no-skip-background", help="skip tiles with no tissue"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its finished tiles"),
          overlays: Optional[Path] = typer.Option(None, "--overlays", help="write one PNG per image here"),
          force: bool = typer.Option(False, "--force", help="overwrite existing outputs"),
          precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 artifacts of an "
                                                  "export folder (default: fp32 graphs, fp16 engines)"),
          engine: str = typer.Option("local", "--engine", help="local | ray (Ray Data actors, one predictor each)"),
          workers: Optional[int] = typer.Option(None, "--workers", help="ray: actors (default 2)"),
          address: Optional[str] = typer.Option(None, "--address", help="ray: an existing cluster (default: a local one)"),
          quiet: bool = typer.Option(False, "--quiet")):
    """Images of any size in; COCO results JSON, QuPath GeoJSON and/or label images out."""
    from cellseg.infer import (EngineSettings, InferSettings, assign_image_ids, check_engine, collect_inputs,
                               load_id_map_if_any, parse_formats, plan_outputs, run_engine)
    from cellseg.pipeline import load_predictor

    run_on = EngineSettings(engine.strip().lower(), workers, address)
    check_engine(run_on)
    chosen = parse_formats(formats)
    paths = collect_inputs(inputs)
    plan = plan_outputs(paths, out, chosen, out_dir, overlays, force, resume)
    image_ids = assign_image_ids(paths, load_id_map_if_any(id_map))
    predictor = load_predictor(model, backend=backend, device=device, precision=precision)
    settings = InferSettings(score_thresh=score_thresh, tile=tile, overlap=overlap, skip_background=skip_background,
                             resume=resume, progress=not quiet, model_id=f"{Path(model).resolve()}|{predictor.backend_name}")
    stats = run_engine(run_on, predictor, model, device, paths, image_ids, plan, settings, precision)
    for note in stats.notes:
        typer.echo(f"cellseg: {note}", err=True)
    where = ", ".join(str(p) for p in ([plan.coco] if plan.coco else []) + ([plan.out_dir] if set(chosen) - {"coco"} else []))
    typer.echo(f"wrote {where}: {stats.images} images, {stats.instances} instances, {stats.tiles} tiles "
               f"(backend {predictor.backend_name}, {stats.seconds['predict']:.2f} s predicting)")


# ----------------------------------------------------------------------------------------- eval
@command(app, "eval")
def eval_(results: Path = typer.Argument(..., help="COCO results JSON"),
          gt: Path = typer.Option(..., "--gt", help="COCO GT JSON or HW3 layout root"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics here"),
          force: bool = typer.Option(False, "--force")):
    """COCO segm and bbox AP / AP50 / AP75 and per-class AP, maxDets sized from the GT; per class
    and per object-size quartile, the share of nuclei found (mask IoU >= 0.5, any class) and
    found with the right class."""
    from cellseg.evaluate import class_recall, evaluate_coco, gt_coverage, load_results, size_recall
    from cellseg.fileio import atomic_write_json, check_writable

    if json_out is not None:
        check_writable(json_out, force)
    gt_dict = _load_gt(gt)
    detections = load_results(results)
    iou_types = ("segm", "bbox")
    if detections and not any("segmentation" in r for r in detections):
        iou_types = ("bbox",)  # box-only results: there is no mask to score
    metrics = evaluate_coco(gt_dict, detections, iou_types=iou_types, source=str(results))
    if iou_types == ("bbox",):
        typer.echo(f"{results}: results have boxes but no masks: bbox AP only", err=True)
    rows = []
    for iou_type, m in metrics.items():
        per_class = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in m["per_class"].items())
        rows.append((iou_type, _fmt(m["AP"]), _fmt(m["AP50"]), _fmt(m["AP75"]), str(m["max_dets"]), per_class))
    _echo_table(f"COCO evaluation of {results.name}", rows, ("type", "AP", "AP50", "AP75", "maxDets", "per class AP"))
    if "segm" in metrics:
        coverage = gt_coverage(gt_dict, detections)  # mask IoUs of every image, computed once
        _echo_class_recall(metrics["segm"], class_recall(gt_dict, detections, coverage=coverage))
        _echo_size_recall(metrics["segm"], size_recall(gt_dict, detections, coverage=coverage))
    if json_out is not None:
        atomic_write_json(json_out, metrics, force=force, indent=2)
        typer.echo(f"wrote {json_out}")


def _echo_class_recall(segm: dict, recall: dict[str, dict]) -> None:
    """Per class: where its AP goes (recorded in the segm metrics as `per_class_recall`)."""
    segm["per_class_recall"] = recall
    rows = [(name, str(r["gt"]), _fmt(r["found"], 3), _fmt(r["named"], 3), _fmt(segm["per_class_AP50"].get(name), 3))
            for name, r in recall.items()]
    _echo_table("per class: GT instances covered at mask IoU >= 0.5", rows,
                ("class", "GT", "found (any class)", "named (own class)", "AP50"))


def _echo_size_recall(segm: dict, recall: list[dict]) -> None:
    """The same shares per quartile of GT mask area (recorded as `per_size_recall`)."""
    segm["per_size_recall"] = recall
    rows = [(f"{r['area_from']:.0f}-{r['area_to']:.0f}", str(r["gt"]), _fmt(r["found"], 3), _fmt(r["named"], 3))
            for r in recall]
    _echo_table("per object size: GT instances covered at mask IoU >= 0.5", rows,
                ("mask area px", "GT", "found (any class)", "named (own class)"))


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _load_gt(gt: Path) -> dict:
    from cellseg.data.coco import hw3_to_coco, load_coco_gt

    if gt.is_dir():
        return hw3_to_coco(gt)
    if not gt.exists():
        raise InputError(f"{gt}: no such file or folder")
    return load_coco_gt(gt)


# --------------------------------------------------------------------------------------- export
@command(app)
def export(checkpoint: Path = typer.Argument(..., help="checkpoint .pt from cellseg train"),
           out: Path = typer.Option(..., "--out", help="export folder"),
           onnx: bool = typer.Option(True, "--onnx/--no-onnx"),
           trt: bool = typer.Option(False, "--trt", help="also build TensorRT engines (needs CUDA + TensorRT)"),
           fp16: bool = typer.Option(False, "--fp16", help="also write FP16 graphs (and FP16 engines with --trt)"),
           opset: int = typer.Option(17, "--opset"),
           min_size: int = typer.Option(64, "--min-size", help="smallest image side for engine profiles"),
           opt_size: int = typer.Option(512, "--opt-size"),
           max_size: int = typer.Option(2560, "--max-size", help="largest image side for engine profiles"),
           max_rois: int = typer.Option(0, "--max-rois", help="0 = max(rpn_post_nms_top_n_test, box_detections_per_img); larger RoI batches are split"),
           int8: bool = typer.Option(False, "--int8", help="also write INT8 QDQ graphs (and INT8 engines with --trt), calibrated on --calib"),
           calib: Optional[Path] = typer.Option(None, "--calib", help="labelled data (HW3 root or COCO GT JSON) to calibrate and verify INT8 on"),
           calib_images: int = typer.Option(16, "--calib-images", help="images of --calib to calibrate on"),
           holdout_images: int = typer.Option(16, "--holdout-images", help="other images of --calib (other source images) to verify ΔAP on"),
           max_map_drop: float = typer.Option(0.01, "--max-map-drop", help="refuse INT8 when it loses more segm AP than this against FP32"),
           triton: Optional[Path] = typer.Option(None, "--triton", help="also write a Triton model repository "
                                                 "here (as `cellseg export-triton OUT REPO`)"),
           force: bool = typer.Option(False, "--force")):
    """ONNX graphs verified against PyTorch (INT8 ones by ΔAP); TensorRT engines built from them."""
    from cellseg.export.exporter import Int8Request, export_model
    from cellseg.export.int8 import QuantSettings

    if triton is not None and triton.exists() and not force:  # before the export's minutes, not after
        from cellseg.errors import OutputExistsError

        raise OutputExistsError(f"{triton}: already exists (pass --force to overwrite)")
    request = None
    if int8:
        settings = QuantSettings.for_target("tensorrt" if trt else "onnxruntime")
        request = Int8Request(calib, calib_images, holdout_images, max_map_drop, settings)
    path = export_model(checkpoint, out, onnx=onnx, trt=trt, fp16=fp16, opset=opset, min_size=min_size,
                        opt_size=opt_size, max_size=max_size, max_rois=max_rois, force=force, int8=request)
    typer.echo(f"wrote {path}")
    if triton is not None:
        from cellseg.export.triton_repo import write_triton_repo

        typer.echo(f"wrote {write_triton_repo(path, triton, force=force)}")


# ---------------------------------------------------------------------------------------- bench
@command(app)
def bench(model: Path = typer.Argument(..., help="checkpoint .pt or export folder"),
          data: Path = typer.Option(..., "--data", help="HW3 layout root or COCO GT JSON"),
          backends: str = typer.Option("torch,onnxruntime,openvino,trt", "--backends",
                                       help="rows, comma-separated: BACKEND (its default precision) or "
                                            "BACKEND:PRECISION (fp32|fp16|int8), e.g. openvino:int8"),
          device: str = typer.Option("auto", "--device"),
          warmup: int = typer.Option(1, "--warmup"), iters: int = typer.Option(1, "--iters"),
          max_map_drop: float = typer.Option(0.005, "--max-map-drop", help="ΔAP gate of FP32 rows"),
          max_map_drop_reduced: float = typer.Option(0.01, "--max-map-drop-reduced",
                                                     help="ΔAP gate of fp16/int8 rows (matched share reported)"),
          out: Optional[Path] = typer.Option(None, "--out", help="report folder"),
          force: bool = typer.Option(False, "--force"),
          reference: bool = typer.Option(True, "--reference/--no-reference",
                                         help="also run the seed-style reference row (the slowest)")):
    """Speed and mAP parity of every available backend against PyTorch, in one table."""
    from cellseg.bench.harness import failure_error, run_bench

    report = run_bench(model, data, [b.strip() for b in backends.split(",") if b.strip()], device=device,
                       warmup=warmup, iters=iters, max_map_drop=max_map_drop, out=out, force=force,
                       max_map_drop_reduced=max_map_drop_reduced, reference=reference)
    for failure in report.get("failures", []):
        typer.echo(f"cellseg: bench: {failure}", err=True)
    error = failure_error(report)
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------- serve
@command(app)
def serve(model: Path = typer.Argument(..., help="checkpoint .pt or export folder"),
          backend: Optional[str] = typer.Option(None, "--backend", help="torch | onnxruntime | openvino | trt"),
          precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 artifacts"),
          device: str = typer.Option("auto", "--device"),
          host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
          http_port: int = typer.Option(8000, "--http-port"), grpc_port: int = typer.Option(8001, "--grpc-port"),
          metrics_port: int = typer.Option(8002, "--metrics-port"),
          instances: int = typer.Option(1, "--instances", help="model instances (one predictor each)"),
          max_image_px: Optional[int] = typer.Option(None, "--max-image-px", help="largest image served, in pixels (default: one tile)"),
          max_batch_size: int = typer.Option(8, "--max-batch-size", help="rows per dynamic batch")):
    """A Triton Inference Server (PyTriton) with model `cellseg`: encoded image in, COCO results JSON out."""
    from cellseg.serve import ServeSettings, serve as run_server

    settings = ServeSettings(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                             instances=instances, max_image_px=max_image_px, max_batch_size=max_batch_size)
    run_server(model, backend=backend, device=device, settings=settings, on_ready=lambda line: typer.echo(line, err=True),
               precision=precision)
    typer.echo("cellseg: server stopped", err=True)


@command(app, "export-triton")
def export_triton(export_dir: Path = typer.Argument(..., help="export folder from cellseg export"),
                  repo: Path = typer.Argument(..., help="Triton model repository to write"),
                  precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 (default: fp16 engines when built, else fp32 ONNX)"),
                  max_batch_size: int = typer.Option(8, "--max-batch-size"),
                  force: bool = typer.Option(False, "--force")):
    """A Triton model repository for a GPU Triton container: dense graphs + a Python (BLS) glue model."""
    from cellseg.export.triton_repo import write_triton_repo

    path = write_triton_repo(export_dir, repo, precision=precision, max_batch_size=max_batch_size, force=force)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------------------- demo
@command(app)
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="folder for every artifact"),
         force: bool = typer.Option(False, "--force"),
         train_iters: int = typer.Option(0, "--train-iters", help="override the training length (0 = default)")):
    """The whole job on built-in synthetic data: synth -> train -> infer -> eval -> export -> bench."""
    from cellseg.demo import run_demo

    run_demo(out, force=force, train_iters=train_iters)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
