"""Multi-scale RoIAlign on the CPU: batched matrix products for inference, RoIs split over
threads for training.

torchvision's CPU `roi_align` kernel is scalar and single-threaded: on a 256 px crop with ~500
detections its two poolers take longer than the whole backbone. RoIAlign (aligned=False, fixed
sampling ratio) is separable: a pooled bin is Ay[p, :] @ F[c, window] @ Ax[q, :]^T, where Ay / Ax
hold the bilinear weights of the bin's sample rows / columns averaged over the sampling grid. So
each RoI's output is one small GEMM, `window (C x My*Mx) @ kron(Ay, Ax)^T (My*Mx x P*Q)`, run as
one multi-threaded `bmm` per chunk of RoIs with similar window sizes, written straight into the
output. The weights follow torchvision's kernel line by line (sample positions, the [-1, size]
validity test, clamping at 0 and size - 1, averaging over the sampling grid), so results equal
`MultiScaleRoIAlign` up to float rounding (tested to 1e-5).

RoIs are pooled grouped by level and window size, so rows come back permuted: `pool_rois` returns
the permutation and callers put the (much smaller) head outputs back in order with
`restore_order`. RoIs with windows larger than WINDOW_PER_BIN pixels per output bin (big
objects, where the dense product costs more than the sampling) go to torchvision's kernel, split
over threads. Anything but float32 features on the CPU with a fixed sampling ratio uses the
pooler unchanged.

Training (`ParallelRoIAlign`, the model's poolers): torchvision's forward and backward kernels,
each run on slices of the RoIs in parallel, one slice per torch thread; the backward's per-slice
feature gradients are summed. The same numbers as the pooler (tested), in about half the time on
2 cores, where the backward over the mask head's ~256 RoIs per batch is ~10 % of an iteration."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

# A RoI whose window (the square of its longer side, in feature pixels) exceeds WINDOW_PER_BIN x
# its output bins goes to torchvision's kernel: measured on 2 CPU cores, that kernel costs a fixed
# ~360 us per 14x14 RoI (~80 us per 7x7) whatever the RoI's size, and the product passes it near
# 2.5 window pixels per bin (window ~400 for 14x14, ~130 for 7x7).
WINDOW_PER_BIN = 2
# Floats in one chunk's kron matrix (chunk x window x P*Q): ~8 MB, so a chunk stays in cache.
CHUNK_FLOATS = 2_000_000
MAX_CHUNK = 64


def _axis_samples(lo: Tensor, hi: Tensor, scale: float, bins: int, ratio: int, size: int):
    """Bilinear taps along one axis for every RoI, as torchvision's roi_align pre_calc computes
    them: (low index, high index, low weight, high weight) per sample, each (R, bins*ratio), the
    sampling-grid average folded into the weights; plus each RoI's window start and length."""
    start = lo * scale
    length = torch.clamp(hi * scale - start, min=1.0)
    bin_size = length / bins
    bin_index = torch.arange(bins, dtype=lo.dtype).repeat_interleave(ratio)
    offset = (torch.arange(ratio, dtype=lo.dtype) + 0.5).repeat(bins)
    y = start[:, None] + bin_index[None] * bin_size[:, None] + offset[None] * bin_size[:, None] / ratio
    valid = (y >= -1.0) & (y <= size)  # outside this band a sample is 0, inside it is clamped
    y = y.clamp(min=0)
    low = y.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    y = torch.where(at_edge, low.to(y.dtype), y)
    frac = y - low
    scale_valid = valid.to(y.dtype) / ratio
    first = torch.where(valid, low, torch.full_like(low, size)).amin(1).clamp(max=size - 1)
    last = torch.where(valid, high, torch.full_like(high, -1)).amax(1)
    span = (last - first + 1).clamp(min=1)
    return low, high, (1 - frac) * scale_valid, frac * scale_valid, first, span


def _axis_matrix(taps, rows: Tensor, window: int, bins: int, ratio: int) -> Tensor:
    """(r, bins, window) weights of the window's pixels for each output bin of the RoIs `rows`."""
    low, high, w_low, w_high, first, _ = (t[rows] for t in taps)
    r = rows.shape[0]
    weights = torch.zeros(r, bins * ratio, window + 1, dtype=w_low.dtype)  # column `window`: discard
    weights.scatter_add_(2, (low - first[:, None]).clamp(0, window)[..., None], w_low[..., None])
    weights.scatter_add_(2, (high - first[:, None]).clamp(0, window)[..., None], w_high[..., None])
    return weights[:, :, :window].reshape(r, bins, ratio, window).sum(2)


def _pool_level(feature: Tensor, pixels: Tensor, boxes: Tensor, scale: float, output_size: tuple[int, int],
                ratio: int, out: Tensor) -> Tensor:
    """RoIAlign of `boxes` on one level into `out` (len(boxes) rows); returns the order used."""
    _, channels, height, width = feature.shape
    bins_y, bins_x = output_size
    taps_y = _axis_samples(boxes[:, 1], boxes[:, 3], scale, bins_y, ratio, height)
    taps_x = _axis_samples(boxes[:, 0], boxes[:, 2], scale, bins_x, ratio, width)
    # Chunks are padded to their largest window, so group RoIs by the longer side of theirs.
    side = torch.maximum(taps_y[5], taps_x[5])
    order = torch.argsort(side, stable=True)
    window = side[order] ** 2
    n, start = boxes.shape[0], 0
    while start < n:
        if int(window[start]) > WINDOW_PER_BIN * bins_y * bins_x:  # sorted: the rest are large too
            _threaded_roi_align(feature, boxes[order[start:]], output_size, scale, ratio, out[start:])
            break
        probe = int(window[min(n, start + MAX_CHUNK) - 1])
        count = max(1, min(n - start, MAX_CHUNK, CHUNK_FLOATS // (probe * bins_y * bins_x)))
        rows = order[start:start + count]
        span_y, span_x = int(taps_y[5][rows].max()), int(taps_x[5][rows].max())
        a_y = _axis_matrix(taps_y, rows, span_y, bins_y, ratio)  # (r, P, My)
        a_x = _axis_matrix(taps_x, rows, span_x, bins_x, ratio)  # (r, Q, Mx)
        kron = (a_y.transpose(1, 2)[:, :, None, :, None] * a_x.transpose(1, 2)[:, None, :, None, :])
        kron = kron.reshape(count, span_y * span_x, bins_y * bins_x)
        ys = (taps_y[4][rows, None] + torch.arange(span_y)).clamp(max=height - 1)
        xs = (taps_x[4][rows, None] + torch.arange(span_x)).clamp(max=width - 1)
        win = pixels.index_select(0, (ys[:, :, None] * width + xs[:, None, :]).reshape(-1))
        win = win.view(count, span_y * span_x, channels).transpose(1, 2)  # (r, C, My*Mx), a view
        torch.bmm(win, kron, out=out[start:start + count].view(count, channels, bins_y * bins_x))
        start += count
    return order


def _on_slices(count: int, run: Callable[[int, int], object]) -> list:
    """run(start, stop) on `count` rows split into one slice per torch thread, in parallel
    (torchvision's kernels are single-threaded and release the GIL); results in slice order."""
    parts = max(1, min(torch.get_num_threads(), count))
    bounds = [count * i // parts for i in range(parts + 1)]
    if parts == 1:
        return [run(0, count)]
    with ThreadPoolExecutor(parts) as pool:
        return list(pool.map(run, bounds[:-1], bounds[1:]))


def _threaded_roi_align(feature: Tensor, boxes: Tensor, output_size: tuple[int, int], scale: float,
                        ratio: int, out: Tensor) -> None:
    """torchvision's kernel on slices of one image's RoIs in parallel: the same numbers, in a
    fraction of the time."""
    rois = torch.cat([torch.zeros(boxes.shape[0], 1, dtype=boxes.dtype), boxes], 1)
    _roi_align_on_slices(feature, rois, output_size, scale, ratio, out)


def _roi_align_on_slices(feature: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float,
                         ratio: int, out: Tensor) -> None:
    """torchvision's roi_align kernel (aligned=False) of `rois` (batch index first) into `out`,
    one slice of the RoIs per torch thread. Grad mode is per thread and a worker starts with it
    on, so each slice runs under no_grad: otherwise the slices' autograd bookkeeping on the shared
    `out` races (the training forward's feature requires grad)."""
    def run(start: int, stop: int) -> None:
        with torch.no_grad():
            out[start:stop] = torch.ops.torchvision.roi_align(feature, rois[start:stop], scale, output_size[0],
                                                              output_size[1], ratio, False)

    _on_slices(rois.shape[0], run)


class _ParallelRoIAlignFunction(torch.autograd.Function):
    """torchvision's roi_align (aligned=False) with forward and backward split over threads."""

    @staticmethod
    def forward(ctx, feature: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float,  # type: ignore[override]
                ratio: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.config = (tuple(feature.shape), output_size, scale, ratio)
        out = feature.new_empty(rois.shape[0], feature.shape[1], *output_size)
        _roi_align_on_slices(feature, rois, output_size, scale, ratio, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        (n, c, h, w), (ph, pw), scale, ratio = ctx.config
        grad = grad.contiguous()

        def run(start: int, stop: int) -> Tensor:
            return torch.ops.torchvision._roi_align_backward(grad[start:stop], rois[start:stop], scale, ph, pw,
                                                              n, c, h, w, ratio, False)

        parts = _on_slices(rois.shape[0], run)
        total = parts[0]
        for part in parts[1:]:
            total += part
        return total, None, None, None, None


class ParallelRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign whose training forward and backward run on all torch threads. Eval
    mode, tracing and export, and anything but CPU float32 use torchvision's pooler unchanged, so
    inference and ONNX graphs are exactly torchvision's. No state: checkpoints are unchanged."""

    def forward(self, x: "dict[str, Tensor]", boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        maps = [v for k, v in x.items() if k in self.featmap_names]
        if not (self.training and maps and all(m.device.type == "cpu" and m.dtype == torch.float32 for m in maps)
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()):
            return super().forward(x, boxes, image_shapes)
        from cellseg.tv_compat import setup_pooler_scales  # the pooler's own level setup

        if self.scales is None or self.map_levels is None:
            setup_pooler_scales(self, maps, image_shapes)
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], 1) for i, b in enumerate(boxes)])
        size = tuple(self.output_size)
        if len(maps) == 1:
            return _ParallelRoIAlignFunction.apply(maps[0], rois, size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        result = maps[0].new_zeros(rois.shape[0], maps[0].shape[1], *size)
        for level, (feature, scale) in enumerate(zip(maps, self.scales)):
            index = torch.where(levels == level)[0]
            result[index] = _ParallelRoIAlignFunction.apply(feature, rois[index], size, scale, self.sampling_ratio)
        return result


def _channels_last(feature: Tensor) -> Tensor:
    """A (1, C, H, W) level as (H*W, C) contiguous rows, the layout the window gathers read."""
    return feature[0].permute(1, 2, 0).reshape(-1, feature.shape[1]).contiguous()


def fast_path_applies(pooler: nn.Module, features: "dict[str, Tensor]") -> bool:
    values = list(features.values())
    return (getattr(pooler, "sampling_ratio", 0) > 0 and hasattr(pooler, "featmap_names")
            and all(v.device.type == "cpu" and v.dtype == torch.float32 and v.shape[0] == 1 for v in values))


@torch.no_grad()
def pool_rois(pooler: nn.Module, features: "dict[str, Tensor]", boxes: Tensor, image_sizes: list[tuple[int, int]],
              level_cache: "dict[str, Tensor] | None" = None) -> tuple[Tensor, Tensor | None]:
    """`pooler(features, [boxes], image_sizes)` for one image, rows possibly permuted: returns
    (pooled, order) with pooled[i] the RoI boxes[order[i]]; order is None when rows are in input
    order (the pooler itself ran: not CPU float32, adaptive sampling ratio, or no boxes).
    `level_cache`: a dict shared by every call on one image's features; it keeps each level's
    channels-last copy (on a 1024 px image the finest level alone is 64 MB to transpose)."""
    if boxes.shape[0] == 0 or not fast_path_applies(pooler, features):
        return pooler(features, [boxes], image_sizes), None
    from cellseg.tv_compat import setup_pooler_scales  # the pooler's own level setup

    names = [k for k in features if k in pooler.featmap_names]
    maps = [features[k] for k in names]
    cache = {} if level_cache is None else level_cache
    for name in names:
        if name not in cache:
            cache[name] = _channels_last(features[name])
    if pooler.scales is None or pooler.map_levels is None:
        setup_pooler_scales(pooler, maps, image_sizes)
    boxes = boxes.float()
    if len(maps) == 1:
        levels = torch.zeros(boxes.shape[0], dtype=torch.int64)
    else:
        levels = pooler.map_levels([boxes]).to(torch.int64)
    out = torch.empty(boxes.shape[0], maps[0].shape[1], *pooler.output_size, dtype=torch.float32)
    orders, start = [], 0
    for level, (name, feature, scale) in enumerate(zip(names, maps, pooler.scales)):
        index = torch.nonzero(levels == level).flatten()
        if index.numel() == 0:
            continue
        n = index.numel()
        orders.append(index[_pool_level(feature, cache[name], boxes[index], scale, pooler.output_size,
                                        pooler.sampling_ratio, out[start:start + n])])
        start += n
    return out, torch.cat(orders)


def restore_order(order: Tensor | None, rows: Tensor) -> Tensor:
    """Rows computed in `order` (from pool_rois) back in input order."""
    if order is None:
        return rows
    return torch.empty_like(rows).index_copy_(0, order.to(rows.device), rows)
