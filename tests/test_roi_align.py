"""cellseg.roi_align: the CPU multi-scale RoIAlign equals torchvision's MultiScaleRoIAlign (up to
float rounding) on every kind of box, after its permutation is undone; the training pooler gives
torchvision's outputs and feature gradients."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from cellseg import roi_align
from cellseg.roi_align import ParallelRoIAlign, pool_rois, restore_order


def fpn_features(height: int, width: int, channels: int = 8, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    gen = torch.Generator().manual_seed(seed)
    feats, h, w = OrderedDict(), (height + 3) // 4, (width + 3) // 4  # strides 4, 8, 16, 32, 64
    for name in ("0", "1", "2", "3", "pool"):
        feats[name] = torch.randn(1, channels, h, w, generator=gen)
        h, w = (h + 1) // 2, (w + 1) // 2
    return feats


def mixed_boxes(height: int, width: int, n: int, seed: int = 0) -> torch.Tensor:
    """Tiny, thin, large, partly and wholly outside the image, and sub-pixel boxes."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width * 1.2, height * 1.2]) - 10
    side = torch.rand(n, 2, generator=gen) ** 3 * torch.tensor([width, height]) * 1.5 + 0.2
    boxes = torch.cat([xy, xy + side], 1)
    special = torch.tensor([[0.0, 0.0, width, height], [-50.0, -50.0, -20.0, -20.0],
                            [width + 5.0, height + 5.0, width + 40.0, height + 40.0],
                            [3.0, 3.0, 3.1, 3.1], [0.0, 5.0, width, 6.0], [5.0, 0.0, 6.0, height],
                            [width - 1.0, height - 1.0, width + 0.5, height + 0.5]])
    return torch.cat([boxes, special])


def reference(pooler: MultiScaleRoIAlign, feats, boxes, size):
    fresh = MultiScaleRoIAlign(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio)
    return fresh(feats, [boxes], [size])


@pytest.mark.parametrize("size", [(128, 128), (97, 161), (33, 40), (8, 300)])
@pytest.mark.parametrize("output_size,ratio", [(7, 2), (14, 2), ((5, 9), 3), (7, 1)])
def test_equals_torchvision_multiscale_roi_align(size, output_size, ratio):
    feats = fpn_features(*size)
    boxes = mixed_boxes(*size, n=150)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, ratio)
    pooled, order = pool_rois(pooler, feats, boxes, [size])
    assert order is not None and sorted(order.tolist()) == list(range(len(boxes)))
    expected = reference(pooler, feats, boxes, size)
    torch.testing.assert_close(restore_order(order, pooled), expected, rtol=1e-5, atol=1e-5)


def test_large_windows_use_threaded_torchvision_kernel_with_identical_numbers(monkeypatch):
    """With WINDOW_PER_BIN 0 every RoI goes to torchvision's kernel, split over threads: exact."""
    monkeypatch.setattr(roi_align, "WINDOW_PER_BIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    feats, boxes = fpn_features(96, 80), mixed_boxes(96, 80, n=40)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    pooled, order = pool_rois(pooler, feats, boxes, [(96, 80)])
    assert torch.equal(restore_order(order, pooled), reference(pooler, feats, boxes, (96, 80)))


def test_small_chunks_and_single_level_pooler(monkeypatch):
    monkeypatch.setattr(roi_align, "MAX_CHUNK", 3)
    feats, boxes = fpn_features(64, 64), mixed_boxes(64, 64, n=20)
    pooler = MultiScaleRoIAlign(["1"], 7, 2)
    pooled, order = pool_rois(pooler, feats, boxes, [(64, 64)])
    torch.testing.assert_close(restore_order(order, pooled), reference(pooler, feats, boxes, (64, 64)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["no boxes", "adaptive ratio", "float64", "batch of 2"])
def test_falls_back_to_the_pooler_itself(case):
    feats, boxes = fpn_features(64, 64), mixed_boxes(64, 64, n=10)
    ratio = 0 if case == "adaptive ratio" else 2
    if case == "no boxes":
        boxes = boxes[:0]
    if case == "float64":
        feats = OrderedDict((k, v.double()) for k, v in feats.items())
        boxes = boxes.double()
    if case == "batch of 2":
        feats = OrderedDict((k, torch.cat([v, v])) for k, v in feats.items())
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, ratio)
    pooled, order = pool_rois(pooler, feats, boxes, [(64, 64)])
    assert order is None
    assert torch.equal(pooled, reference(pooler, feats, boxes, (64, 64)))


def test_restore_order_inverts_the_permutation():
    rows = torch.arange(12.0).view(6, 2)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    restored = restore_order(order, rows)
    assert torch.equal(restored[order], rows) and restore_order(None, rows) is rows


def test_a_shared_level_cache_gives_the_same_pooling_across_calls():
    """The pipeline pools one image's RoIs in chunks, box and mask poolers sharing one cache."""
    feats, boxes = fpn_features(80, 120), mixed_boxes(80, 120, n=60)
    box_pooler, mask_pooler = (MultiScaleRoIAlign(["0", "1", "2", "3"], s, 2) for s in (7, 14))
    cache: dict = {}
    for pooler in (box_pooler, mask_pooler):
        parts = [restore_order(*reversed(pool_rois(pooler, feats, chunk, [(80, 120)], cache)))
                 for chunk in boxes.split(17)]
        torch.testing.assert_close(torch.cat(parts), reference(pooler, feats, boxes, (80, 120)),
                                   rtol=1e-5, atol=1e-5)
    assert sorted(cache) == ["0", "1", "2", "3"]


def batched_features(images: int, size: tuple[int, int], seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    per_image = [fpn_features(*size, seed=seed + i) for i in range(images)]
    return OrderedDict((k, torch.cat([f[k] for f in per_image]).requires_grad_()) for k in per_image[0])


def pooled_and_gradients(pooler, feats, boxes, sizes, grad_seed: int = 1):
    for level in feats.values():
        level.grad = None
    out = pooler(feats, boxes, sizes)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)))
    return out.detach(), {k: v.grad.clone() for k, v in feats.items() if v.grad is not None}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("output_size,names", [(7, ["0", "1", "2", "3"]), (14, ["0", "1", "2", "3"]), (7, ["2"])])
def test_training_pooler_gives_torchvision_outputs_and_gradients(monkeypatch, threads, output_size, names):
    """Boxes of every size over a batch of 3 images (RoIs on all four levels, and boxes on one
    image that straddle slices): forward and feature gradients equal torchvision's pooler."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    sizes = [(96, 112)] * 3
    boxes = [mixed_boxes(*sizes[0], n=40, seed=i) for i in range(3)]
    boxes[1] = boxes[1][:0]  # an image without RoIs
    feats = batched_features(3, sizes[0])
    expected = pooled_and_gradients(MultiScaleRoIAlign(names, output_size, 2), feats, boxes, sizes)
    parallel = ParallelRoIAlign(names, output_size, 2).train()
    got = pooled_and_gradients(parallel, feats, boxes, sizes)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert sorted(got[1]) == sorted(expected[1])
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-5)


def test_sliced_kernel_keeps_no_autograd_history_on_worker_threads(monkeypatch):
    """Worker threads start with grad mode on: the slices must not record autograd history on
    the shared output (the slices' bookkeeping on it would race)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    feature = torch.rand(2, 4, 24, 24, requires_grad=True)
    boxes = mixed_boxes(96, 96, n=12)
    rois = torch.cat([torch.arange(boxes.shape[0])[:, None] % 2, boxes], 1).float()
    out = torch.empty(boxes.shape[0], 4, 7, 7)
    roi_align._roi_align_on_slices(feature, rois, (7, 7), 0.25, 2, out)
    assert not out.requires_grad and out.grad_fn is None
    expected = torch.ops.torchvision.roi_align(feature.detach(), rois, 0.25, 7, 7, 2, False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_training_pooler_is_torchvisions_in_eval_mode_and_when_tracing(monkeypatch):
    feats, boxes = fpn_features(64, 64), mixed_boxes(64, 64, n=10)
    pooler = ParallelRoIAlign(["0", "1", "2", "3"], 7, 2)
    used = []
    monkeypatch.setattr(roi_align._ParallelRoIAlignFunction, "apply", lambda *a: used.append(a) or 1 / 0)
    eval_out = pooler.eval()(feats, [boxes], [(64, 64)])
    assert torch.equal(eval_out, reference(pooler, feats, boxes, (64, 64))) and not used
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert torch.equal(pooler.train()(feats, [boxes], [(64, 64)]), eval_out) and not used
