"""Multi-scale RoIAlign for CPU inference as batched matrix products.

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
pooler unchanged."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

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


def _threaded_roi_align(feature: Tensor, boxes: Tensor, output_size: tuple[int, int], scale: float,
                        ratio: int, out: Tensor) -> None:
    """torchvision's kernel (one thread per call; it releases the GIL) on slices of the RoIs in
    parallel, one slice per torch thread: the same numbers, in a fraction of the time."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.zeros(boxes.shape[0], 1, dtype=boxes.dtype), boxes], 1)
    parts = max(1, min(torch.get_num_threads(), rois.shape[0]))
    bounds = [rois.shape[0] * i // parts for i in range(parts + 1)]

    def run(i: int) -> None:
        out[bounds[i]:bounds[i + 1]] = roi_align(feature, rois[bounds[i]:bounds[i + 1]], output_size, scale, ratio)

    if parts == 1:
        run(0)
        return
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(run, range(parts)))


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
