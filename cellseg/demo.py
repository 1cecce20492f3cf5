"""`cellseg demo`: the whole job on a fresh CPU machine with no data of one's own.

synthesise -> train the light model briefly -> infer the test images -> evaluate ->
export ONNX (and TensorRT where CUDA and TensorRT exist) -> bench every available backend."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from cellseg.errors import BackendUnavailableError, OutputExistsError


@dataclass(frozen=True)
class DemoPlan:
    """Sized so the whole demo runs in well under 10 minutes on 2 CPU cores."""

    n_train: int = 24
    n_test: int = 4
    size: int = 192
    epochs: int = 12
    iters_per_epoch: int = 40
    batch_size: int = 2
    lr: float = 5e-4
    model: dict = dataclasses.field(default_factory=dict)  # ModelSpec overrides (tests use tiny heads)
    progress: bool = True


def run_demo(out: Path, force: bool = False, train_iters: int = 0, plan: DemoPlan = DemoPlan(),
             echo=print) -> dict:
    from cellseg.config import TrainConfig
    from cellseg.data.coco import load_coco_gt
    from cellseg.data.hw3 import read_id_map
    from cellseg.data.synth import synthesize
    from cellseg.evaluate import evaluate_coco
    from cellseg.infer import assign_image_ids, collect_inputs, run_inference, write_results
    from cellseg.pipeline import load_predictor
    from cellseg.train import fit

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: already exists and is not empty (pass --force to start over)")
    if train_iters:
        plan = dataclasses.replace(plan, iters_per_epoch=max(1, train_iters // plan.epochs))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str):
        echo(f"[demo] {name} ...")
        return time.perf_counter()

    t = step("synthesising data")
    data = synthesize(out / "data", n_train=plan.n_train, n_test=plan.n_test, seed=0, size=plan.size, force=force)
    timings["synth"] = time.perf_counter() - t

    t = step(f"training maskrcnn_resnet18_fpn ({plan.epochs} epochs of at most {plan.iters_per_epoch} iterations)")
    best = fit(TrainConfig(data=str(data), out=str(out / "run"), arch="maskrcnn_resnet18_fpn", epochs=plan.epochs,
                           batch_size=plan.batch_size, lr=plan.lr, val_fraction=0.2, device="auto", seed=0,
                           max_iters_per_epoch=plan.iters_per_epoch, resume=(out / "run" / "last.pt").exists(),
                           model_overrides=tuple(plan.model.items()), progress=plan.progress))
    timings["train"] = time.perf_counter() - t

    t = step("inferring the test images (torch backend)")
    predictor = load_predictor(best, backend="torch", device="auto")
    paths = collect_inputs([data / "test_release"])
    ids = assign_image_ids(paths, read_id_map(data / "test_image_name_to_ids.json"))
    results, _ = run_inference(predictor, paths, ids, overlays=out / "overlays", progress=False)
    write_results(results, out / "results.json", force=True)
    timings["infer"] = time.perf_counter() - t

    t = step("evaluating")
    gt = load_coco_gt(data / "test_annotations.json")
    metrics = evaluate_coco(gt, results)
    timings["eval"] = time.perf_counter() - t

    summary = {"metrics": metrics, "timings": timings, "artifacts": {"data": str(data), "checkpoint": str(best),
               "results": str(out / "results.json"), "overlays": str(out / "overlays")}}
    summary.update(_export_and_bench(best, data, out, timings, step, plan.progress))
    timings["total"] = time.perf_counter() - t_all
    _print_summary(summary, echo)
    return summary


def _export_and_bench(best: Path, data: Path, out: Path, timings: dict, step, progress: bool) -> dict:
    """Export ONNX (+TensorRT when possible) and bench every available backend."""
    from cellseg.bench.harness import run_bench
    from cellseg.export.exporter import export_model

    t = step("exporting ONNX graphs (verified against PyTorch)")
    export_dir = export_model(best, out / "export", onnx=True, trt=False, force=True)
    trt_note = None
    try:
        export_model(best, out / "export", onnx=False, trt=True, force=True)
    except BackendUnavailableError as err:
        trt_note = f"TensorRT skipped: {err}"
    timings["export"] = time.perf_counter() - t

    t = step("benchmarking backends")
    report = run_bench(export_dir, data / "test_annotations.json", ["torch", "onnxruntime", "trt"],
                       device="auto", warmup=1, iters=1, out=out / "bench", force=True, progress=progress)
    timings["bench"] = time.perf_counter() - t
    return {"export": str(export_dir), "trt_note": trt_note, "bench": str(out / "bench"),
            "bench_failures": report.get("failures", [])}


def _print_summary(summary: dict, echo) -> None:
    m = summary["metrics"]
    echo("")
    echo("cellseg demo: done")
    echo(f"  segm AP {m['segm']['AP']:.4f}  AP50 {m['segm']['AP50']:.4f}   "
         f"bbox AP {m['bbox']['AP']:.4f}  AP50 {m['bbox']['AP50']:.4f}")
    echo("  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items()))
    for k, v in summary["artifacts"].items():
        echo(f"  {k:<10} {v}")
    if summary.get("export"):
        echo(f"  {'export':<10} {summary['export']}")
        echo(f"  {'bench':<10} {summary['bench']}/report.md")
    if summary.get("trt_note"):
        echo(f"  {summary['trt_note']}")
