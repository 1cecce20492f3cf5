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
Time budget (cfg.time_budget_s > 0): the run's total iterations, and so its cosine schedule, are
fitted to the wall time left (measured seconds per iteration, and per epoch what validation and
checkpoints cost beyond the iterations), first after CALIBRATION_ITERS timed iterations, then
after every epoch; an epoch ends early when only its closing validation still fits. The plan and
the time spent are in last.pt, so --resume goes on within the same budget.
Recipes (cellseg.recipes) only fill TrainConfig; this module records `recipe_record(cfg)` in
every checkpoint's metadata.training.recipe.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cellseg.checkpoint import Checkpoint, load_checkpoint, make_metadata, save_checkpoint, weights_hash
from cellseg.config import ARCHS, SCHEDULERS, SPLITS, ModelSpec, TrainConfig
from cellseg.data.dataset import (AUGMENTS, CellDataset, RepeatFactorSampler, SampleStats, collate, repeat_factors,
                                  scan_samples)
from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs, read_sample, split_train_val
from cellseg.device import resolve_device
from cellseg.errors import InputError, OutputError, OutputExistsError, TrainingError
from cellseg.fileio import atomic_write_json, atomic_write_text
from cellseg.model import build_model, spec_from_data
from cellseg.recipes import RECIPES, recipe_record

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
                    title: str | None = None, after_iteration: Callable[[int], bool] | None = None
                    ) -> dict[str, float]:
    """One pass over `loader` (at most `max_iters` iterations when > 0); the scheduler steps
    every iteration. `after_iteration(done)` is called after each iteration and ends the epoch
    early by returning True (the time budget). Returns the mean of each loss and of their sum
    ("loss"), averaged over processes when distributed. The caller sets train mode."""
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
            if after_iteration is not None and after_iteration(done):
                break
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
    return _finite_or_none({t: {k: m.get(k) for k in (*METRIC_KEYS, "per_class", "per_class_AP50", "max_dets")}
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
    for option, seed in (("--seed", cfg.seed), ("--split-seed", cfg.split_seed)):
        if seed is not None and seed < 0:
            refuse(option, seed, "must be at least 0")
    if cfg.warmup_iters is not None and cfg.warmup_iters < 0:
        refuse("--warmup-iters", cfg.warmup_iters, "must be at least 0")
    unknown = sorted(k for k, _ in cfg.model_overrides if k not in ModelSpec.__dataclass_fields__)
    if unknown:
        refuse("--set", ", ".join(unknown), "unknown model setting (a ModelSpec field, e.g. box_score_thresh)")
    if cfg.split not in SPLITS:
        refuse("--split", repr(cfg.split), f"unknown split (choose from {', '.join(SPLITS)})")
    if cfg.scheduler not in SCHEDULERS:
        refuse("--scheduler", repr(cfg.scheduler), f"unknown scheduler (choose from {', '.join(SCHEDULERS)})")
    if cfg.recipe not in RECIPES:
        refuse("--recipe", cfg.recipe, f"unknown recipe (choose from {', '.join(RECIPES)})")
    if cfg.augment not in AUGMENTS:
        refuse("--augment", cfg.augment, f"unknown augmentation (choose from {', '.join(AUGMENTS)})")
    if not (math.isfinite(cfg.repeat_factor_threshold) and 0.0 <= cfg.repeat_factor_threshold <= 1.0):
        refuse("--repeat-factor-threshold", cfg.repeat_factor_threshold, "must lie in [0, 1] (0 = off)")
    if not (math.isfinite(cfg.time_budget_s) and cfg.time_budget_s >= 0):
        refuse("--time-budget", cfg.time_budget_s, "must be a positive duration (0 = none)")
    if cfg.time_budget_s > 0 and _dist_env()[1] > 1:
        refuse("--time-budget", f"{cfg.time_budget_s:g}s", "is not supported under torchrun (each process "
               "would fit its own schedule); give --epochs instead")


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
# A warmup longer than this share of the run would spend the run at a small LR: a recipe's
# 200-iteration warmup is 10 % of a 2-hour CPU run but nearly all of a 20-minute one.
WARMUP_MAX_SHARE = 0.1


def warmup_length(warmup_iters: int, total_iters: int) -> int:
    """The warmup actually used: `warmup_iters`, at most WARMUP_MAX_SHARE of the run's iterations."""
    if warmup_iters <= 0:
        return 0
    return min(int(warmup_iters), max(1, round(WARMUP_MAX_SHARE * total_iters)))


def _lr_lambda(kind: str, total_iters: int | Callable[[], int], warmup_iters: int):
    """LR factor per iteration. `total_iters` may be a function: a time-budgeted run refits its
    length to the measured speed, and the schedule (warmup included) follows."""
    if kind not in SCHEDULERS:
        raise InputError(f"unknown scheduler {kind!r} (choose from {', '.join(SCHEDULERS)})")
    total_of = total_iters if callable(total_iters) else (lambda: total_iters)

    def factor(it: int) -> float:
        total = max(1, int(total_of()))
        warmup = warmup_length(warmup_iters, total)
        warm = min(1.0, 0.001 + 0.999 * it / warmup) if warmup > 0 else 1.0
        if kind == "multistep":
            return warm * 0.1 ** sum(it >= m for m in (int(total * 2 / 3), int(total * 8 / 9)))
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))
    return factor


# ---------------------------------------------------------------------------------------- time budget
CALIBRATION_ITERS = 10  # iterations timed before the first fit of the schedule
BUDGET_MARGIN = 0.03  # share of the budget kept back for what the estimates miss (checkpoint writes)
FIRST_VALIDATION_COST = 2.5  # first validation's seconds per image / training's (see _validation_estimate)


@dataclass
class _Clock:
    """Wall time of a budgeted run, and the measured cost of an iteration and of a validation.
    `spent_before` is the committed time of earlier processes of the same run (resume)."""

    budget_s: float
    spent_before: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    iter_times: list[float] = dataclasses.field(default_factory=list)
    val_times: list[float] = dataclasses.field(default_factory=list)
    last_tick: float | None = None

    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget_s * (1.0 - BUDGET_MARGIN) - self.elapsed()

    def tick(self) -> None:
        """After an iteration: its time since the previous tick (or the epoch's start)."""
        now = time.perf_counter()
        if self.last_tick is not None:
            self.iter_times.append(now - self.last_tick)
        self.last_tick = now

    def seconds_per_iter(self) -> float | None:
        """Median: robust to the first iteration of an epoch, which also starts the loader."""
        return float(np.median(self.iter_times)) if self.iter_times else None


def fit_total_iters(done_iters: int, iters_per_epoch: int, cap_iters: int, remaining_s: float,
                    iter_s: float, val_s: float) -> int:
    """The largest total iteration count whose remaining iterations, plus one validation at every
    epoch end and one at the end of a last partial epoch, fit in `remaining_s`; at most
    `cap_iters`, at least `done_iters`."""
    def cost(extra: int) -> float:
        end = done_iters + extra
        validations = end // iters_per_epoch - done_iters // iters_per_epoch + (end % iters_per_epoch != 0)
        return extra * iter_s + validations * val_s

    lo, hi = 0, max(0, cap_iters - done_iters)
    while lo < hi:  # cost grows with extra: binary search for the last extra that fits
        mid = (lo + hi + 1) // 2
        if cost(mid) <= remaining_s:
            lo = mid
        else:
            hi = mid - 1
    return done_iters + lo


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


def fit(cfg: TrainConfig, started_at: float | None = None) -> Path:
    """Train as `cfg` says; return the path of best.pt. See the module docstring.
    `started_at`: time.perf_counter() when the command started (a time budget counts from
    there, imports included); default now."""
    started_at = time.perf_counter() if started_at is None else started_at
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
        return _fit(cfg, run_dir, device, rank, world, started_at)
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
class _Plan:
    """The run's length in iterations: epochs x iterations per epoch, or what fits the budget."""

    cap_iters: int  # epochs x iterations per epoch
    total_iters: int


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
    sampler: DistributedSampler | RepeatFactorSampler
    loader: DataLoader
    iters: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    plan: _Plan
    clock: _Clock | None = None  # only with a time budget
    start_epoch: int = 1
    best_ap: float | None = None
    best_epoch: int = 0
    records: list[dict] = dataclasses.field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def done_iters(self) -> int:
        """Iterations trained so far in the whole run (the scheduler steps once per iteration)."""
        return int(self.scheduler.last_epoch)

    @property
    def progress(self) -> bool:
        return self.cfg.progress and self.is_main


def split_seed_of(cfg: TrainConfig) -> int:
    """The seed of the run's validation split: --split-seed, or --seed when not given."""
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def _setup_data(cfg: TrainConfig, progress: bool) -> _Data:
    """Read every sample once, then split them (by source image, stratified by class unless the
    run says otherwise)."""
    root = find_train_root(cfg.data)
    dirs = list_sample_dirs(root)
    class_names = class_names_of(root)
    bar = _Progress(len(dirs), "checking samples", progress)
    try:
        stats = scan_samples(dirs, class_names, on_sample=lambda i: bar.update(i, float("nan")))
    finally:
        bar.close()
    by_id = {d.name: s for d, s in zip(dirs, stats)}
    counts = None
    if cfg.split == "classes":
        counts = {i: np.bincount(s.labels if s.labels is not None else np.zeros(0, np.int64),
                                 minlength=len(class_names) + 1)[1:] for i, s in by_id.items()}
    train_ids, val_ids = split_train_val(list(by_id), cfg.val_fraction, split_seed_of(cfg), counts)
    if not train_ids:
        raise TrainingError(f"{root}: the training split is empty")
    data = _Data(root, class_names, [by_id[i] for i in train_ids], [by_id[i] for i in val_ids])
    if progress and data.val and data.val_instances == 0:
        print(f"the validation split ({len(data.val)} images) has no instances: validation AP is undefined, "
              f"so the latest epoch counts as best", file=sys.stderr, flush=True)
    missing = _classes_missing_from_val(data)
    if progress and data.val_instances and missing:
        print(f"the validation split has no instance of {', '.join(missing)}: validation AP averages the "
              f"other classes only (another --seed or --val-fraction gives another split)", file=sys.stderr, flush=True)
    return data


def _classes_missing_from_val(data: _Data) -> list[str]:
    seen = set()
    for s in data.val:
        if s.labels is not None:
            seen.update(int(v) for v in s.labels)
    return [name for i, name in enumerate(data.class_names, start=1) if i not in seen]


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
                           crop_size=cfg.crop_size, seed=cfg.seed, cache=cfg.cache, mode=cfg.augment)
    sampler = _train_sampler(cfg, data, train_ds, rank, world)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    iters = len(loader) if cfg.max_iters_per_epoch <= 0 else min(len(loader), cfg.max_iters_per_epoch)
    warmup = cfg.warmup_iters if cfg.warmup_iters is not None else min(1000, iters)
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    plan = _Plan(iters * cfg.epochs, iters * cfg.epochs)
    schedule = _lr_lambda(cfg.scheduler, lambda: plan.total_iters, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return _Run(cfg, run_dir, device, rank, world, spec, core, model, freeze_bn, train_ds, sampler, loader, iters,
                optimizer, scheduler, scaler, plan)


def _train_sampler(cfg: TrainConfig, data: _Data, train_ds: CellDataset, rank: int,
                   world: int) -> DistributedSampler | RepeatFactorSampler:
    """Seeded, epoch-dependent order (a resumed run sees the same order as an uninterrupted
    one); with a repeat-factor threshold, crops holding rare classes come more often."""
    if cfg.repeat_factor_threshold > 0:
        labels = [s.labels if s.labels is not None else np.zeros(0, np.int64) for s in data.train]
        factors = repeat_factors(labels, len(data.class_names), cfg.repeat_factor_threshold)
        return RepeatFactorSampler(factors, num_replicas=world, rank=rank, seed=cfg.seed)
    return DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)


def _resume(run: _Run, ckpt: Checkpoint) -> None:
    """Carry optimizer, schedule, scaler, records and RNG over from last.pt."""
    ts = ckpt.train_state
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    if run.scaler is not None and ts.get("scaler"):
        run.scaler.load_state_dict(ts["scaler"])
    run.start_epoch = int(ts["epoch"]) + 1
    run.best_ap, run.best_epoch = ts.get("best_ap"), int(ts.get("best_epoch", 0))
    run.plan.total_iters = int(ts.get("total_iters", run.plan.total_iters))
    if run.clock is not None:
        run.clock.spent_before = float(ts.get("elapsed_s", 0.0))
        run.clock.val_times = [float(v) for v in ts.get("val_seconds", [])]
        if ts.get("iter_seconds") is not None:  # the speed measured before: refit the plan at once
            run.clock.iter_times = [float(ts["iter_seconds"])]
    run.records = list(ts.get("records", []))
    if run.is_main:
        _set_rng_state(ts["rng"])
        _repair_run_dir(ckpt, run.run_dir, run.records)
    else:
        torch.manual_seed(run.cfg.seed * 1000 + run.start_epoch * 10 + run.rank)
    if run.progress:
        print(f"resuming {run.run_dir} at epoch {run.start_epoch}/{run.cfg.epochs}", file=sys.stderr, flush=True)


def _fit(cfg: TrainConfig, run_dir: Path, device: torch.device, rank: int, world: int, started_at: float) -> Path:
    clock = _Clock(cfg.time_budget_s, start=started_at) if cfg.time_budget_s > 0 else None
    data = _setup_data(cfg, cfg.progress and rank == 0)
    ckpt = load_checkpoint(run_dir / "last.pt") if cfg.resume else None
    if ckpt is not None and ckpt.train_state is None:
        raise TrainingError(f"{run_dir / 'last.pt'}: has no train_state, cannot resume from it")
    run = _build_run(cfg, run_dir, device, rank, world, data, ckpt)
    run.clock = clock
    if ckpt is not None:
        _resume(run, ckpt)
        _refit_plan(run, data)  # the time left is what the earlier processes did not spend
    elif run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict(), indent=2)
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        if run.done_iters >= run.plan.total_iters:  # the budget's schedule has run its course
            break
        t0 = time.perf_counter()
        timed_before = len(run.clock.iter_times) if run.clock is not None else 0
        losses = _train_epoch(run, data, epoch)
        if run.is_main:
            _validate_and_checkpoint(run, data, epoch, losses, t0)
        if dist.is_initialized():
            dist.barrier()
        if run.clock is not None:
            # What an epoch costs beyond its iterations: validation, checkpoint writes, loader start.
            run.clock.val_times.append(time.perf_counter() - t0 - sum(run.clock.iter_times[timed_before:]))
        _refit_plan(run, data)
    return _finish(run)


def _train_epoch(run: _Run, data: _Data, epoch: int) -> dict[str, float]:
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    _set_train_mode(run.model, run.core, run.freeze_bn)
    max_iters = min(run.iters, run.plan.total_iters - run.done_iters)
    after = _budget_watch(run, data) if run.clock is not None else None
    return train_one_epoch(run.model, run.optimizer, run.loader, run.device, epoch, run.scaler, max_iters,
                           run.progress, run.scheduler, title=f"epoch {epoch}/{run.cfg.epochs}",
                           after_iteration=after)


def _budget_watch(run: _Run, data: _Data) -> Callable[[int], bool]:
    """Per-iteration check of a budgeted run: times the iteration, fits the schedule once the
    first iterations are timed, and ends the epoch when the plan is done or when the time left
    holds only one more iteration and the closing validation."""
    clock = run.clock
    assert clock is not None
    clock.last_tick = time.perf_counter()

    def after(done: int) -> bool:
        clock.tick()
        if len(clock.iter_times) == CALIBRATION_ITERS:
            _refit_plan(run, data)
        if run.done_iters >= run.plan.total_iters:
            return True
        if clock.remaining() < _validation_estimate(run, data) + (clock.seconds_per_iter() or 0.0):
            run.plan.total_iters = run.done_iters  # out of time before the plan's end: the run ends here
            return True
        return False
    return after


def _validation_estimate(run: _Run, data: _Data) -> float:
    """Seconds an epoch costs beyond its iterations (validation, checkpoint writes, loader
    start): the largest of the last two measured; before any, 2.5 times as long as training on as
    many images as the validation split holds. An untrained model's many low-score detections
    make its first validation slow: on CoNSeP it took 2.0-2.5x that training time (64- and
    256-channel FPN), and an underestimate here is what makes a short budget overrun."""
    clock = run.clock
    if clock is None:
        return 0.0
    if clock.val_times:
        return max(clock.val_times[-2:])
    per_image = (clock.seconds_per_iter() or 0.0) / max(1, run.cfg.batch_size)
    return FIRST_VALIDATION_COST * len(data.val) * per_image


def _refit_plan(run: _Run, data: _Data) -> None:
    """Fit the run's total iterations (and so the cosine length) to the time left."""
    clock = run.clock
    if clock is None or clock.seconds_per_iter() is None:
        return
    run.plan.total_iters = fit_total_iters(run.done_iters, run.iters, run.plan.cap_iters, clock.remaining(),
                                           clock.seconds_per_iter(), _validation_estimate(run, data))


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
                              "lr": run.optimizer.param_groups[0]["lr"], "iterations": run.done_iters,
                              "planned_iterations": run.plan.total_iters, "train_seconds": train_seconds,
                              "seconds": time.perf_counter() - t0})
    run.records.append(record)
    cfg = run.cfg
    training = _finite_or_none({
        "data": str(data.root), "n_train": len(data.train), "n_val": len(data.val), "seed": cfg.seed, "split": cfg.split,
        "split_seed": split_seed_of(cfg), "val_samples": [s.sample_dir.name for s in data.val],
        "epochs_planned": cfg.epochs, "batch_size": cfg.batch_size, "world_size": run.world, "lr": cfg.lr,
        "weights": cfg.weights, "crop_size": cfg.crop_size, "max_iters_per_epoch": cfg.max_iters_per_epoch,
        "recipe": recipe_record(cfg), "augment": cfg.augment, "repeat_factor_threshold": cfg.repeat_factor_threshold,
        "time_budget_s": cfg.time_budget_s, "iterations": run.done_iters, "planned_iterations": run.plan.total_iters,
        "epoch": epoch, "val": metrics, "best_epoch": run.best_epoch, "best_val_segm_AP": run.best_ap,
        "best_val": _record_of(run, run.best_epoch)["val"] if run.best_epoch else None})
    train_state = {"epoch": epoch, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                   "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                   "best_ap": run.best_ap, "best_epoch": run.best_epoch, "records": run.records, "rng": _rng_state(),
                   "total_iters": run.plan.total_iters}
    if run.clock is not None:
        # The previous epochs' costs beyond their iterations; this one's is known after the writes.
        train_state.update(elapsed_s=run.clock.elapsed(), val_seconds=list(run.clock.val_times),
                           iter_seconds=run.clock.seconds_per_iter())
    state = {k: v.detach().cpu() for k, v in run.core.state_dict().items()}
    # last.pt first: it is the commit point; best.pt and metrics.jsonl are re-derived from it by
    # _repair_run_dir if we die in between.
    save_checkpoint(run.run_dir / "last.pt", state, make_metadata(run.spec, training), train_state)
    if improved:
        save_checkpoint(run.run_dir / "best.pt", state, make_metadata(run.spec, training))
    _write_metrics(run.run_dir, run.records)
    if run.progress:
        print(f"epoch {epoch}/{cfg.epochs}: loss {losses['loss']:.4f}, {_val_words(data, metrics)} "
              f"(best epoch {run.best_epoch}), {record['seconds']:.0f} s{_budget_words(run)}",
              file=sys.stderr, flush=True)


def _record_of(run: _Run, epoch: int) -> dict:
    return next(r for r in run.records if r["epoch"] == epoch)


def _val_words(data: _Data, metrics: dict[str, Any] | None) -> str:
    if not data.val:
        return "no validation split"
    if not data.val_instances:
        return "val segm AP undefined (the validation split has no instances)"
    segm = (metrics or {}).get("segm") or {}
    if segm.get("AP") is None:
        return "val segm AP undefined"
    per_class = ", ".join(f"{name} {_fmt(ap)}/{_fmt(segm.get('per_class_AP50', {}).get(name))}"
                          for name, ap in segm.get("per_class", {}).items())
    return f"val segm AP {segm['AP']:.4f} AP50 {_fmt(segm.get('AP50'))} (per class AP/AP50: {per_class})"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _budget_words(run: _Run) -> str:
    if run.clock is None:
        return ""
    return (f"; budget: {run.clock.elapsed() / 60:.1f} of {run.clock.budget_s / 60:.1f} min, "
            f"iteration {run.done_iters} of {run.plan.total_iters}")


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
