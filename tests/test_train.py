"""cellseg.train + cellseg.data.dataset: tiny real training runs on synthetic HW3 data."""
from __future__ import annotations

import json
import math
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
TINY_SET = [arg for k, v in TINY_MODEL.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "data", n_train=6, n_test=0, seed=1, size=64)


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch="maskrcnn_resnet18_fpn", epochs=1, batch_size=2,
                val_fraction=0.3, device="cpu", max_iters_per_epoch=2, seed=0,
                model_overrides=tuple(TINY_MODEL.items()), progress=False)
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
    assert training["split_seed"] == 0 and len(set(training["val_samples"])) == training["n_val"]
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
           "-m", "cellseg", "train", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "1",
           "--max-iters-per-epoch", "2", "--device", "cpu", "--val-fraction", "0.3", "--quiet", *TINY_SET]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best checkpoint:" in proc.stdout
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.metadata["training"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt.state_dict)  # saved unwrapped
    assert [r["epoch"] for r in read_metrics(run)] == [1]


def test_kill_9_loses_no_finished_epoch(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cellseg", "train", str(data), "--out", str(run), "--epochs", "40",
           "--max-iters-per-epoch", "2", "--device", "cpu", "--quiet", *TINY_SET]
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


# ------------------------------------------------------------------------------------------ bad settings and data
def _invoke_train(*args):
    from typer.testing import CliRunner

    from cellseg.cli import app

    return CliRunner().invoke(app, ["train", *[str(a) for a in args]])


@pytest.mark.parametrize("option, value, words", [
    ("--batch-size", 0, "--batch-size 0"), ("--lr", -1, "--lr -1"), ("--lr", "nan", "--lr nan"),
    ("--epochs", -1, "--epochs -1"), ("--epochs", 0, "nothing would be trained"),
    ("--val-fraction", 1, "--val-fraction 1"), ("--val-fraction", -0.1, "--val-fraction -0.1"),
    ("--crop-size", -1, "--crop-size -1"), ("--workers", -2, "--workers -2"), ("--scale", 0, "--scale 0"),
    ("--scheduler", "linear", "unknown scheduler"), ("--warmup-iters", -5, "--warmup-iters -5"),
    ("--split", "tiles", "unknown split"), ("--seed", -3, "--seed -3"), ("--split-seed", -1, "--split-seed -1"), ("--arch", "resnet9000", "resnet9000"), ("--set", "no_such_setting=1", "no_such_setting"),
])
def test_impossible_settings_are_one_line_errors_before_any_work(data, tmp_path, monkeypatch, option, value, words):
    import cellseg.data.dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "read_instance_pixels", lambda *a: pytest.fail("read data"))
    res = _invoke_train(data, "--out", tmp_path / "run", "--device", "cpu", option, value)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and words in lines[0], res.output
    assert "last.pt" not in lines[0] and not (tmp_path / "run").exists()


def test_unknown_scheduler_is_refused_by_the_library_too(data, tmp_path):
    from cellseg.errors import InputError

    with pytest.raises(InputError, match="unknown scheduler"):
        fit(tiny_cfg(data, tmp_path / "run", scheduler="steps"))
    with pytest.raises(InputError, match="unknown scheduler"):
        train_mod._lr_lambda("steps", 10, 1)


def test_warmup_is_capped_at_a_tenth_of_a_short_run_and_kept_in_a_long_one():
    assert train_mod.warmup_length(200, 2078) == 200  # a 2-hour CPU run keeps the recipe's warmup
    assert train_mod.warmup_length(200, 230) == 23  # a 20-minute one does not spend it warming up
    assert train_mod.warmup_length(0, 230) == 0 and train_mod.warmup_length(5, 3) == 1
    short = train_mod._lr_lambda("cosine", 230, 200)
    assert short(23) == pytest.approx(0.5 * (1 + math.cos(math.pi * 23 / 230)))  # warm by 10 %
    assert short(11) < short(23)
    budgeted_total = [115_000]  # a budgeted run refits its length once it has timed iterations
    refit = train_mod._lr_lambda("cosine", lambda: budgeted_total[0], 200)
    assert refit(100) == pytest.approx(0.001 + 0.999 * 100 / 200, rel=1e-3)
    budgeted_total[0] = 500
    assert refit(100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 100 / 500)))


def test_cuda_without_cuda_is_a_one_line_exit_5(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = _invoke_train(data, "--out", tmp_path / "run", "--device", "cuda")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 5 and len(lines) == 1 and "--device cuda" in lines[0], res.output
    assert not (tmp_path / "run").exists()


def test_unwritable_run_folder_fails_before_any_work(data, tmp_path, monkeypatch):
    from cellseg.errors import OutputError

    monkeypatch.setattr(train_mod, "scan_samples", lambda *a, **k: pytest.fail("read data"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        fit(tiny_cfg(data, blocker / "run"))
    if os.geteuid() == 0:
        return  # root writes into read-only folders: the permission case cannot be set up
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            fit(tiny_cfg(data, locked / "run"))
    finally:
        locked.chmod(0o700)


def _copy_with_split(data: Path, dest: Path, val_fraction: float) -> tuple[Path, list[Path]]:
    """A copy of the synthetic data set and the sample folders `fit` puts in its validation split
    when the split goes by sample count only (`split="groups"`)."""
    import shutil

    from cellseg.data.hw3 import split_train_val

    shutil.copytree(data, dest)
    dirs = list_sample_dirs(find_train_root(dest))
    _, val_ids = split_train_val([d.name for d in dirs], val_fraction, 0)
    assert val_ids
    return dest, [d for d in dirs if d.name in val_ids]


def test_bad_validation_sample_fails_before_the_first_epoch(data, tmp_path, monkeypatch):
    from cellseg.errors import DataError

    copy, val_dirs = _copy_with_split(data, tmp_path / "data", 0.3)
    bad = val_dirs[0] / "image.tif"
    bad.write_bytes(b"II*\x00 truncated")
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(DataError, match="image.tif") as err:
        fit(tiny_cfg(copy, tmp_path / "run", split="groups"))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    # a label image whose shape differs from its image's
    bad.unlink()
    import shutil
    shutil.copy(data / "train" / val_dirs[0].name / "image.tif", bad)
    import tifffile
    tifffile.imwrite(val_dirs[0] / "class1.tif", np.zeros((5, 7), np.uint16))
    with pytest.raises(DataError, match="class1.tif.*shape"):
        fit(tiny_cfg(copy, tmp_path / "run", split="groups"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_validation_split_without_instances_has_its_own_message(data, tmp_path, capsys):
    copy, val_dirs = _copy_with_split(data, tmp_path / "data", 0.3)
    for d in val_dirs:
        for f in d.glob("class*.tif"):
            f.unlink()
    run = tmp_path / "run"
    fit(tiny_cfg(copy, run, progress=True, split="groups"))
    err = capsys.readouterr().err
    assert "no validation split" not in err
    assert "validation split" in err and "has no instances" in err
    assert read_metrics(run)[0]["val"] is None and (run / "best.pt").exists()
    assert load_checkpoint(run / "best.pt").metadata["training"]["n_val"] == len(val_dirs)


def test_no_validation_split_says_so(data, tmp_path, capsys):
    fit(tiny_cfg(data, tmp_path / "run", val_fraction=0.0, progress=True))
    assert "no validation split" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ config
def test_config_round_trips_and_old_run_dirs_still_resume(data, tmp_path):
    cfg = tiny_cfg(data, tmp_path / "x", scheduler="multistep", warmup_iters=3, cache=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    run = tmp_path / "run"
    fit(tiny_cfg(data, run))
    stored = json.loads((run / "config.json").read_text())
    assert stored["model_overrides"] == TINY_MODEL and stored["scheduler"] == "cosine"
    assert load_checkpoint(run / "best.pt").metadata["training"]["split"] == "classes"
    # a run made before the typed fields kept them in a free-form "extra" dict
    legacy = {k: v for k, v in stored.items() if k not in ("model_overrides", "scheduler", "warmup_iters",
                                                             "progress", "cache", "split")}
    legacy["extra"] = {"model": TINY_MODEL, "progress": False, "scheduler": "multistep", "warmup_iters": 7}
    (run / "config.json").write_text(json.dumps(legacy))
    old = train_mod._read_config(run, tiny_cfg(data, run, resume=True))
    assert old.scheduler == "multistep" and old.warmup_iters == 7 and dict(old.model_overrides) == TINY_MODEL
    assert stored["split"] == "classes" and old.split == "groups"  # the split runs of then were made with
    assert fit(tiny_cfg(data, run, resume=True)).exists()  # finished run: repairs only
    (run / "config.json").write_text("{not json")
    with pytest.raises(TrainingError, match="config.json: cannot read"):
        fit(tiny_cfg(data, run, resume=True))


def test_split_seed_keeps_the_validation_set_while_the_seed_changes(data, tmp_path):
    def val_names(**kw) -> list[str]:
        return [s.sample_dir.name for s in train_mod._setup_data(tiny_cfg(data, tmp_path / "r", **kw), False).val]

    by_seed = {seed: val_names(seed=seed) for seed in range(6)}
    assert len({tuple(names) for names in by_seed.values()}) > 1  # the split follows --seed by default
    for seed in range(1, 6):
        assert val_names(seed=seed, split_seed=0) == by_seed[0]
    assert val_names(seed=0, split_seed=3) == by_seed[3]


def test_spec_records_the_largest_training_object(data, tmp_path):
    from cellseg.data.dataset import scan_samples
    from cellseg.data.hw3 import split_train_val

    run = tmp_path / "run"
    fit(tiny_cfg(data, run, scale=0.5, split="groups"))
    spec = load_checkpoint(run / "best.pt").spec
    root = find_train_root(data)
    dirs = list_sample_dirs(root)
    train_ids, _ = split_train_val([d.name for d in dirs], 0.3, 0)
    stats = scan_samples([d for d in dirs if d.name in train_ids], class_names_of(root))
    largest = max(float(s.object_sizes.max()) for s in stats if s.instances)
    assert spec.max_object_px == int(np.ceil(largest * 0.5)) > 0


# ------------------------------------------------------------------------------------------ validation path
def _gt_from_detections(gt: dict, entries: list[dict], share: float) -> dict:
    """`gt` with its annotations replaced by the top-scoring `share` of each image's entries, so
    that AP measured against it is far from 0 even for an untrained model."""
    import pycocotools.mask as mask_utils

    annotations = []
    for image in gt["images"]:
        mine = sorted((e for e in entries if e["image_id"] == image["id"]), key=lambda e: -e["score"])
        for e in mine[:max(1, int(len(mine) * share))]:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": e["category_id"],
                                "segmentation": e["segmentation"], "bbox": e["bbox"], "iscrowd": 0,
                                "area": float(mask_utils.area({**e["segmentation"],
                                                               "counts": e["segmentation"]["counts"].encode()}))})
    return {**gt, "annotations": annotations}


@pytest.mark.parametrize("fast_roi_align", [False, True])
def test_validation_through_the_pipeline_matches_the_raw_model_path(data, monkeypatch, fast_roi_align):
    """evaluate() goes through Predictor.predict_coco; the model's own forward + the shared
    paste/RLE (the path it replaced), under the same score floor and mask suppression, gives the
    same entries and the same AP to float rounding."""
    import cellseg.evaluate as evaluate_mod
    import cellseg.roi_align as roi_align_mod

    if not fast_roi_align:  # torchvision's pooler on both paths: the same numbers exactly
        monkeypatch.setattr(roi_align_mod, "fast_path_applies", lambda *a: False)
    from cellseg.data.hw3 import read_sample
    from cellseg.model import build_model, predict_raw, spec_from_data
    from cellseg.postprocess import apply_output_rules, detections_to_coco

    root = find_train_root(data)
    dirs = list_sample_dirs(root)
    names = class_names_of(root)
    torch.manual_seed(0)
    spec = spec_from_data("maskrcnn_resnet18_fpn", names, tuple(range(1, len(names) + 1)), np.array([6.0, 10, 14]),
                          20, **{**TINY_MODEL, "box_score_thresh": 0.0})
    model = build_model(spec)
    seen: list[tuple[dict, list[dict]]] = []
    real_evaluate = evaluate_mod.evaluate_coco
    monkeypatch.setattr(evaluate_mod, "evaluate_coco", lambda gt, results: seen.append((gt, results)) or
                        real_evaluate(gt, results))
    train_mod.evaluate(model, dirs, torch.device("cpu"), spec)
    gt, through_pipeline = seen[0]
    samples = [read_sample(d, names) for d in dirs]
    raw: list[dict] = []
    for image_id, s in enumerate(samples, start=1):
        det = predict_raw(model.eval(), [torch.from_numpy(s.image.transpose(2, 0, 1).copy())])[0]
        entries = detections_to_coco(image_id, det["boxes"], det["scores"], det["labels"], det["mask_probs"],
                                     s.image.shape[:2], spec.category_ids, spec.mask_thresh)
        raw.extend(apply_output_rules([e for e in entries if e["score"] >= spec.score_floor],
                                      spec.mask_nms_thresh, spec.mask_score_decay, spec.score_floor))
    assert len(raw) > 20  # random heads at score >= 0: plenty of detections to compare
    assert len(through_pipeline) == len(raw)
    # Scores of an untrained model crowd near 1 / (classes + 1): the fast RoIAlign's float rounding
    # (1e-5) may swap which of two near-tied boxes NMS keeps, so then they agree to 1e-3 only.
    tol = 1e-3 if fast_roi_align else 1e-6
    np.testing.assert_allclose(sorted(e["score"] for e in through_pipeline), sorted(e["score"] for e in raw),
                               atol=tol)
    assert gt == train_mod.build_gt(samples, spec)
    scored_gt = _gt_from_detections(gt, raw, 0.3)
    expected = real_evaluate(scored_gt, raw)
    got = real_evaluate(scored_gt, through_pipeline)
    assert expected["segm"]["AP"] > 0.5 and expected["bbox"]["AP"] > 0.5  # a comparison that can fail
    for iou_type in ("segm", "bbox"):
        for key in ("AP", "AP50", "AP75"):
            assert got[iou_type][key] == pytest.approx(expected[iou_type][key], abs=10 * tol), (iou_type, key)
