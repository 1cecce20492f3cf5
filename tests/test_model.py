"""cellseg.model: architectures, heads sized from the data, native scale, weights loading."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from cellseg.config import ARCHS, ModelSpec
from cellseg.errors import CheckpointError, InputError
from cellseg.model import (DEFAULT_MASK_HEAD, LIGHT_MASK_HEAD, build_model, level_anchor_sizes,
                           load_matching_weights, mask_head_macs_per_roi, model_from_checkpoint, predict_raw,
                           spec_from_data)
from cellseg.roi_align import ParallelRoIAlign

torch.set_num_threads(1)
NAMES = ("class1", "class2", "class3")
TINY = dict(rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
            box_detections_per_img=50)


def tiny_spec(arch: str = "maskrcnn_resnet18_fpn", **kw) -> ModelSpec:
    return spec_from_data(arch, NAMES, (1, 2, 3), np.array([6.0, 9, 12, 20, 40]), 10, **{**TINY, **kw})


def square_target(h: int, w: int) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 10:20, 12:30] = 1
    masks[1, 30:31, 40:41] = 1  # a 1-pixel instance
    return {"boxes": torch.tensor([[12.0, 10, 30, 20], [40, 30, 41, 31]]), "labels": torch.tensor([1, 3]),
            "masks": masks}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_with_heads_sized_from_the_spec(arch):
    spec = tiny_spec(arch)
    model = build_model(spec)
    k = len(NAMES) + 1
    assert model.roi_heads.box_predictor.cls_score.out_features == k
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * k
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == k
    assert model.roi_heads.detections_per_img == spec.box_detections_per_img
    assert model.rpn._post_nms_top_n["testing"] == spec.rpn_post_nms_top_n_test
    assert [s[0] for s in model.rpn.anchor_generator.sizes] == list(spec.anchor_sizes)
    assert model.roi_heads.score_thresh == spec.box_score_thresh
    assert model.roi_heads.nms_thresh == spec.box_nms_thresh
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == spec.box_batch_size_per_image
    convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert tuple(c.out_channels for c in convs) == spec.mask_head_channels
    pools = (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool)
    assert all(isinstance(p, ParallelRoIAlign) for p in pools)  # training pools on every thread
    assert [p.output_size for p in pools] == [(7, 7), (14, 14)] and pools[0].sampling_ratio == 2
    if arch == "maskrcnn_resnet18_fpn":
        assert spec.mask_head_channels == LIGHT_MASK_HEAD
        assert model.roi_heads.box_head.fc7.out_features == spec.box_head_dim
    else:
        assert spec.mask_head_channels == DEFAULT_MASK_HEAD  # torchvision's heads, so COCO weights load


def test_light_arch_trains_and_predicts_on_a_64px_image():
    model = build_model(tiny_spec())
    image = torch.rand(3, 64, 64)
    losses = model([image], [square_target(64, 64)])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    out = predict_raw(model, [image])[0]
    n = out["boxes"].shape[0]
    assert out["mask_probs"].shape == (n, 1, 28, 28) and out["scores"].shape == (n,)
    assert n <= 50


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_fpn_width_sizes_rpn_box_and_mask_heads(norm):
    model = build_model(tiny_spec(fpn_channels=64, norm=norm))
    assert model.backbone.out_channels == 64
    assert model.rpn.head.conv[0][0].in_channels == 64
    assert model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
    first_mask_conv = next(m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_mask_conv.in_channels == 64
    image = torch.rand(3, 64, 64)
    sum(model([image], [square_target(64, 64)]).values()).backward()
    out = predict_raw(model.eval(), [image])[0]
    assert out["mask_probs"].shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("value", [0, -64, True, 64.0, "64"])
def test_fpn_width_must_be_a_positive_integer(value):
    fields = tiny_spec().to_dict()
    with pytest.raises(CheckpointError, match="fpn_channels"):
        ModelSpec.from_dict({**fields, "fpn_channels": value})


def test_specs_from_before_the_fpn_width_read_as_torchvisions_256():
    fields = tiny_spec().to_dict()
    del fields["fpn_channels"]
    assert ModelSpec.from_dict(fields).fpn_channels == 256


def test_anchor_scales_per_octave_and_rpn_matching_reach_the_model():
    one = tiny_spec()
    assert level_anchor_sizes(one) == tuple((s,) for s in one.anchor_sizes)
    spec = tiny_spec(anchor_scales_per_octave=2, rpn_fg_iou_thresh=0.5, rpn_bg_iou_thresh=0.25)
    assert level_anchor_sizes(spec)[:2] == ((8, 11), (16, 23))
    assert level_anchor_sizes(tiny_spec(anchor_scales_per_octave=3))[0] == (8, 10, 13)
    model = build_model(spec)
    assert model.rpn.anchor_generator.sizes == level_anchor_sizes(spec)
    assert model.rpn.head.cls_logits.out_channels == 2 * len(spec.aspect_ratios)
    assert model.rpn.head.bbox_pred.out_channels == 4 * 2 * len(spec.aspect_ratios)
    matcher = model.rpn.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold) == (0.5, 0.25)
    image = torch.rand(3, 64, 64)
    sum(model([image], [square_target(64, 64)]).values()).backward()
    assert predict_raw(model.eval(), [image])[0]["mask_probs"].shape[1:] == (1, 28, 28)


def test_anchor_scales_and_rpn_thresholds_default_for_old_specs_and_are_checked():
    fields = tiny_spec().to_dict()
    for name in ("anchor_scales_per_octave", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh"):
        del fields[name]
    old = ModelSpec.from_dict(fields)
    assert (old.anchor_scales_per_octave, old.rpn_fg_iou_thresh, old.rpn_bg_iou_thresh) == (1, 0.7, 0.3)
    for bad in (0, 5, True, 2.0, "2"):
        with pytest.raises(CheckpointError, match="anchor_scales_per_octave"):
            ModelSpec.from_dict({**fields, "anchor_scales_per_octave": bad})
    for fg, bg in ((0.3, 0.5), (1.5, 0.3), (0.5, 0.0), ("0.7", 0.3), (0.7, None)):
        with pytest.raises(CheckpointError, match="rpn_bg_iou_thresh"):
            ModelSpec.from_dict({**fields, "rpn_fg_iou_thresh": fg, "rpn_bg_iou_thresh": bg})
    with pytest.raises(InputError, match="unknown model settings"):
        tiny_spec(anchor_scales=2)


def test_spec_from_data_sizes_anchors_from_small_nuclei():
    rng = np.random.default_rng(0)
    consep_like = rng.uniform(5, 60, 5000)  # CoNSeP nuclei are ~5-60 px across
    spec = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), consep_like, 189)
    assert spec.anchor_sizes == (8, 16, 32, 64, 128)
    big = spec_from_data("maskrcnn_resnet50_fpn", NAMES, (1, 2, 3), rng.uniform(60, 200, 500), 5)
    assert big.anchor_sizes[0] >= 64 and big.anchor_sizes[-1] == 16 * big.anchor_sizes[0]
    tiny = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.full(10, 2.0), 5)
    assert tiny.anchor_sizes[0] == 8  # never below 8
    empty = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.zeros(0), 0)
    assert empty.anchor_sizes == (32, 64, 128, 256, 512)
    halved = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), rng.uniform(30, 120, 500), 5, scale=0.5)
    assert halved.anchor_sizes[0] == 16 and halved.scale == 0.5


def test_spec_from_data_detections_never_a_silent_100():
    few = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.array([10.0]), 40)
    assert few.box_detections_per_img == 1000 and few.rpn_post_nms_top_n_test >= 1000
    crowded = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.array([10.0]), 772)
    assert crowded.box_detections_per_img == 1544
    assert crowded.rpn_post_nms_top_n_test >= crowded.box_detections_per_img
    assert crowded.rpn_pre_nms_top_n_test >= crowded.rpn_post_nms_top_n_test
    assert crowded.rpn_post_nms_top_n_train >= crowded.box_detections_per_img
    assert build_model(crowded).roi_heads.detections_per_img == 1544


def test_spec_from_data_overrides_and_refusals():
    spec = tiny_spec(mask_head_channels=[64, 64, 64])
    assert spec.mask_head_channels == (64, 64, 64)
    assert build_model(spec).roi_heads.mask_predictor.conv5_mask.in_channels == 64
    with pytest.raises(InputError, match="unknown model settings"):
        tiny_spec(no_such_field=1)
    with pytest.raises(InputError, match="unknown architecture"):
        spec_from_data("maskrcnn_vgg", NAMES, (1, 2, 3), np.array([10.0]), 1)


def test_mask_head_cost_documented_numbers():
    assert mask_head_macs_per_roi(DEFAULT_MASK_HEAD) == pytest.approx(0.515e9, rel=1e-3)
    assert mask_head_macs_per_roi(LIGHT_MASK_HEAD) == pytest.approx(0.100e9, rel=1e-2)


def test_native_scale_keeps_a_256_image_at_256():
    model = build_model(tiny_spec()).eval()
    images, _ = model.transform([torch.rand(3, 256, 256)])
    assert tuple(images.tensors.shape) == (1, 3, 256, 256)
    assert images.image_sizes == [(256, 256)]
    images, _ = model.transform([torch.rand(3, 250, 190), torch.rand(3, 100, 300)])
    assert tuple(images.tensors.shape) == (2, 3, 256, 320)  # padded to 32, not resized
    assert images.image_sizes == [(250, 190), (100, 300)]
    model.train()
    target = square_target(256, 256)
    images, targets = model.transform([torch.rand(3, 256, 256)], [target])
    assert images.image_sizes == [(256, 256)]
    assert torch.equal(targets[0]["boxes"], target["boxes"]) and torch.equal(targets[0]["masks"], target["masks"])


def test_native_transform_normalises_with_spec_mean_std():
    spec = tiny_spec(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    model = build_model(spec).eval()
    images, _ = model.transform([torch.full((3, 64, 64), 0.75)])
    assert torch.allclose(images.tensors, torch.ones(1, 3, 64, 64))


def test_scale_factor_resizes_image_boxes_masks_and_maps_back():
    model = build_model(tiny_spec(scale=0.5))
    target = square_target(128, 128)
    images, targets = model.transform([torch.rand(3, 128, 128)], [target])
    assert images.image_sizes == [(64, 64)]
    assert torch.allclose(targets[0]["boxes"], target["boxes"] * 0.5)
    assert targets[0]["masks"].shape == (2, 64, 64)
    model.eval()
    out = predict_raw(model, [torch.rand(3, 128, 96)])[0]
    if len(out["boxes"]):  # boxes come back in the input image's pixels
        assert float(out["boxes"][:, 2].max()) <= 96.0 + 1e-3 and float(out["boxes"][:, 3].max()) <= 128.0 + 1e-3
    with pytest.raises(InputError):
        build_model(tiny_spec(scale=0.0))


def test_default_weights_without_internet_is_a_one_line_checkpoint_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    import torchvision.models._api as weights_api
    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    build_model(tiny_spec())  # random init never downloads
    with pytest.raises(CheckpointError, match="--weights PATH") as err:
        build_model(tiny_spec(), weights="default")
    assert "\n" not in str(err.value) and "no internet" in str(err.value)


def test_weights_path_loads_matching_tensors_and_reports_predictor_mismatch(tmp_path):
    other = build_model(spec_from_data("maskrcnn_resnet18_fpn", ("a",) * 6, tuple(range(1, 7)),
                                       np.array([6.0, 9, 12]), 10, **TINY))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.warns(UserWarning, match="skipped for shape"):
        model = build_model(tiny_spec(), weights=str(path))
    report = model.cellseg_weights_report
    assert "roi_heads.box_predictor.cls_score.weight" in report.skipped_shape
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in report.skipped_shape
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, other.backbone.body.layer1[0].conv1.weight)
    assert not torch.equal(model.roi_heads.box_predictor.cls_score.weight[:2],
                           other.roi_heads.box_predictor.cls_score.weight[:2])
    # pretrained: conv1 + layer1 frozen as torchvision does
    assert not model.backbone.body.conv1.weight.requires_grad
    assert model.backbone.body.layer4[0].conv1.weight.requires_grad


def test_weights_path_accepts_a_plain_imagenet_resnet_state_dict(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    with pytest.warns(UserWarning):
        model = build_model(tiny_spec(), weights=str(path))
    assert torch.equal(model.backbone.body.layer3[1].bn2.running_var, resnet.layer3[1].bn2.running_var)


def test_old_torchvision_mask_head_keys_are_upgraded():
    spec = tiny_spec("maskrcnn_resnet18_fpn", mask_head_channels=[256, 256, 256, 256])
    source = build_model(spec)
    state = {}
    for k, v in source.state_dict().items():
        parts = k.split(".")
        if k.startswith("roi_heads.mask_head.") and parts[3] == "0":  # new: mask_head.{i}.0.weight
            k = f"roi_heads.mask_head.mask_fcn{int(parts[2]) + 1}.{parts[4]}"
        state[k] = v
    target = build_model(spec)
    report = load_matching_weights(target, state, "old")
    assert not report.unexpected and not report.skipped_shape
    assert torch.equal(target.roi_heads.mask_head[2][0].weight, source.roi_heads.mask_head[2][0].weight)


def test_bad_weights_paths_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_model(tiny_spec(), weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        build_model(tiny_spec(), weights=str(junk))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        build_model(tiny_spec(), weights=str(unrelated))


def test_model_from_checkpoint_is_strict():
    spec = tiny_spec()
    state = build_model(spec).state_dict()
    model = model_from_checkpoint(state, spec)
    assert not model.training
    wrong = tiny_spec(mask_head_channels=[64, 64])
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(state, wrong, "x.pt")


def test_inference_budgets_grow_with_image_area_not_per_image():
    from cellseg.model import inference_budgets, inference_budgets_applied

    spec = tiny_spec()
    assert spec.max_instances_per_mpx == 0.0 or spec.max_instances_per_mpx > 0
    dense = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.array([10.0, 12, 14]), 189,
                           max_instances_per_mpx=189 * 1e6 / 256 ** 2)
    # a 256 px crop keeps the fixed minimums; a 1024 px tile of the same tissue gets 16 crops' worth
    assert inference_budgets(dense, 256, 256) == (1000, 1000, 1000)
    pre, post, det = inference_budgets(dense, 1024, 1024)
    assert det == 2 * 189 * 16 and post == det and pre == det
    fixed = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.array([10.0]), 189)
    assert inference_budgets(fixed, 4096, 4096) == (1000, 1000, 1000)
    # the eager model applies the same budgets as the pipeline (forward pre-hook); a tiny model
    # whose density asks for 200 detections on a 128 px image
    small = tiny_spec(box_detections_per_img=20, rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=20,
                      box_score_thresh=0.99, max_instances_per_mpx=100 * 1e6 / 128 ** 2)
    model = build_model(small).eval()
    during = budgets_seen_during_forward(model)
    with torch.no_grad():
        model([torch.rand(3, 128, 128)])
    assert during[-1] == (200, 200, 200)  # (detections_per_img, rpn post-NMS, rpn pre-NMS) in the call
    assert model.roi_heads.detections_per_img == 20  # and the model's own again after it
    with inference_budgets_applied(model, small, [(64, 64)]):
        assert model.roi_heads.detections_per_img == 50
    # scale: density is per network-input pixel
    scaled = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.array([10.0]), 189, scale=0.5,
                            max_instances_per_mpx=1000.0)
    assert scaled.max_instances_per_mpx == pytest.approx(4000.0)


def budgets_seen_during_forward(model) -> list[tuple[int, int, int]]:
    """A list that gets (detections_per_img, rpn post-NMS, rpn pre-NMS test budgets) as they are
    each time roi_heads runs."""
    from cellseg.tv_compat import rpn_test_budgets

    seen: list[tuple[int, int, int]] = []

    def record(module, args):
        pre, post = rpn_test_budgets(model.rpn)
        seen.append((model.roi_heads.detections_per_img, post, pre))

    model.roi_heads.register_forward_pre_hook(record)
    return seen


def budgets_of(model) -> tuple[int, int, int]:
    from cellseg.tv_compat import rpn_test_budgets

    pre, post = rpn_test_budgets(model.rpn)
    return model.roi_heads.detections_per_img, post, pre


def test_budgets_hold_for_the_call_only_and_are_restored_after_it():
    from cellseg.model import inference_budgets, inference_budgets_applied

    crowded = tiny_spec(box_detections_per_img=20, rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=20,
                        max_instances_per_mpx=100 * 1e6 / 128 ** 2)
    model = build_model(crowded).eval()
    before = budgets_of(model)
    assert before == (20, 20, 20)
    during = budgets_seen_during_forward(model)
    grown = inference_budgets(crowded, 256, 256)  # a large crowded image: 4x the 128 px budget
    assert grown == (800, 800, 800)
    image = torch.rand(3, 256, 256)
    predict_raw(model, [image])
    assert during[-1] == (800, 800, 800) and budgets_of(model) == before
    with torch.no_grad():
        model([image])  # eager forward: the same budgets, also only for the call
    assert during[-1] == (800, 800, 800) and budgets_of(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with inference_budgets_applied(model, crowded, [(256, 256)]):
            assert budgets_of(model) == (800, 800, 800)
            raise RuntimeError("boom")
    assert budgets_of(model) == before

    def fails(module, args):
        raise RuntimeError("boom in the heads")

    handle = model.roi_heads.register_forward_pre_hook(fails)
    with pytest.raises(RuntimeError, match="boom in the heads"), torch.no_grad():
        model([image])
    assert budgets_of(model) == before
    handle.remove()
    model.train()  # training keeps its own budgets: the hooks leave them alone
    model([image], [square_target(256, 256)])
    assert budgets_of(model) == before


def test_pipeline_budgets_are_restored_after_predict():
    from cellseg.backends.torch_backend import TorchBackend
    from cellseg.pipeline import Predictor

    crowded = tiny_spec(box_detections_per_img=20, rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=20,
                        max_instances_per_mpx=100 * 1e6 / 128 ** 2)
    model = build_model(crowded).eval()
    before = budgets_of(model)
    predictor = Predictor(crowded, model, TorchBackend(model, torch.device("cpu")), torch.device("cpu"))
    seen = []
    real = model.roi_heads.postprocess_detections

    def record(*args, **kwargs):
        seen.append(budgets_of(model))
        return real(*args, **kwargs)

    model.roi_heads.postprocess_detections = record
    predictor.predict(np.random.default_rng(0).random((256, 256, 3), dtype=np.float32))
    assert seen == [(800, 800, 800)] and budgets_of(model) == before


@pytest.mark.parametrize("scale, largest", [(1.0, 41), (0.5, 21), (2.0, 81)])
def test_spec_records_the_largest_object_after_scale(scale, largest):
    spec = spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.array([6.0, 9, 12, 20, 40.4]), 10,
                          scale=scale)
    assert spec.max_object_px == largest
    assert ModelSpec.from_dict(spec.to_dict()).max_object_px == largest
    assert spec_from_data("maskrcnn_resnet18_fpn", NAMES, (1, 2, 3), np.zeros(0), 0).max_object_px == 0
