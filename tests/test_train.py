"""cellseg.train + cellseg.data.dataset: tiny real training runs on synthetic HW3 data."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cellseg.train as train_mod
from cellseg.checkpoint import load_checkpoint, weights_hash
from cellseg.config import TrainConfig
from cellseg.data.dataset import CellDataset, augment_sample, boxes_from_masks, collate
from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs
from cellseg.data.synth import synthesize
from cellseg.errors import OutputExistsError, TrainingError
from cellseg.train import fit

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=64,
                  rpn_post_nms_top_n_test=64, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
                  box_detections_per_img=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "data", n_train=6, n_test=0, seed=1, size=64)


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch="maskrcnn_resnet18_fpn", epochs=1, batch_size=2,
                val_fraction=0.3, device="cpu", max_iters_per_epoch=2, seed=0,
                extra={"model": TINY_MODEL, "progress": False})
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ dataset
def test_boxes_from_masks_give_one_pixel_instances_width_one():
    masks = np.zeros((2, 8, 9), bool)
    masks[0, 3, 4] = True
    masks[1, 1:5, 2:8] = True
    assert boxes_from_masks(masks).tolist() == [[4, 3, 5, 4], [2, 1, 8, 5]]
    assert boxes_from_masks(np.zeros((0, 4, 4), bool)).shape == (0, 4)


def test_augmentation_keeps_boxes_on_masks_and_drops_cropped_away_instances():
    rng = np.random.default_rng(0)
    image = rng.random((40, 50, 3), dtype=np.float32)
    masks = np.zeros((3, 40, 50), bool)
    masks[0, 2:6, 2:6] = True  # top-left corner: gone in most 20 px crops
    masks[1, 18:22, 20:30] = True
    masks[2, 35:40, 45:50] = True
    labels = np.array([1, 2, 3])
    seen_counts = set()
    for seed in range(30):
        img, m, lab, boxes = augment_sample(image, masks, labels, np.random.default_rng(seed), crop_size=20)
        assert img.shape == (20, 20, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
        assert m.shape == (len(lab), 20, 20) and m.reshape(len(lab), -1).any(axis=1).all()
        np.testing.assert_array_equal(boxes, boxes_from_masks(m))
        seen_counts.add(len(lab))
    assert len(seen_counts) > 1  # some crops lose instances, some keep them
    # Without a crop, flips/rotations keep every instance and its area.
    img, m, lab, boxes = augment_sample(image, masks, labels, np.random.default_rng(3))
    assert sorted(m.sum(axis=(1, 2)).tolist()) == sorted(masks.sum(axis=(1, 2)).tolist())


def test_dataset_items_and_determinism(data):
    root = find_train_root(data)
    dirs = list_sample_dirs(root)
    names = class_names_of(root)
    plain = CellDataset(dirs, names, augment=False)
    image, target = plain[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape[1:] == image.shape[1:]
    assert target["image_id"] == 1
    aug = CellDataset(dirs, names, augment=True, seed=5, cache=True)
    a1 = aug[2]
    a2 = aug[2]  # from the cache: same sample, same (seed, epoch, index) -> same augmentation
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1]["masks"], a2[1]["masks"])
    aug.set_epoch(1)
    assert not torch.equal(aug[2][0], a1[0])
    empty = [i for i in range(len(dirs)) if plain[i][1]["boxes"].shape[0] == 0]
    assert empty, "synth writes an empty sample"
    assert aug[empty[0]][1]["masks"].shape[0] == 0
    images, targets = collate([plain[0], plain[1]])
    assert len(images) == 2 and len(targets) == 2


# ------------------------------------------------------------------------------------------ fit
def test_fit_one_epoch_writes_run_dir(data, tmp_path):
    run = tmp_path / "run"
    best = fit(tiny_cfg(data, run))
    assert best == run / "best.pt"
    assert {p.name for p in run.iterdir()} == {"best.pt", "last.pt", "metrics.jsonl", "config.json"}
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1]
    assert set(records[0]["val"]) == {"segm", "bbox"}
    assert {"AP", "AP50", "AP75"} <= set(records[0]["val"]["segm"])
    assert records[0]["losses"]["loss"] > 0
    ckpt = load_checkpoint(best)
    assert ckpt.train_state is None and ckpt.spec.box_detections_per_img == 64
    assert ckpt.spec.anchor_sizes[0] == 8 and ckpt.spec.mask_head_channels == (128, 128)
    training = ckpt.metadata["training"]
    assert training["epoch"] == 1 and training["best_epoch"] == 1 and training["seed"] == 0
    assert training["n_train"] + training["n_val"] == 6 and training["n_val"] >= 1
    assert "segm" in training["best_val"]
    last = load_checkpoint(run / "last.pt")
    assert last.train_state["epoch"] == 1 and "optimizer" in last.train_state
    assert json.loads((run / "config.json").read_text())["epochs"] == 1


def test_refuses_to_overwrite_and_to_resume_nothing(data, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(data, run))
    before = (run / "last.pt").read_bytes()
    with pytest.raises(OutputExistsError, match="--resume"):
        fit(tiny_cfg(data, run))
    assert (run / "last.pt").read_bytes() == before
    with pytest.raises(TrainingError, match="nothing to resume"):
        fit(tiny_cfg(data, tmp_path / "empty", resume=True))


def test_interrupted_run_resumes_at_epoch_2_and_matches_an_uninterrupted_one(data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    fit(tiny_cfg(data, straight, epochs=2))

    interrupted = tmp_path / "interrupted"
    real = train_mod.train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if args[4] == 2:
            raise KeyboardInterrupt  # the process dies during epoch 2
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cfg(data, interrupted, epochs=2))
    assert load_checkpoint(interrupted / "last.pt").train_state["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(interrupted)] == [1]
    monkeypatch.setattr(train_mod, "train_one_epoch", real)

    # Resume uses the run's stored config (epochs=2), whatever else the caller passes.
    fit(tiny_cfg(data, interrupted, epochs=7, resume=True))
    last = load_checkpoint(interrupted / "last.pt")
    ts = last.train_state
    assert ts["epoch"] == 2 and [r["epoch"] for r in read_metrics(interrupted)] == [1, 2]
    steps = {float(s["step"]) for s in ts["optimizer"]["state"].values()}
    assert steps == {4.0}  # 2 epochs x 2 iterations: the optimizer state was carried over
    assert ts["scheduler"]["last_epoch"] == 4
    # Same data order, augmentation, RNG and optimizer state: bit-identical to the straight run.
    assert weights_hash(last.state_dict) == weights_hash(load_checkpoint(straight / "last.pt").state_dict)


def test_resume_repairs_best_and_metrics_lost_after_last_was_written(data, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(data, run))
    (run / "best.pt").unlink()  # as if killed right after last.pt landed
    (run / "metrics.jsonl").unlink()
    best = fit(tiny_cfg(data, run, resume=True))  # nothing left to train; repairs only
    assert best.exists() and load_checkpoint(best).metadata["training"]["epoch"] == 1
    assert weights_hash(load_checkpoint(best).state_dict) == weights_hash(load_checkpoint(run / "last.pt").state_dict)
    assert [r["epoch"] for r in read_metrics(run)] == [1]


def test_no_validation_split_still_writes_best(data, tmp_path):
    run = tmp_path / "run"
    fit(tiny_cfg(data, run, val_fraction=0.0))
    assert (run / "best.pt").exists() and read_metrics(run)[0]["val"] is None


# ------------------------------------------------------------------------------------------ subprocesses
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_gloo(data, tmp_path):
    """torchrun, 2 CPU processes (gloo), one short epoch (~10 s)."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()),
           "-m", "cellseg.train", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "1",
           "--max-iters-per-epoch", "2", "--device", "cpu", "--val-fraction", "0.3",
           "--extra", json.dumps({"model": TINY_MODEL, "progress": False})]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best checkpoint:" in proc.stdout
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.metadata["training"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt.state_dict)  # saved unwrapped
    assert [r["epoch"] for r in read_metrics(run)] == [1]


def test_kill_9_loses_no_finished_epoch(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cellseg.train", str(data), "--out", str(run), "--epochs", "40",
           "--max-iters-per-epoch", "2", "--device", "cpu", "--extra",
           json.dumps({"model": TINY_MODEL, "progress": False})]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2:
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = load_checkpoint(run / "last.pt").train_state["epoch"]
    assert done >= 2
    cfg = tiny_cfg(data, run, resume=True)
    # Resume must continue at done + 1; stop it after that one epoch to keep the test short.
    real = train_mod.train_one_epoch
    calls = []

    def one_more(*args, **kwargs):
        calls.append(args[4])
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    train_mod.train_one_epoch = one_more
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(cfg)
    finally:
        train_mod.train_one_epoch = real
    assert calls[0] == done + 1
    assert load_checkpoint(run / "last.pt").train_state["epoch"] == done + 1
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, done + 2))
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_crop_path_equals_full_mask_path_and_handles_empty_samples(data):
    """The crop-local path (no full-size masks) gives exactly what cropping full masks gives."""
    from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs

    root = find_train_root(data)
    dirs = list_sample_dirs(root)
    names = class_names_of(root)
    fast = CellDataset(dirs, names, augment=True, crop_size=40, seed=3)
    slow = CellDataset(dirs, names, augment=True, crop_size=40, seed=3, cache=True)
    for i in range(len(dirs)):
        (a_img, a_t), (b_img, b_t) = fast[i], slow[i]
        assert torch.equal(a_img, b_img)
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(a_t[key], b_t[key]), (i, key)
    empty = augment_sample(np.zeros((64, 64, 3), np.float32), np.zeros((0, 64, 64), bool),
                           np.zeros(0, np.int64), np.random.default_rng(0), crop_size=32)
    assert empty[1].shape == (0, 32, 32) and empty[3].shape == (0, 4)
