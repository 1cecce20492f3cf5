"""Training: plain functions in the style of torchvision's references/detection.

`fit(cfg)` writes into RUN_DIR:
  config.json    the TrainConfig of the run (a resumed run reuses it; only device, workers,
                 progress and cache may change)
  last.pt        after every epoch, atomically: weights + metadata + train_state (optimizer,
                 scheduler, AMP scaler, epoch, best metric, per-epoch records, RNG state).
                 It is the commit point of an epoch: a kill -9 at any moment loses at most the
                 epoch in progress, and `--resume` continues with the next one.
  best.pt        weights + metadata of the epoch with the best validation segm AP (no train_state);
                 without a validation AP (no split, or one without instances) the latest epoch
  metrics.jsonl  one JSON line per finished epoch (losses, val metrics, lr, seconds), rewritten
                 atomically from the records kept in last.pt.
The one entry point is the `cellseg train` command. Multi-GPU / multi-process: run it under
`torchrun --nproc-per-node N -m cellseg train ...`; with WORLD_SIZE > 1 each process trains on its
DistributedSampler shard (batch_size is per process) inside DistributedDataParallel (nccl on CUDA,
gloo on CPU); rank 0 alone evaluates and writes.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cellseg.checkpoint import Checkpoint, load_checkpoint, make_metadata, save_checkpoint, weights_hash
from cellseg.config import ARCHS, SCHEDULERS, ModelSpec, TrainConfig
from cellseg.data.dataset import CellDataset, SampleStats, collate, scan_samples
from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs, read_sample, split_train_val
from cellseg.device import resolve_device
from cellseg.errors import InputError, OutputError, OutputExistsError, TrainingError
from cellseg.fileio import atomic_write_json, atomic_write_text
from cellseg.model import build_model, spec_from_data

METRIC_KEYS = ("AP", "AP50", "AP75")


# ---------------------------------------------------------------------------------------- helpers
def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


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
            loss_words = f" loss {loss:.3f}" if math.isfinite(loss) else ""
            print(f"{self.title} {done}/{self.total}{loss_words} elapsed {elapsed:.0f}s eta {eta:.0f}s",
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
    """Predict every sample at native scale through the inference pipeline (Predictor over the
    live model, so validation scores exactly what `cellseg infer` would produce) and score with
    cellseg.evaluate (segm + bbox AP/AP50/AP75 at maxDets sized from the GT).
    Leaves the model in eval mode."""
    from cellseg.backends.torch_backend import TorchBackend
    from cellseg.evaluate import evaluate_coco
    from cellseg.pipeline import Predictor

    predictor = Predictor(spec, model, TorchBackend(model, device), device)
    samples = [read_sample(Path(d), spec.class_names) for d in sample_dirs]
    results: list[dict] = []
    bar = _Progress(len(samples), "validation", progress)
    for image_id, s in enumerate(samples, start=1):
        results.extend(predictor.predict_coco(s.image, image_id))
        bar.update(image_id, float("nan"))
    bar.close()
    return evaluate_coco(build_gt(samples, spec), results)


def _summary(metrics: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return _finite_or_none({t: {k: m.get(k) for k in (*METRIC_KEYS, "per_class", "max_dets")}
                            for t, m in metrics.items()})


# ---------------------------------------------------------------------------------------- checks
def check_config(cfg: TrainConfig) -> None:
    """Refuse settings no run can use, before any work, naming the option."""
    def refuse(option: str, value: Any, need: str) -> None:
        raise InputError(f"{option} {value}: {need}")

    if cfg.arch not in ARCHS:
        refuse("--arch", cfg.arch, f"unknown architecture (choose from {', '.join(ARCHS)})")
    if cfg.epochs < 1:
        refuse("--epochs", cfg.epochs, "must be at least 1 (with no epoch nothing would be trained)")
    if cfg.batch_size < 1:
        refuse("--batch-size", cfg.batch_size, "must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        refuse("--lr", cfg.lr, "must be a positive number")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        refuse("--weight-decay", cfg.weight_decay, "must be a number >= 0")
    if not (0.0 <= cfg.val_fraction < 1.0):
        refuse("--val-fraction", cfg.val_fraction, "must lie in [0, 1)")
    if not (math.isfinite(cfg.scale) and cfg.scale > 0):
        refuse("--scale", cfg.scale, "must be a positive number")
    for option, value in (("--crop-size", cfg.crop_size), ("--workers", cfg.workers),
                          ("--max-iters-per-epoch", cfg.max_iters_per_epoch)):
        if value < 0:
            refuse(option, value, "must be at least 0")
    if cfg.warmup_iters is not None and cfg.warmup_iters < 0:
        refuse("--warmup-iters", cfg.warmup_iters, "must be at least 0")
    unknown = sorted(k for k, _ in cfg.model_overrides if k not in ModelSpec.__dataclass_fields__)
    if unknown:
        refuse("--set", ", ".join(unknown), "unknown model setting (a ModelSpec field, e.g. box_score_thresh)")
    if cfg.scheduler not in SCHEDULERS:
        refuse("--scheduler", repr(cfg.scheduler), f"unknown scheduler (choose from {', '.join(SCHEDULERS)})")


def _check_run_dir_writable(run_dir: Path) -> None:
    """An unwritable run folder fails now, not after an epoch's compute. The probe goes to the
    folder or, while it does not exist yet, to its nearest existing parent, so nothing is left."""
    probe_in = run_dir
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputError(f"{run_dir}: cannot be a run folder ({probe_in} is not a folder)")
    try:
        with tempfile.TemporaryFile(dir=probe_in):
            pass
    except OSError as err:
        raise OutputError(f"{run_dir}: run folder is not writable ({err.strerror or err})") from None


# ---------------------------------------------------------------------------------------- fit
def _lr_lambda(kind: str, total_iters: int, warmup_iters: int):
    if kind not in SCHEDULERS:
        raise InputError(f"unknown scheduler {kind!r} (choose from {', '.join(SCHEDULERS)})")
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


def _read_config(run_dir: Path, cfg: TrainConfig) -> TrainConfig:
    path = run_dir / "config.json"
    try:
        old = TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise TrainingError(f"{path}: cannot read the run's config to resume ({err})") from None
    # Runtime choices may change on resume; what defines the run (data, arch, schedule) may not.
    return dataclasses.replace(old, device=cfg.device, workers=cfg.workers, progress=cfg.progress,
                               cache=cfg.cache, resume=True)


def _run_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The config this run follows: the stored one on --resume; a new run never replaces one."""
    last_path = run_dir / "last.pt"
    if cfg.resume:
        if not last_path.is_file():
            raise TrainingError(f"{last_path}: not found, nothing to resume (drop --resume to start a new run)")
        cfg = _read_config(run_dir, cfg)
        check_config(cfg)
    elif last_path.exists():
        raise OutputExistsError(f"{last_path}: a run already exists in {run_dir} "
                                f"(pass --resume to continue it, or choose another --out)")
    return cfg


def fit(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the path of best.pt. See the module docstring."""
    check_config(cfg)
    rank, world, local_rank = _dist_env()
    run_dir = Path(cfg.out)
    cfg = _run_config(cfg, run_dir)
    _check_run_dir_writable(run_dir)
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


@dataclass
class _Data:
    root: Path
    class_names: tuple[str, ...]
    train: list[SampleStats]
    val: list[SampleStats]

    @property
    def val_instances(self) -> int:
        return sum(s.instances for s in self.val)


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    spec: ModelSpec
    core: nn.Module  # the model itself (what is saved and evaluated)
    model: nn.Module  # what is trained: core, or DistributedDataParallel(core)
    freeze_bn: bool
    train_ds: CellDataset
    sampler: DistributedSampler
    loader: DataLoader
    iters: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    start_epoch: int = 1
    best_ap: float | None = None
    best_epoch: int = 0
    records: list[dict] = dataclasses.field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def progress(self) -> bool:
        return self.cfg.progress and self.is_main


def _setup_data(cfg: TrainConfig, progress: bool) -> _Data:
    """Split the samples and read every one of them once, training and validation alike."""
    root = find_train_root(cfg.data)
    dirs = list_sample_dirs(root)
    class_names = class_names_of(root)
    train_ids, val_ids = split_train_val([d.name for d in dirs], cfg.val_fraction, cfg.seed)
    if not train_ids:
        raise TrainingError(f"{root}: the training split is empty")
    by_id = {d.name: d for d in dirs}
    ordered = [by_id[i] for i in (*train_ids, *val_ids)]
    bar = _Progress(len(ordered), "checking samples", progress)
    try:
        stats = scan_samples(ordered, class_names, on_sample=lambda i: bar.update(i, float("nan")))
    finally:
        bar.close()
    data = _Data(root, class_names, stats[:len(train_ids)], stats[len(train_ids):])
    if progress and data.val and data.val_instances == 0:
        print(f"the validation split ({len(data.val)} images) has no instances: validation AP is undefined, "
              f"so the latest epoch counts as best", file=sys.stderr, flush=True)
    return data


def _spec_from_training_data(cfg: TrainConfig, data: _Data) -> ModelSpec:
    sizes = [s.object_sizes for s in data.train]
    most = max(s.instances for s in data.train)
    density = max(s.instances * 1e6 / (s.height * s.width) for s in data.train)
    overrides = dict(cfg.model_overrides)
    density = float(overrides.pop("max_instances_per_mpx", density))
    return spec_from_data(cfg.arch, data.class_names, tuple(range(1, len(data.class_names) + 1)),
                          np.concatenate(sizes), most, scale=cfg.scale, max_instances_per_mpx=density,
                          **overrides)


def _build_model(cfg: TrainConfig, data: _Data, ckpt: Checkpoint | None, rank: int) -> tuple[ModelSpec, nn.Module]:
    """The model of the checkpoint being resumed, or a new one sized from the training data."""
    if ckpt is not None:
        model = build_model(ckpt.spec)
        model.load_state_dict(ckpt.state_dict)
        return ckpt.spec, model
    torch.manual_seed(cfg.seed + rank)  # before building: the random init is part of the run
    random.seed(cfg.seed + rank)
    spec = _spec_from_training_data(cfg, data)
    return spec, build_model(spec, None if cfg.weights in ("", "none") else cfg.weights)


def _build_run(cfg: TrainConfig, run_dir: Path, device: torch.device, rank: int, world: int,
               data: _Data, ckpt: Checkpoint | None) -> _Run:
    """Model, data loader, optimizer, LR schedule and AMP scaler of a new or resumed run."""
    spec, core = _build_model(cfg, data, ckpt, rank)
    freeze_bn = cfg.weights not in ("", "none") and spec.arch != "maskrcnn_resnet50_fpn_v2"
    if freeze_bn:
        _freeze_backbone_bn(core)
    core.to(device)
    model = core
    if world > 1:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    train_ds = CellDataset([s.sample_dir for s in data.train], data.class_names, augment=True,
                           crop_size=cfg.crop_size, seed=cfg.seed, cache=cfg.cache)
    # DistributedSampler with one replica is a seeded, epoch-dependent shuffle: a resumed run
    # sees the same order as an uninterrupted one.
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    iters = len(loader) if cfg.max_iters_per_epoch <= 0 else min(len(loader), cfg.max_iters_per_epoch)
    warmup = cfg.warmup_iters if cfg.warmup_iters is not None else min(1000, iters)
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.scheduler, iters * cfg.epochs, warmup))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return _Run(cfg, run_dir, device, rank, world, spec, core, model, freeze_bn, train_ds, sampler, loader, iters,
                optimizer, scheduler, scaler)


def _resume(run: _Run, ckpt: Checkpoint) -> None:
    """Carry optimizer, schedule, scaler, records and RNG over from last.pt."""
    ts = ckpt.train_state
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    if run.scaler is not None and ts.get("scaler"):
        run.scaler.load_state_dict(ts["scaler"])
    run.start_epoch = int(ts["epoch"]) + 1
    run.best_ap, run.best_epoch = ts.get("best_ap"), int(ts.get("best_epoch", 0))
    run.records = list(ts.get("records", []))
    if run.is_main:
        _set_rng_state(ts["rng"])
        _repair_run_dir(ckpt, run.run_dir, run.records)
    else:
        torch.manual_seed(run.cfg.seed * 1000 + run.start_epoch * 10 + run.rank)
    if run.progress:
        print(f"resuming {run.run_dir} at epoch {run.start_epoch}/{run.cfg.epochs}", file=sys.stderr, flush=True)


def _fit(cfg: TrainConfig, run_dir: Path, device: torch.device, rank: int, world: int) -> Path:
    data = _setup_data(cfg, cfg.progress and rank == 0)
    ckpt = load_checkpoint(run_dir / "last.pt") if cfg.resume else None
    if ckpt is not None and ckpt.train_state is None:
        raise TrainingError(f"{run_dir / 'last.pt'}: has no train_state, cannot resume from it")
    run = _build_run(cfg, run_dir, device, rank, world, data, ckpt)
    if ckpt is not None:
        _resume(run, ckpt)
    elif run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict(), indent=2)
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses = _train_epoch(run, epoch)
        if run.is_main:
            _validate_and_checkpoint(run, data, epoch, losses, t0)
        if dist.is_initialized():
            dist.barrier()
    return _finish(run)


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    _set_train_mode(run.model, run.core, run.freeze_bn)
    return train_one_epoch(run.model, run.optimizer, run.loader, run.device, epoch, run.scaler, run.iters,
                           run.progress, run.scheduler, title=f"epoch {epoch}/{run.cfg.epochs}")


def _validate_and_checkpoint(run: _Run, data: _Data, epoch: int, losses: dict[str, float], t0: float) -> None:
    """Score the epoch on the validation split, then commit it: last.pt, best.pt, metrics.jsonl."""
    train_seconds = time.perf_counter() - t0
    metrics = None
    if data.val_instances:  # without instances AP is undefined: nothing to score
        metrics = _summary(evaluate(run.core, [s.sample_dir for s in data.val], run.device, run.spec))
    ap = metrics["segm"]["AP"] if metrics else None
    improved = run.best_epoch == 0 or ap is None or run.best_ap is None or ap > run.best_ap
    if improved:
        run.best_ap, run.best_epoch = ap, epoch
    record = _finite_or_none({"epoch": epoch, "losses": losses, "val": metrics,
                              "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": train_seconds,
                              "seconds": time.perf_counter() - t0})
    run.records.append(record)
    cfg = run.cfg
    training = _finite_or_none({
        "data": str(data.root), "n_train": len(data.train), "n_val": len(data.val), "seed": cfg.seed,
        "epochs_planned": cfg.epochs, "batch_size": cfg.batch_size, "world_size": run.world, "lr": cfg.lr,
        "weights": cfg.weights, "crop_size": cfg.crop_size, "max_iters_per_epoch": cfg.max_iters_per_epoch,
        "epoch": epoch, "val": metrics, "best_epoch": run.best_epoch, "best_val_segm_AP": run.best_ap,
        "best_val": run.records[run.best_epoch - 1]["val"] if run.best_epoch else None})
    train_state = {"epoch": epoch, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                   "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                   "best_ap": run.best_ap, "best_epoch": run.best_epoch, "records": run.records, "rng": _rng_state()}
    state = {k: v.detach().cpu() for k, v in run.core.state_dict().items()}
    # last.pt first: it is the commit point; best.pt and metrics.jsonl are re-derived from it by
    # _repair_run_dir if we die in between.
    save_checkpoint(run.run_dir / "last.pt", state, make_metadata(run.spec, training), train_state)
    if improved:
        save_checkpoint(run.run_dir / "best.pt", state, make_metadata(run.spec, training))
    _write_metrics(run.run_dir, run.records)
    if run.progress:
        print(f"epoch {epoch}/{cfg.epochs}: loss {losses['loss']:.4f}, {_val_words(data, ap)} "
              f"(best epoch {run.best_epoch}), {record['seconds']:.0f} s", file=sys.stderr, flush=True)


def _val_words(data: _Data, ap: float | None) -> str:
    if not data.val:
        return "no validation split"
    if not data.val_instances:
        return "val segm AP undefined (the validation split has no instances)"
    return f"val segm AP {ap:.4f}" if ap is not None else "val segm AP undefined"


def _finish(run: _Run) -> Path:
    best_path = run.run_dir / "best.pt"
    if run.is_main and not best_path.exists():  # e.g. resumed a run that had already finished
        _repair_run_dir(load_checkpoint(run.run_dir / "last.pt"), run.run_dir, run.records)
    return best_path


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _repair_run_dir(ckpt: Checkpoint, run_dir: Path, records: list[dict]) -> None:
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
