"""The `cellseg` command line: thin typer commands over typed library functions.

Every CellsegError becomes one line on stderr and the exit code of its class (cellseg.errors);
that mapping lives in `_errors_to_exit_codes` and nowhere else."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import typer

from cellseg.errors import CellsegError, InputError

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
@command(app)
def train(data: Path = typer.Argument(..., help="HW3 layout root (ROOT or ROOT/train)"),
          out: Path = typer.Option(..., "--out", help="run folder (last.pt, best.pt, metrics.jsonl)"),
          arch: str = typer.Option("maskrcnn_resnet18_fpn", "--arch"),
          epochs: int = typer.Option(12, "--epochs"), batch_size: int = typer.Option(2, "--batch-size"),
          lr: float = typer.Option(1e-4, "--lr"), weight_decay: float = typer.Option(1e-4, "--weight-decay"),
          val_fraction: float = typer.Option(0.15, "--val-fraction"),
          device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
          weights: str = typer.Option("none", "--weights", help="none | default | PATH to a .pth state dict"),
          resume: bool = typer.Option(False, "--resume", help="continue from RUN_DIR/last.pt"),
          seed: int = typer.Option(0, "--seed"),
          crop_size: int = typer.Option(0, "--crop-size", help="train on random crops of this side (0 = whole images)"),
          max_iters_per_epoch: int = typer.Option(0, "--max-iters-per-epoch", help="cap iterations per epoch (0 = all)"),
          scale: float = typer.Option(1.0, "--scale", help="resize factor applied to every image (1 = native pixels)"),
          workers: int = typer.Option(0, "--workers"),
          scheduler: str = typer.Option("cosine", "--scheduler", help="cosine | multistep (per iteration)"),
          warmup_iters: Optional[int] = typer.Option(None, "--warmup-iters",
                                                     help="linear LR warmup (default: min(1000, one epoch))"),
          cache: bool = typer.Option(False, "--cache", help="keep decoded training samples in memory"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bars or per-epoch lines"),
          model_set: list[str] = typer.Option([], "--set", help="model setting KEY=VALUE (a ModelSpec field, "
                                              "e.g. box_score_thresh=0.1); repeatable")):
    """Train Mask R-CNN; validation COCO AP every epoch; resumable."""
    from cellseg.config import TrainConfig
    from cellseg.train import fit

    cfg = TrainConfig(data=str(data), out=str(out), arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, val_fraction=val_fraction, device=device, weights=weights,
                      resume=resume, seed=seed, workers=workers, crop_size=crop_size,
                      max_iters_per_epoch=max_iters_per_epoch, scale=scale,
                      model_overrides=tuple(_parse_settings(model_set).items()), scheduler=scheduler,
                      warmup_iters=warmup_iters, progress=not quiet, cache=cache)
    best = fit(cfg)
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
          score_thresh: Optional[float] = typer.Option(None, "--score-thresh"),
          formats: str = typer.Option("coco", "--format", help="coco, geojson, labels: one or more, comma-separated"),
          out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="folder for per-image GeoJSON / label images (default: --out's folder)"),
          tile: Optional[int] = typer.Option(None, "--tile", help="tile side in px (default from the checkpoint)"),
          overlap: Optional[int] = typer.Option(None, "--overlap", help="tile overlap in px (default: the largest training object)"),
          skip_background: bool = typer.Option(True, "--skip-background/--no-skip-background", help="skip tiles with no tissue"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its finished tiles"),
          overlays: Optional[Path] = typer.Option(None, "--overlays", help="write one PNG per image here"),
          force: bool = typer.Option(False, "--force", help="overwrite existing outputs"),
          quiet: bool = typer.Option(False, "--quiet")):
    """Images of any size in; COCO results JSON, QuPath GeoJSON and/or label images out."""
    from cellseg.infer import (InferSettings, assign_image_ids, collect_inputs, infer_to_outputs,
                               load_id_map_if_any, parse_formats, plan_outputs)
    from cellseg.pipeline import load_predictor

    chosen = parse_formats(formats)
    paths = collect_inputs(inputs)
    plan = plan_outputs(paths, out, chosen, out_dir, overlays, force, resume)
    image_ids = assign_image_ids(paths, load_id_map_if_any(id_map))
    predictor = load_predictor(model, backend=backend, device=device)
    settings = InferSettings(score_thresh=score_thresh, tile=tile, overlap=overlap, skip_background=skip_background,
                             resume=resume, progress=not quiet, model_id=f"{Path(model).resolve()}|{predictor.backend_name}")
    stats = infer_to_outputs(predictor, paths, image_ids, plan, settings)
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
    """COCO segm and bbox AP / AP50 / AP75 and per-class AP, maxDets sized from the GT."""
    from cellseg.evaluate import evaluate_coco, load_results
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
    if json_out is not None:
        atomic_write_json(json_out, metrics, force=force, indent=2)
        typer.echo(f"wrote {json_out}")


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
           force: bool = typer.Option(False, "--force")):
    """ONNX graphs verified against PyTorch; TensorRT engines built from them."""
    from cellseg.export.exporter import export_model

    path = export_model(checkpoint, out, onnx=onnx, trt=trt, fp16=fp16, opset=opset, min_size=min_size,
                        opt_size=opt_size, max_size=max_size, max_rois=max_rois, force=force)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------- bench
@command(app)
def bench(model: Path = typer.Argument(..., help="checkpoint .pt or export folder"),
          data: Path = typer.Option(..., "--data", help="HW3 layout root or COCO GT JSON"),
          backends: str = typer.Option("torch,onnxruntime,trt", "--backends"),
          device: str = typer.Option("auto", "--device"),
          warmup: int = typer.Option(1, "--warmup"), iters: int = typer.Option(1, "--iters"),
          max_map_drop: float = typer.Option(0.005, "--max-map-drop"),
          out: Optional[Path] = typer.Option(None, "--out", help="report folder"),
          force: bool = typer.Option(False, "--force")):
    """Speed and mAP parity of every available backend against PyTorch, in one table."""
    from cellseg.bench.harness import failure_error, run_bench

    report = run_bench(model, data, [b.strip() for b in backends.split(",") if b.strip()], device=device,
                       warmup=warmup, iters=iters, max_map_drop=max_map_drop, out=out, force=force)
    for failure in report.get("failures", []):
        typer.echo(f"cellseg: bench: {failure}", err=True)
    error = failure_error(report)
    if error is not None:
        raise error


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
