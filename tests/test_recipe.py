"""cellseg.recipes + the recipe machinery in train/model/dataset: named recipe recorded in the
checkpoint, GroupNorm models (train, save, export), cell augmentation consistency, repeat-factor
sampling, per-class AP/AP50 in the epoch log, and --time-budget."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellseg.train as train_mod
from cellseg.checkpoint import load_checkpoint, make_metadata, save_checkpoint, validate_metadata
from cellseg.config import ModelSpec, TrainConfig
from cellseg.data.dataset import (CellDataset, RepeatFactorSampler, augment_sample, boxes_from_masks, hed_jitter,
                                  repeat_factors)
from cellseg.data.hw3 import class_names_of, find_train_root, list_sample_dirs
from cellseg.data.synth import synthesize
from cellseg.errors import CheckpointError, InputError
from cellseg.recipes import RECIPES, default_recipe, parse_duration, recipe_config
from cellseg.train import fit, fit_total_iters
from helpers import tiny_spec

torch.set_num_threads(1)
TINY_MODEL = dict(rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=64,
                  rpn_post_nms_top_n_test=64, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
                  box_detections_per_img=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "data", n_train=6, n_test=0, seed=1, size=64)


def scratch_cfg(data: Path, out: Path, **given) -> TrainConfig:
    """The cpu-scratch recipe shrunk to seconds: 2 iterations of 2 tiny images."""
    base = dict(data=str(data), out=str(out), epochs=1, batch_size=2, crop_size=48, val_fraction=0.3, device="cpu",
                max_iters_per_epoch=2, seed=0, model_overrides=tuple(TINY_MODEL.items()), progress=False)
    return recipe_config("cpu-scratch", {**base, **given})


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_options_given_by_hand_win_and_model_settings_merge():
    cfg = recipe_config("cpu-scratch", dict(data="d", out="o", lr=1e-3, model_overrides=(("norm", "bn"),)))
    assert cfg.recipe == "cpu-scratch" and cfg.lr == 1e-3 and cfg.batch_size == RECIPES["cpu-scratch"].train["batch_size"]
    model = dict(cfg.model_overrides)
    assert model["norm"] == "bn" and model["box_positive_fraction"] == 0.5  # the user's norm, the recipe's rest
    plain = recipe_config("none", dict(data="d", out="o"))
    assert plain == TrainConfig(data="d", out="o")  # "none" adds nothing
    assert default_recipe("none") == "cpu-scratch" and default_recipe("default") == "none"
    with pytest.raises(InputError, match="--recipe fast: unknown recipe"):
        recipe_config("fast", dict(data="d", out="o"))


def test_recipe_and_settings_recorded_in_checkpoint_metadata(data, tmp_path):
    run = tmp_path / "run"
    fit(scratch_cfg(data, run))
    best = load_checkpoint(run / "best.pt")
    recipe = best.metadata["training"]["recipe"]
    assert recipe["name"] == "cpu-scratch"
    assert recipe["settings"]["augment"] == "cells" and recipe["settings"]["lr"] == 4e-4
    assert recipe["settings"]["crop_size"] == 48  # what the run used, after the options given by hand
    assert recipe["settings"]["model"]["norm"] == "gn"
    assert best.spec.norm == "gn" and best.spec.box_positive_fraction == 0.5
    assert recipe["settings"]["model"]["fpn_channels"] == 64 and best.spec.fpn_channels == 64
    assert list(recipe["settings"]["model"]["mask_head_channels"]) == [64, 64] and best.spec.mask_head_channels == (64, 64)
    assert recipe["settings"]["model"]["anchor_scales_per_octave"] == 2 and best.spec.anchor_scales_per_octave == 2
    assert best.spec.rpn_fg_iou_thresh == 0.5 and best.spec.rpn_bg_iou_thresh == 0.3
    assert isinstance(dict(best.state_dict)["backbone.body.bn1.weight"], torch.Tensor)
    assert json.loads((run / "config.json").read_text())["recipe"] == "cpu-scratch"
    # a damaged recipe record is refused like any other bad metadata
    bad = json.loads(json.dumps(best.metadata))
    bad["training"]["recipe"] = "cpu-scratch"
    with pytest.raises(CheckpointError, match="training.recipe"):
        validate_metadata(bad, "x.pt")


def test_old_checkpoint_metadata_loads_with_batchnorm(tmp_path):
    old = tiny_spec().to_dict()
    for new_field in ("norm", "box_positive_fraction", "fpn_channels"):
        old.pop(new_field)
    spec = ModelSpec.from_dict(old)
    assert spec.norm == "bn" and spec.box_positive_fraction == 0.25 and spec.fpn_channels == 256
    with pytest.raises(CheckpointError, match="unknown norm 'ln'"):
        ModelSpec.from_dict({**old, "norm": "ln"})


@pytest.mark.slow  # an export verifies every graph: ~1 min on a loaded 2-core machine
def test_groupnorm_model_exports_and_verifies(tmp_path):
    """The ONNX export path (three dense graphs + end-to-end, verified against PyTorch) takes the
    recipe's model (GroupNorm, two anchor scales per octave) as it takes torchvision's."""
    from cellseg.export.exporter import export_model
    from cellseg.model import build_model

    spec = tiny_spec(norm="gn", mask_head_channels=(32, 32), anchor_scales_per_octave=2, rpn_fg_iou_thresh=0.5)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.backbone.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.roi_heads.mask_head.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    ckpt = save_checkpoint(tmp_path / "gn.pt", model.state_dict(), make_metadata(spec))
    out = export_model(ckpt, tmp_path / "export")  # raises VerificationError if ONNX != PyTorch
    exported = load_checkpoint(out / "model.pt").spec
    assert exported.norm == "gn" and exported.anchor_scales_per_octave == 2
    assert (out / "backbone.onnx").is_file() and (out / "mask_head.onnx").is_file() and (out / "model.onnx").is_file()


# ------------------------------------------------------------------------------------------ augmentation
@st.composite
def instances(draw):
    h, w = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    n = draw(st.integers(0, 6))
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        masks[i, y0:y0 + draw(st.integers(1, h)), x0:x0 + draw(st.integers(1, w))] = True
    return masks


@settings(max_examples=60, deadline=None)
@given(masks=instances(), mode=st.sampled_from(["basic", "cells"]), crop=st.sampled_from([0, 6, 16, 64]),
       seed=st.integers(0, 2 ** 31), bright=st.booleans())
def test_augmentation_keeps_image_masks_and_boxes_consistent(masks, mode, crop, seed, bright):
    h, w = masks.shape[1:]
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 0.4 + (0.6 if bright else 0.0)).astype(np.float32)
    labels = np.arange(1, len(masks) + 1)
    img, m, lab, boxes = augment_sample(image, masks, labels, np.random.default_rng(seed), crop, mode)
    assert img.dtype == np.float32 and img.ndim == 3 and 0.0 <= img.min() and img.max() <= 1.0
    assert m.shape == (len(lab), *img.shape[:2]) and m.dtype == bool
    assert m.any(axis=(1, 2)).all()  # no empty instance survives
    np.testing.assert_array_equal(boxes, boxes_from_masks(m))
    assert set(lab.tolist()) <= set(labels.tolist()) and len(set(lab.tolist())) == len(lab)
    if mode == "basic" and crop == 0:  # flips and rotations only: every instance keeps its area
        assert sorted(m.sum(axis=(1, 2)).tolist()) == sorted(masks.sum(axis=(1, 2)).tolist())
    if crop and mode == "cells":  # the window is drawn so that the output is about the crop
        assert max(img.shape[:2]) <= max(round(crop * 1.25) + 1, round(max(h, w) * 1.25) + 1)


def test_cell_augmentation_crop_local_path_equals_full_mask_path(data):
    root = find_train_root(data)
    dirs = list_sample_dirs(root)
    names = class_names_of(root)
    fast = CellDataset(dirs, names, augment=True, crop_size=40, seed=3, mode="cells")
    slow = CellDataset(dirs, names, augment=True, crop_size=40, seed=3, cache=True, mode="cells")
    scales = set()
    for i in range(len(dirs)):
        (a_img, a_t), (b_img, b_t) = fast[i], slow[i]
        assert torch.equal(a_img, b_img)
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(a_t[key], b_t[key]), (i, key)
        scales.add(tuple(a_img.shape[1:]))
    assert len(scales) > 1  # scale jitter changes the output size


def test_hed_jitter_is_identity_at_no_change_and_shifts_stain():
    rng = np.random.default_rng(0)
    image = (rng.random((16, 16, 3)) * 0.6 + 0.3).astype(np.float32)
    np.testing.assert_allclose(hed_jitter(image, np.ones(3), np.zeros(3)), image, atol=1e-5)
    more_haematoxylin = hed_jitter(image, np.array([1.5, 1.0, 1.0]), np.zeros(3))
    assert more_haematoxylin.mean() < image.mean()  # more stain absorbs more light


# ------------------------------------------------------------------------------------------ repeat factors
def test_repeat_factors_follow_lvis_and_the_sampler_is_deterministic():
    labels = [np.array([1, 2]), np.array([2]), np.array([2, 3]), np.array([], np.int64)]
    f = repeat_factors(labels, 3, threshold=0.5)
    # class 1 and 3 are in 1/4 of the samples: sqrt(0.5 / 0.25); class 2 in 3/4: 1
    np.testing.assert_allclose(f, [np.sqrt(2), 1.0, np.sqrt(2), 1.0])
    sampler = RepeatFactorSampler(f, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 5 and first == list(sampler)
    assert first.count(1) == 1 and first.count(3) == 1 and {0, 2} <= set(first)
    sampler.set_epoch(1)
    assert len(list(sampler)) == 5
    shards = [RepeatFactorSampler(f, num_replicas=2, rank=r, seed=0) for r in (0, 1)]
    assert sum(len(list(s)) for s in shards) == 6  # 5 padded to 6 over 2 ranks


def test_repeat_factor_sampling_trains(data, tmp_path):
    run = tmp_path / "run"
    fit(scratch_cfg(data, run, repeat_factor_threshold=1.0))
    assert read_metrics(run)[0]["losses"]["loss"] > 0


# ------------------------------------------------------------------------------------------ per-class AP
def test_per_class_ap_and_ap50_in_epoch_log_and_metrics(data, tmp_path, capsys):
    run = tmp_path / "run"
    fit(scratch_cfg(data, run, progress=True))
    val = read_metrics(run)[0]["val"]
    names = class_names_of(find_train_root(data))
    for iou_type in ("segm", "bbox"):
        assert set(val[iou_type]["per_class"]) == set(names) == set(val[iou_type]["per_class_AP50"])
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch 1/1:")][0]
    assert "per class AP/AP50" in line and all(n in line for n in names)


def test_per_class_ap50_from_the_same_evaluation():
    from cellseg.evaluate import summary_from_precision

    iou_thrs = np.linspace(0.5, 0.95, 10)
    precision = np.zeros((10, 101, 2, 4, 3))
    precision[0, :, 0] = 1.0  # class a: perfect at IoU 0.5 only
    precision[:, :, 1] = 0.5  # class b: 0.5 everywhere
    s = summary_from_precision(precision, iou_thrs, [1, 2], {1: "a", 2: "b"}, 100)
    assert s["per_class_AP50"] == {"a": 1.0, "b": 0.5}
    assert s["per_class"] == {"a": pytest.approx(0.1), "b": 0.5}
    assert s["AP50"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------ time budget
@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("600", 600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_fit_total_iters_leaves_time_for_every_validation():
    # 10 iterations per epoch at 1 s, validation 5 s, 40 s left: 2 epochs (30 s) + 5 iterations + 1 validation
    assert fit_total_iters(0, 10, 1000, 40.0, 1.0, 5.0) == 25
    assert fit_total_iters(0, 10, 12, 40.0, 1.0, 5.0) == 12  # never past the epoch cap
    assert fit_total_iters(7, 10, 1000, -5.0, 1.0, 5.0) == 7  # out of time: stop where it is


class FakeTime:
    """time for cellseg.train: each perf_counter() call advances 1 s, so a run's time is a
    deterministic function of its code path (no timed assertions)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def scripted_evaluate(aps: list[float]):
    calls = iter(aps)

    def evaluate(*args, **kwargs):
        ap = next(calls)
        one = {"AP": ap, "AP50": ap, "AP75": ap, "per_class": {"class1": ap}, "per_class_AP50": {"class1": ap},
               "max_dets": 100}
        return {"segm": one, "bbox": dict(one)}
    return evaluate


def test_time_budget_stops_in_time_fits_the_schedule_and_keeps_the_best_epoch(data, tmp_path, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(train_mod, "time", fake)
    monkeypatch.setattr(train_mod, "evaluate", scripted_evaluate([0.1, 0.3, 0.2, 0.25] + [0.1] * 40))
    run = tmp_path / "run"
    fit(scratch_cfg(data, run, epochs=50, time_budget_s=60.0), started_at=0.0)
    records = read_metrics(run)
    assert load_checkpoint(run / "last.pt").metadata["training"]["epoch"] == len(records)
    assert 2 <= len(records) < 50  # the budget ended it, not the epoch cap
    assert records[-1]["iterations"] == records[-1]["planned_iterations"]  # cosine ran to its end
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert fake.now <= 60.0  # done, last validation and checkpoints included, within the budget
    best = load_checkpoint(run / "best.pt")
    assert best.metadata["training"]["epoch"] == 2 and best.metadata["training"]["best_val_segm_AP"] == 0.3
    assert best.metadata["training"]["time_budget_s"] == 60.0


def test_time_budget_run_resumes_with_its_plan(data, tmp_path, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(train_mod, "time", fake)
    monkeypatch.setattr(train_mod, "evaluate", scripted_evaluate([0.1] * 40))
    real = train_mod.train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if args[4] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(scratch_cfg(data, run, epochs=50, time_budget_s=60.0), started_at=0.0)
    state = load_checkpoint(run / "last.pt").train_state
    assert state["epoch"] == 1 and state["elapsed_s"] > 0 and state["total_iters"] >= 2
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    spent = load_checkpoint(run / "last.pt").train_state["elapsed_s"]
    fake.now = 0.0  # a new process: the budget goes on from what the first one committed
    fit(scratch_cfg(data, run, resume=True), started_at=0.0)
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= 2
    assert records[-1]["iterations"] == records[-1]["planned_iterations"]
    assert spent + fake.now <= 60.0


def _invoke_train(*args):
    from typer.testing import CliRunner

    from cellseg.cli import app

    return CliRunner().invoke(app, ["train", *[str(a) for a in args]])


@pytest.mark.parametrize("value", ["2x", "abc", "0", "-1h", "h", ""])
def test_bad_time_budget_is_a_one_line_error(data, tmp_path, value):
    res = _invoke_train(data, "--out", tmp_path / "run", "--device", "cpu", "--time-budget", value)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "--time-budget" in lines[0], res.output
    assert not (tmp_path / "run").exists()


def test_cli_default_recipe_is_cpu_scratch_and_budget_is_recorded(data, tmp_path):
    run = tmp_path / "run"
    sets = [a for k, v in TINY_MODEL.items() for a in ("--set", f"{k}={v}")]
    res = _invoke_train(data, "--out", run, "--device", "cpu", "--val-fraction", 0.3, "--max-iters-per-epoch", 1,
                        "--batch-size", 2, "--crop-size", 48, "--epochs", 1, "--time-budget", "1h", "--quiet", *sets)
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(run / "best.pt").metadata["training"]
    assert meta["recipe"]["name"] == "cpu-scratch" and meta["time_budget_s"] == 3600.0
    res = _invoke_train(data, "--out", tmp_path / "r2", "--device", "cpu", "--recipe", "turbo")
    assert res.exit_code == 2 and "--recipe turbo" in res.output
