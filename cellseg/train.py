"""Training: plain functions in the style of torchvision's references/detection.

`fit(cfg)` writes into RUN_DIR:
  config.json    the TrainConfig of the run (a resumed run reuses it; only device/workers change)
  last.pt        after every epoch, atomically: weights + metadata + train_state (optimizer,
                 scheduler, AMP scaler, epoch, best metric, per-epoch records, RNG state).
                 It is the commit point of an epoch: a kill -9 at any moment loses at most the
                 epoch in progress, and `--resume` continues with the next one.
  best.pt        weights + metadata of the epoch with the best validation segm AP (no train_state)
  metrics.jsonl  one JSON line per finished epoch (losses, val metrics, lr, seconds), rewritten
                 atomically from the records kept in last.pt.
Multi-GPU / multi-process: run under `torchrun --nproc-per-node N -m cellseg.train ...`; with
WORLD_SIZE > 1 each process trains on its DistributedSampler shard (batch_size is per process)
inside DistributedDataParallel (nccl on CUDA, gloo on CPU); rank 0 alone evaluates and writes.
Extra knobs (TrainConfig.extra): "model": {ModelSpec field: value} overrides; "scheduler":
"cosine" (default) | "multistep"; "warmup_iters" (default min(1000, one epoch)); "progress": bool;
"cache": bool (keep decoded training samples in memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cellseg.checkpoint import load_checkpoint, make_metadata, save_checkpoint, weights_hash
from cellseg.config import ModelSpec, TrainConfig
from cellseg.data.dataset import CellDataset, collate
from cellseg.data.hw3 import (class_names_of, find_train_root, list_sample_dirs, pixels_to_box, read_instance_pixels,
                              read_sample, split_train_val)
from cellseg.errors import OutputExistsError, TrainingError
from cellseg.fileio import atomic_write_json, atomic_write_text
from cellseg.model import build_model, predict_raw, spec_from_data

METRIC_KEYS = ("AP", "AP50", "AP75")


# ---------------------------------------------------------------------------------------- helpers
def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda: CUDA is not available here (use --device cpu or auto)")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise TrainingError(f"unknown device {name!r} (choose from auto, cpu, cuda)")


def _finite_or_none(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _freeze_backbone_bn(model: nn.Module) -> None:
    """Fine-tuning: keep the pretrained backbone's BatchNorm statistics and affine parameters
    fixed (what torchvision's FrozenBatchNorm2d does), while the state dict keeps plain BN keys."""
    for m in model.backbone.body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def _set_train_mode(model: nn.Module, core: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # requires_grad was cleared before the optimizer / DDP saw the parameters
        for m in core.backbone.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


class _Progress:
    """A rich progress bar on a terminal, else a plain stderr line every ~10% of the epoch."""

    def __init__(self, total: int, title: str, enabled: bool) -> None:
        self.total, self.title, self.enabled = total, title, enabled
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.console import Console
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=Console(file=sys.stderr), transient=False)
            self.task = self.bar.add_task(title, total=total, loss=float("nan"))
            self.bar.start()

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss)
            return
        every = max(1, self.total // 10)
        if done % every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - done)
            print(f"{self.title} {done}/{self.total} loss {loss:.3f} elapsed {elapsed:.0f}s eta {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------- one epoch
def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device,
                    epoch: int, scaler: torch.amp.GradScaler | None = None, max_iters: int = 0,
                    progress: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    title: str | None = None) -> dict[str, float]:
    """One pass over `loader` (at most `max_iters` iterations when > 0); the scheduler steps
    every iteration. Returns the mean of each loss and of their sum ("loss"), averaged over
    processes when distributed. The caller sets train mode."""
    total = len(loader) if max_iters <= 0 else min(len(loader), max_iters)
    sums: dict[str, float] = {}
    bar = _Progress(total, title or f"epoch {epoch}", progress)
    done = 0
    try:
        for images, targets in loader:
            if done >= total:
                break
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            with torch.autocast(device.type, enabled=scaler is not None):
                loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"loss is {value} at epoch {epoch} iteration {done + 1} "
                                    f"({ {k: round(float(v), 4) for k, v in loss_dict.items()} }); try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for k, v in loss_dict.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + value
            done += 1
            bar.update(done, sums["loss"] / done)
    finally:
        bar.close()
    if done == 0:
        raise TrainingError(f"epoch {epoch}: no training batch (is the training split empty?)")
    names = sorted(sums)
    means = torch.tensor([sums[k] / done for k in names], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(means)  # gloo and nccl both reduce float64
        means /= dist.get_world_size()
    return {k: float(v) for k, v in zip(names, means)}


# ---------------------------------------------------------------------------------------- evaluation
def build_gt(samples: Sequence[Any], spec: ModelSpec) -> dict:
    """COCO GT of `samples` (image ids 1..N in the given order, category ids from the spec)."""
    from cellseg.data.coco import encode_mask
    gt: dict[str, Any] = {"images": [], "annotations": [],
                          "categories": [{"id": int(c), "name": n} for c, n in zip(spec.category_ids, spec.class_names)]}
    for image_id, s in enumerate(samples, start=1):
        h, w = s.image.shape[:2]
        gt["images"].append({"id": image_id, "file_name": f"{s.sample_id}/image.tif", "height": h, "width": w})
        for mask, label, box in zip(s.masks, s.labels, s.boxes):
            x1, y1, x2, y2 = (float(v) for v in box)
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id,
                "category_id": int(spec.category_ids[int(label) - 1]), "segmentation": encode_mask(mask),
                "area": int(mask.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    return gt


@torch.no_grad()
def evaluate(model: nn.Module, sample_dirs: Sequence[str | Path], device: torch.device, spec: ModelSpec,
             progress: bool = False) -> dict[str, dict[str, Any]]:
    """Predict every sample at native scale, encode with cellseg.postprocess and score with
    cellseg.evaluate (segm + bbox AP/AP50/AP75 at maxDets sized from the GT).
    Leaves the model in eval mode."""
    from cellseg.evaluate import evaluate_coco
    from cellseg.postprocess import detections_to_coco

    model.eval()
    samples = [read_sample(Path(d), spec.class_names) for d in sample_dirs]
    results: list[dict] = []
    bar = _Progress(len(samples), "validation", progress)
    for image_id, s in enumerate(samples, start=1):
        image = torch.from_numpy(np.ascontiguousarray(s.image.transpose(2, 0, 1))).to(device)
        det = predict_raw(model, [image])[0]
        det = {k: v.float().cpu() for k, v in det.items()}
        results.extend(detections_to_coco(image_id, det["boxes"], det["scores"], det["labels"], det["mask_probs"],
                                          tuple(s.image.shape[:2]), spec.category_ids, spec.mask_thresh))
        bar.update(image_id, float("nan"))
    bar.close()
    return evaluate_coco(build_gt(samples, spec), results)


def _summary(metrics: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return _finite_or_none({t: {k: m.get(k) for k in (*METRIC_KEYS, "per_class", "max_dets")}
                            for t, m in metrics.items()})


# ---------------------------------------------------------------------------------------- fit
def _lr_lambda(kind: str, total_iters: int, warmup_iters: int):
    milestones = (int(total_iters * 2 / 3), int(total_iters * 8 / 9))

    def factor(it: int) -> float:
        warm = min(1.0, 0.001 + 0.999 * it / warmup_iters) if warmup_iters > 0 else 1.0
        if kind == "multistep":
            return warm * 0.1 ** sum(it >= m for m in milestones)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(it, total_iters) / max(1, total_iters)))
    return factor


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _data_stats(dirs: Sequence[Path], class_names: tuple[str, ...]) -> tuple[np.ndarray, int, float]:
    """max(w, h) of every training box, the most instances in one training image, and the most
    instances per million pixels in one training image."""
    sizes, most, density = [], 0, 0.0
    for d in dirs:
        image, labels, pixels = read_instance_pixels(d, class_names)
        h, w = image.shape[:2]
        if pixels:
            boxes = np.array([pixels_to_box(p, w) for p in pixels], np.float32)
            sizes.append(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
        most = max(most, len(labels))
        density = max(density, len(labels) * 1e6 / (h * w))
    return (np.concatenate(sizes) if sizes else np.zeros(0)), most, density


def _read_config(run_dir: Path, cfg: TrainConfig) -> TrainConfig:
    path = run_dir / "config.json"
    try:
        stored = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        stored = {k: v for k, v in stored.items() if k in known}
        old = TrainConfig(**stored)
    except (OSError, ValueError, TypeError) as err:
        raise TrainingError(f"{path}: cannot read the run's config to resume ({err})") from None
    # Runtime choices may change on resume; what defines the run (data, arch, schedule) may not.
    return dataclasses.replace(old, device=cfg.device, workers=cfg.workers, resume=True)


def fit(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the path of best.pt. See the module docstring."""
    rank, world, local_rank = _dist_env()
    run_dir = Path(cfg.out)
    last_path = run_dir / "last.pt"
    if cfg.resume:
        if not last_path.is_file():
            raise TrainingError(f"{last_path}: not found, nothing to resume (drop --resume to start a new run)")
        cfg = _read_config(run_dir, cfg)
    elif last_path.exists():
        raise OutputExistsError(f"{last_path}: a run already exists in {run_dir} "
                                f"(pass --resume to continue it, or choose another --out)")
    device = resolve_device(cfg.device, local_rank)
    own_group = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Long timeout: the other ranks wait at a barrier while rank 0 evaluates.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
        own_group = True
    try:
        return _fit(cfg, run_dir, device, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, run_dir: Path, device: torch.device, rank: int, world: int) -> Path:
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    is_main = rank == 0
    progress = bool(cfg.extra.get("progress", True)) and is_main
    root = find_train_root(cfg.data)
    dirs = list_sample_dirs(root)
    if not dirs:
        raise TrainingError(f"{root}: no training samples")
    class_names = class_names_of(root)
    train_ids, val_ids = split_train_val([d.name for d in dirs], cfg.val_fraction, cfg.seed)
    by_id = {d.name: d for d in dirs}
    train_dirs, val_dirs = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
    if not train_dirs:
        raise TrainingError(f"{root}: the training split is empty")

    ckpt = load_checkpoint(last_path) if cfg.resume else None
    if ckpt is not None:
        if ckpt.train_state is None:
            raise TrainingError(f"{last_path}: has no train_state, cannot resume from it")
        spec = ckpt.spec
        model = build_model(spec)
        model.load_state_dict(ckpt.state_dict)
    else:
        torch.manual_seed(cfg.seed + rank)  # before building: the random init is part of the run
        random.seed(cfg.seed + rank)
        sizes, most, density = _data_stats(train_dirs, class_names)
        overrides = dict(cfg.extra.get("model", {}))
        density = float(overrides.pop("max_instances_per_mpx", density))
        spec = spec_from_data(cfg.arch, class_names, tuple(range(1, len(class_names) + 1)), sizes, most,
                              scale=cfg.scale, max_instances_per_mpx=density, **overrides)
        model = build_model(spec, None if cfg.weights in ("", "none") else cfg.weights)
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", dataclasses.asdict(cfg), indent=2)
    freeze_bn = cfg.weights not in ("", "none") and spec.arch != "maskrcnn_resnet50_fpn_v2"
    if freeze_bn:
        _freeze_backbone_bn(model)
    model.to(device)
    core = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_ds = CellDataset(train_dirs, class_names, augment=True, crop_size=cfg.crop_size, seed=cfg.seed,
                           cache=bool(cfg.extra.get("cache", False)))
    # DistributedSampler with one replica is a seeded, epoch-dependent shuffle: a resumed run
    # sees the same order as an uninterrupted one.
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    iters = len(loader) if cfg.max_iters_per_epoch <= 0 else min(len(loader), cfg.max_iters_per_epoch)
    total_iters = iters * cfg.epochs
    warmup = int(cfg.extra.get("warmup_iters", min(1000, iters)))
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(str(cfg.extra.get("scheduler", "cosine")), total_iters, warmup))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    start_epoch, best_ap, best_epoch, records = 1, None, 0, []
    if ckpt is not None:
        ts = ckpt.train_state
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        start_epoch = int(ts["epoch"]) + 1
        best_ap, best_epoch, records = ts.get("best_ap"), int(ts.get("best_epoch", 0)), list(ts.get("records", []))
        if is_main:
            _set_rng_state(ts["rng"])
            _repair_run_dir(ckpt, run_dir, records)
        else:
            torch.manual_seed(cfg.seed * 1000 + start_epoch * 10 + rank)
        if progress:
            print(f"resuming {run_dir} at epoch {start_epoch}/{cfg.epochs}", file=sys.stderr, flush=True)

    summary_base = {"data": str(root), "n_train": len(train_dirs), "n_val": len(val_dirs), "seed": cfg.seed,
                    "epochs_planned": cfg.epochs, "batch_size": cfg.batch_size, "world_size": world,
                    "lr": cfg.lr, "weights": cfg.weights, "crop_size": cfg.crop_size,
                    "max_iters_per_epoch": cfg.max_iters_per_epoch}
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        _set_train_mode(model, core, freeze_bn)
        losses = train_one_epoch(model, optimizer, loader, device, epoch, scaler, iters, progress, scheduler,
                                 title=f"epoch {epoch}/{cfg.epochs}")
        train_seconds = time.perf_counter() - t0
        if is_main:
            metrics = _summary(evaluate(core, val_dirs, device, spec)) if val_dirs else None
            ap = metrics["segm"]["AP"] if metrics else None
            improved = best_epoch == 0 or metrics is None or (ap is not None and (best_ap is None or ap > best_ap))
            if improved:
                best_ap, best_epoch = ap, epoch
            record = _finite_or_none({"epoch": epoch, "losses": losses, "val": metrics,
                                      "lr": optimizer.param_groups[0]["lr"], "train_seconds": train_seconds,
                                      "seconds": time.perf_counter() - t0})
            records.append(record)
            state = {k: v.detach().cpu() for k, v in core.state_dict().items()}
            training = _finite_or_none({**summary_base, "epoch": epoch, "val": metrics, "best_epoch": best_epoch,
                                        "best_val_segm_AP": best_ap,
                                        "best_val": records[best_epoch - 1]["val"] if best_epoch else None})
            train_state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "scaler": scaler.state_dict() if scaler is not None else None,
                           "best_ap": best_ap, "best_epoch": best_epoch, "records": records, "rng": _rng_state()}
            # last.pt first: it is the commit point; best.pt and metrics.jsonl are re-derived
            # from it by _repair_run_dir if we die in between.
            save_checkpoint(last_path, state, make_metadata(spec, training), train_state)
            if improved:
                save_checkpoint(best_path, state, make_metadata(spec, training))
            _write_metrics(run_dir, records)
            if progress:
                val = f"val segm AP {ap:.4f}" if ap is not None else "no validation split"
                print(f"epoch {epoch}/{cfg.epochs}: loss {losses['loss']:.4f}, {val} "
                      f"(best epoch {best_epoch}), {record['seconds']:.0f} s", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.barrier()
    if is_main and not best_path.exists():  # e.g. resumed a run that had already finished
        _repair_run_dir(load_checkpoint(last_path), run_dir, records)
    return best_path


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _repair_run_dir(ckpt, run_dir: Path, records: list[dict]) -> None:
    """After a kill between writing last.pt and its followers: rewrite metrics.jsonl from the
    records in last.pt, and best.pt when last.pt's epoch is the best one but best.pt is older."""
    _write_metrics(run_dir, records)
    ts = ckpt.train_state
    if int(ts.get("best_epoch", 0)) != int(ts["epoch"]):
        return
    best_path = run_dir / "best.pt"
    if best_path.exists():
        best = load_checkpoint(best_path)
        if best.metadata.get("training", {}).get("epoch") == ts["epoch"] and \
                weights_hash(best.state_dict) == weights_hash(ckpt.state_dict):
            return
    save_checkpoint(best_path, ckpt.state_dict, ckpt.metadata)


# ---------------------------------------------------------------------------------------- torchrun entry
def _parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m cellseg.train", description="Train Mask R-CNN (torchrun-friendly).")
    d = TrainConfig(data="", out="")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default=d.arch)
    for name in ("epochs", "batch_size", "seed", "workers", "crop_size", "max_iters_per_epoch"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "val_fraction", "scale"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--weights", default=d.weights)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--extra", default="{}", help="JSON object for TrainConfig.extra")
    a = p.parse_args(argv)
    try:
        extra = json.loads(a.extra)
    except ValueError as err:
        p.error(f"--extra is not JSON: {err}")
    if not isinstance(extra, dict):
        p.error("--extra must be a JSON object")
    return TrainConfig(data=a.data, out=a.out, arch=a.arch, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       weight_decay=a.weight_decay, val_fraction=a.val_fraction, device=a.device,
                       weights=a.weights, resume=a.resume, seed=a.seed, workers=a.workers, crop_size=a.crop_size,
                       max_iters_per_epoch=a.max_iters_per_epoch, scale=a.scale, extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    from cellseg.errors import CellsegError
    try:
        best = fit(_parse_args(argv))
    except CellsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if _dist_env()[0] == 0:
        print(f"best checkpoint: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
