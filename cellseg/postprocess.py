"""Mask postprocessing: 28x28 mask probabilities -> COCO RLE per instance, fast and exact.

Reference semantics (what every result must equal, string for string): torchvision's
`roi_heads.paste_masks_in_image` (pad the M x M mask by 1, expand the box by (M+2)/M, truncate
to int64, resize the padded mask bilinearly (align_corners=False) to the integer box size,
paste it clipped into a full H x W canvas), then `canvas > threshold`, then
`pycocotools.mask.encode` of the full-size mask.

The fast path never builds the H x W canvas. Per instance it resizes (same `F.interpolate`
call on the same padded mask and integer size, so the float32 values are bit-identical) only to
its box, crops to the image, and lays the crop's columns, each framed by one background pixel
above and below, into one flat buffer shared by all instances. One vectorised pass over that
buffer finds every run of foreground in every column; a column's runs map to the full-frame
column-major RLE by adding that column's offset; runs touching across columns (crops spanning
the full image height) are merged. pycocotools' C code (`frPyObjects` of uncompressed counts)
then compresses the counts to the COCO string. Memory is O(sum of box areas), never O(N*H*W).
Instances with the same integer box size are resized in one batched `F.interpolate` call.

Two run finders: numpy on the host (default for CPU tensors) and torch on the masks' own device
(default for CUDA tensors). On CUDA the resizes, the buffer, the threshold and the run finding
all stay on the device; the host waits only for the size of one `nonzero` and for the single
device-to-host copy of the final run lengths, once per image, never per mask. Integer boxes are
computed on the host (from CPU boxes, as cellseg.pipeline's Detections carry them; boxes on the
device would cost one more small copy). `device_runs=True` forces the torch finder on CPU
tensors, which is how its code is tested here. CUDA ITSELF HAS NOT BEEN RUN HERE (no GPU on
the machine this was written on): the CUDA path is the same torch code, exercised on CPU only.

Where the reference misbehaves: for expanded integer boxes lying entirely outside the image,
torchvision's slicing with negative indices either raises or pastes nothing; we always paste
nothing, which equals the reference whenever the reference runs. A threshold below 0 makes the
canvas's untouched zeros foreground, as in the reference (handled by encoding the complement).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torch import Tensor

from cellseg.data.coco import rle_areas
from cellseg.errors import InputError

PASTE_PADDING = 1  # torchvision's paste_masks_in_image default: 1 px of zeros around the mask

# resized masks grouped by size: (instances, their resized masks [g, 1, h, w])
_Resized = list[tuple[list[int], Tensor]]


def paste_and_encode(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int],
                     threshold: float, *, device_runs: bool | None = None) -> list[dict]:
    """mask_probs [N,1,M,M] (or [N,M,M]), boxes [N,4] xyxy in image pixels, image_size (h, w)
    -> N COCO RLEs {"size": [h, w], "counts": str}, equal to torchvision paste_masks_in_image +
    `> threshold` + pycocotools encode. device_runs: find runs with torch on the masks' device
    (default: only for CUDA tensors) instead of numpy on the host."""
    masks, int_boxes, (im_h, im_w) = _check_inputs(mask_probs, boxes, image_size)
    n = int_boxes.shape[0]
    if n == 0:
        return []
    if device_runs is None:
        device_runs = masks.device.type != "cpu"
    if masks.dtype == torch.bfloat16:
        device_runs = True  # numpy has no bfloat16
    geometry = _CropGeometry.of(int_boxes, im_h, im_w)
    resized = _resize_groups(masks, geometry)
    # threshold < 0: the canvas's untouched zeros are foreground too. Then find the runs of the
    # complement (pixels inside crops not above threshold) and flip the counts.
    inverted = bool(torch.zeros((), dtype=masks.dtype) > threshold)
    if device_runs:
        counts, lengths = _counts_torch(resized, geometry, threshold, inverted, im_h, im_w,
                                        masks.device)
    else:
        counts, lengths = _counts_numpy(resized, geometry, threshold, inverted, im_h, im_w)
    if inverted:
        counts, lengths = _complement_counts(counts, lengths)
    return _compress(counts, lengths, im_h, im_w)


def rle_area_bbox(rles: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """RLEs -> (area [N] int64 pixel counts, tight bbox [N,4] float64 COCO [x, y, w, h];
    all zeros for an empty mask), computed by pycocotools from the RLEs alone."""
    if len(rles) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
    as_bytes = [{"size": r["size"], "counts": _as_bytes(r["counts"])} for r in rles]
    area = rle_areas(as_bytes)
    bbox = np.asarray(mask_util.toBbox(as_bytes), dtype=np.float64).reshape(-1, 4)
    return area, bbox


def detections_to_coco(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor,
                       mask_probs: Tensor, image_size: tuple[int, int],
                       category_ids: Sequence[int], mask_thresh: float) -> list[dict]:
    """One image's detections -> COCO results entries {"image_id", "category_id"
    (= category_ids[label - 1]), "bbox" [x, y, w, h] of the detection box rounded to 2 dp,
    "score", "segmentation" (RLE from paste_and_encode)}."""
    n = int(boxes.shape[0]) if boxes.ndim >= 1 else -1
    if scores.shape != (n,) or labels.shape != (n,):
        raise InputError(f"detections: scores {tuple(scores.shape)} and labels"
                         f" {tuple(labels.shape)} must both be ({n},) to match boxes"
                         f" {tuple(boxes.shape)}")
    label_list = [int(v) for v in labels.detach().cpu().tolist()]
    bad = [v for v in label_list if not 1 <= v <= len(category_ids)]
    if bad:
        raise InputError(f"detections: label {bad[0]} outside 1..{len(category_ids)}"
                         f" (the model's classes)")
    rles = paste_and_encode(mask_probs, boxes, image_size, mask_thresh)
    box_list = boxes.detach().cpu().double().tolist()
    score_list = scores.detach().cpu().double().tolist()
    return [{"image_id": int(image_id),
             "category_id": int(category_ids[label - 1]),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
             "score": float(score),
             "segmentation": rle}
            for (x1, y1, x2, y2), score, label, rle in zip(box_list, score_list, label_list, rles)]


def suppress_mask_overlaps(entries: Sequence[dict], iou_thresh: float) -> list[dict]:
    """Greedy mask NMS over one image's COCO entries: in order of score (ties: input order), an
    entry whose mask has IoU > `iou_thresh` with an already kept entry of the same category is
    dropped. torchvision's NMS compares boxes; this catches same-cell duplicates whose boxes
    differ while their masks agree. Only pairs whose masks' bounding boxes meet get an IoU
    (others have IoU 0), so the cost grows with overlapping pairs, not with N^2 mask IoUs.
    The kept entries keep their input order. `iou_thresh` >= 1 keeps everything."""
    n = len(entries)
    if n < 2 or iou_thresh >= 1.0:
        return list(entries)
    rles, cats, order, rank = _ranked(entries)
    suppressors = _overlapping_betters(rles, cats, rank, iou_thresh)
    kept = np.zeros(n, dtype=bool)
    for i in order.tolist():
        kept[i] = not kept[suppressors.get(i, (_NONE, None))[0]].any()
    return [e for e, k in zip(entries, kept.tolist()) if k]


def decay_overlap_scores(entries: Sequence[dict]) -> list[dict]:
    """Matrix NMS (Wang et al., SOLOv2, NeurIPS 2020; linear kernel) over one image's COCO
    entries: each entry's score is multiplied by min over the higher-scoring entries j of its
    category of (1 - IoU(i, j)) / (1 - IoU(j, best above j)), capped at 1. A fragment or a
    shifted second outline of a nucleus that mask NMS kept (IoU at most its threshold) then
    ranks below whole nuclei of its class instead of among them, which is what AP counts; an
    entry overlapping nothing better keeps its score. Order and masks are unchanged."""
    if len(entries) < 2:
        return list(entries)
    rles, cats, _, rank = _ranked(entries)
    betters = _overlapping_betters(rles, cats, rank, 0.0)
    best_above = np.zeros(len(entries))
    for i, (_, ious) in betters.items():
        best_above[i] = ious.max()
    decay = np.ones(len(entries))
    for i, (js, ious) in betters.items():
        decay[i] = min(1.0, float(((1.0 - ious) / np.maximum(1.0 - best_above[js], 1e-6)).min()))
    return [e if d >= 1.0 else {**e, "score": float(e["score"]) * float(d)} for e, d in zip(entries, decay)]


def apply_output_rules(entries: Sequence[dict], mask_nms_thresh: float, mask_score_decay: str,
                       score_floor: float = 0.0) -> list[dict]:
    """One image's entries after the model's output rules (ModelSpec.mask_nms_thresh and
    mask_score_decay): mask NMS, then the score decay; entries the decay takes below
    `score_floor` are dropped, so no output scores under the floor it was asked for."""
    kept = suppress_mask_overlaps(entries, mask_nms_thresh)
    if mask_score_decay != "matrix":
        return kept
    return [e for e in decay_overlap_scores(kept) if e["score"] >= score_floor]


def duplicate_pairs(entries: Sequence[dict], iou_thresh: float = 0.5) -> int:
    """How many pairs of one image's entries have the same category and mask IoU above
    `iou_thresh` (what suppress_mask_overlaps at that threshold would start from)."""
    if len(entries) < 2:
        return 0
    rles, cats, _, _ = _ranked(entries)
    pairs = _overlapping_betters(rles, cats, np.arange(len(entries)), iou_thresh)
    return sum(int(js.size) for js, _ in pairs.values())


def _ranked(entries: Sequence[dict]) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """(RLEs, categories, indices by descending score (ties: input order), rank of each entry)."""
    rles = [{"size": e["segmentation"]["size"], "counts": _as_bytes(e["segmentation"]["counts"])}
            for e in entries]
    cats = np.array([e["category_id"] for e in entries])
    order = np.argsort(-np.array([e["score"] for e in entries], dtype=np.float64), kind="stable")
    rank = np.empty(len(entries), dtype=np.int64)
    rank[order] = np.arange(len(entries))
    return rles, cats, order, rank


_NONE = np.zeros(0, dtype=np.int64)
_PAIR_ROWS = 256  # entries compared at once with their neighbours along x


def _overlapping_betters(rles: list[dict], cats: np.ndarray, rank: np.ndarray,
                         iou_thresh: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per entry i: the entries j ranked before it, of its category, with mask IoU(i, j) above
    `iou_thresh`, and those IoUs (only entries that have any). Within a category, entries sorted by their
    masks' left edge go in blocks against the window of entries whose x-extent can meet the
    block's; pycocotools' IoU skips pairs whose bounding boxes do not meet before touching
    their runs. So the work grows with the image's density, not with N^2."""
    bbox = np.asarray(mask_util.toBbox(rles), dtype=np.float64).reshape(-1, 4)
    out: dict[int, np.ndarray] = {}
    for cat in np.unique(cats).tolist():
        members = np.flatnonzero(cats == cat)
        members = members[np.argsort(bbox[members, 0], kind="stable")]
        left, right = bbox[members, 0], bbox[members, 0] + bbox[members, 2]
        widest = float(bbox[members, 2].max())
        for start in range(0, members.size, _PAIR_ROWS):
            rows = members[start:start + _PAIR_ROWS]
            lo = int(np.searchsorted(left, left[start] - widest, side="left"))
            hi = int(np.searchsorted(left, right[start:start + _PAIR_ROWS].max(), side="left"))
            cols = members[lo:hi]
            ious = np.asarray(mask_util.iou([rles[i] for i in rows.tolist()], [rles[j] for j in cols.tolist()],
                                            [0] * cols.size)).reshape(rows.size, cols.size)
            better = rank[cols][None] < rank[rows][:, None]
            hits = (ious > iou_thresh) & better
            for r in np.flatnonzero(hits.any(axis=1)).tolist():
                out[int(rows[r])] = (cols[hits[r]], ious[r, hits[r]])
    return out


# ---------------------------------------------------------------------------------------------
# input checks and torchvision's integer box arithmetic

def _check_inputs(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int]
                  ) -> tuple[Tensor, np.ndarray, tuple[int, int]]:
    if len(image_size) != 2 or min(int(image_size[0]), int(image_size[1])) < 1:
        raise InputError(f"paste_and_encode: image size {tuple(image_size)} must be (h, w) >= 1")
    im_h, im_w = int(image_size[0]), int(image_size[1])
    masks = mask_probs if mask_probs.ndim == 4 else mask_probs.unsqueeze(1)
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[2] != masks.shape[3]:
        raise InputError(f"paste_and_encode: mask probabilities {tuple(mask_probs.shape)}"
                         f" must be [N,1,M,M]")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise InputError(f"paste_and_encode: boxes {tuple(boxes.shape)} must be"
                         f" [{masks.shape[0]},4] to match masks {tuple(mask_probs.shape)}")
    if masks.shape[2] < 1:
        raise InputError(f"paste_and_encode: empty masks {tuple(mask_probs.shape)}")
    host_boxes = boxes.detach().cpu()
    if not bool(torch.isfinite(host_boxes).all()):
        raise InputError("paste_and_encode: boxes contain NaN or infinite coordinates")
    return masks.detach(), _expanded_int_boxes(host_boxes, masks.shape[-1]), (im_h, im_w)


def _expanded_int_boxes(boxes: Tensor, mask_side: int) -> np.ndarray:
    """torchvision expand_masks/expand_boxes + .to(int64), op for op (same float rounding)."""
    scale = float(mask_side + 2 * PASTE_PADDING) / mask_side
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half *= scale
    h_half *= scale
    expanded = torch.zeros_like(boxes)
    expanded[:, 0] = x_c - w_half
    expanded[:, 2] = x_c + w_half
    expanded[:, 1] = y_c - h_half
    expanded[:, 3] = y_c + h_half
    return expanded.to(dtype=torch.int64).numpy()


class _CropGeometry:
    """Per instance: resize size (h, w), the crop of the resized mask that lands in the image
    (rows r0:r0+ch, cols c0:c0+cw) and where it lands (y0, x0); where each crop's padded columns
    start in the flat buffer."""

    def __init__(self, size_h, size_w, r0, c0, y0, x0, crop_h, crop_w) -> None:
        self.size_h, self.size_w = size_h, size_w
        self.r0, self.c0, self.y0, self.x0 = r0, c0, y0, x0
        self.crop_h, self.crop_w = crop_h, crop_w
        col_len = crop_h + 2  # one background pixel above and below every column
        self.seg_len = crop_w * col_len
        self.seg_start = np.concatenate([[0], np.cumsum(self.seg_len)[:-1]]).astype(np.int64)
        self.total = int(self.seg_len.sum())

    @classmethod
    def of(cls, int_boxes: np.ndarray, im_h: int, im_w: int) -> "_CropGeometry":
        b0, b1, b2, b3 = (int_boxes[:, k] for k in range(4))
        size_w = np.maximum(b2 - b0 + 1, 1)  # torchvision: w = max(int(x2 - x1 + 1), 1)
        size_h = np.maximum(b3 - b1 + 1, 1)
        x0, x1 = np.maximum(b0, 0), np.minimum(b2 + 1, im_w)
        y0, y1 = np.maximum(b1, 0), np.minimum(b3 + 1, im_h)
        inside = (x1 > x0) & (y1 > y0)  # otherwise nothing is pasted
        crop_w = np.where(inside, x1 - x0, 0)
        crop_h = np.where(inside, y1 - y0, 0)
        return cls(size_h, size_w, y0 - b1, x0 - b0, y0, x0, crop_h, crop_w)

    def column_tables(self, im_h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every padded column in the buffer: its start index, the offset that maps a buffer
        index in it to a full-frame column-major pixel index, and its instance."""
        inst = np.repeat(np.arange(self.crop_w.shape[0], dtype=np.int64), self.crop_w)
        first_col = np.concatenate([[0], np.cumsum(self.crop_w)[:-1]]).astype(np.int64)
        j = np.arange(inst.shape[0], dtype=np.int64) - first_col[inst]  # column within the crop
        col_start = self.seg_start[inst] + j * (self.crop_h[inst] + 2)
        frame_first = (self.x0[inst] + j) * im_h + self.y0[inst]  # frame index of crop row 0
        return col_start, frame_first - (col_start + 1), inst


def _resize_groups(masks: Tensor, geometry: _CropGeometry) -> _Resized:
    """[(instances, their resized masks [g,1,h,w])] covering every instance with a non-empty
    crop; one F.interpolate per distinct (h, w), on the masks' device, on the same padded input
    as torchvision's (batching does not change any output value: each is computed alone)."""
    padded = F.pad(masks, (PASTE_PADDING,) * 4)
    wanted = np.flatnonzero(geometry.crop_w > 0)
    if wanted.size == 0:
        return []
    keys = geometry.size_h[wanted] * (int(geometry.size_w.max()) + 1) + geometry.size_w[wanted]
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    out: _Resized = []
    for members in np.split(wanted[order], bounds):
        first = int(members[0])
        size = (int(geometry.size_h[first]), int(geometry.size_w[first]))
        if members.size == 1:
            source = padded[first:first + 1]
        else:  # stacking views: no index tensor to copy to the device
            source = torch.stack([padded[int(i)] for i in members])
        resized = F.interpolate(source, size=size, mode="bilinear", align_corners=False)
        out.append((members.tolist(), resized))
    return out


# ---------------------------------------------------------------------------------------------
# run finding: the flat buffer of padded crop columns -> uncompressed RLE counts per instance

def _placements(resized: _Resized, g: _CropGeometry, convert: Callable[[Tensor], Any]
                ) -> Iterator[tuple[int, int, int, int, int, int, Any]]:
    """Per instance with a crop: (instance, crop row0, col0, height, width, buffer start,
    its resized mask [h, w] as `convert` makes it)."""
    r0, c0, ch, cw, start = (a.tolist() for a in (g.r0, g.c0, g.crop_h, g.crop_w, g.seg_start))
    for members, batch in resized:
        values = convert(batch[:, 0])
        for k, i in enumerate(members):
            yield i, r0[i], c0[i], ch[i], cw[i], start[i], values[k]


def _counts_numpy(resized: _Resized, geometry: _CropGeometry, threshold: float,
                  inverted: bool, im_h: int, im_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Uncompressed counts of every instance, flat, and how many belong to each instance."""
    g = geometry
    dtype = resized[0][1].numpy().dtype if resized else np.float32
    # column framing pixels: never foreground (nor in the complement, when inverted)
    buffer = np.full(g.total, np.inf if inverted else -np.inf, dtype=dtype)
    for i, r0, c0, ch, cw, start, values in _placements(resized, g, lambda t: t.numpy()):
        columns = buffer[start:start + cw * (ch + 2)].reshape(cw, ch + 2)
        columns[:, 1:-1] = values[r0:r0 + ch, c0:c0 + cw].T
    # torch's comparison, so the scalar threshold is rounded exactly as `canvas > threshold` does
    fg = (torch.from_numpy(buffer) > threshold).numpy()
    if inverted:
        fg = ~fg
    edges = np.flatnonzero(fg[1:] != fg[:-1]) + 1  # alternate rise, fall (columns start/end 0)
    n, total = len(g.crop_w), im_h * im_w
    if edges.size == 0:
        return np.full(n, total, dtype=np.int64), np.ones(n, dtype=np.int64)
    col_start, col_offset, col_inst = g.column_tables(im_h)
    rise, fall = edges[0::2], edges[1::2]
    col = np.searchsorted(col_start, rise, side="right") - 1
    starts, ends, inst = rise + col_offset[col], fall + col_offset[col], col_inst[col]
    # a run ending at a column's bottom row continues at the next column's top row: merge
    joined = (ends[:-1] == starts[1:]) & (inst[:-1] == inst[1:])
    keep_start = np.concatenate([[True], ~joined])
    keep_end = np.concatenate([~joined, [True]])
    return _assemble_counts_numpy(starts[keep_start], ends[keep_end], inst[keep_start], n, total)


def _assemble_counts_numpy(starts: np.ndarray, ends: np.ndarray, inst: np.ndarray, n: int,
                           total: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground runs [start, end) in frame order, grouped by instance -> flat counts and their
    per-instance lengths: zeros, ones, zeros, ..., ending with the trailing zeros if any (as
    pycocotools' rleEncode: a mask ending in foreground has no trailing 0)."""
    if inst.size == 0:
        return np.full(n, total, dtype=np.int64), np.ones(n, dtype=np.int64)
    new_inst = np.concatenate([[True], inst[1:] != inst[:-1]])
    last_of_inst = np.concatenate([new_inst[1:], [True]])
    prev_end = np.concatenate([[0], ends[:-1]])
    prev_end[new_inst] = 0
    runs_per = np.bincount(inst, minlength=n)
    last_end = np.zeros(n, np.int64)
    last_end[inst[last_of_inst]] = ends[last_of_inst]
    tail = total - last_end
    lengths = 2 * runs_per + (tail > 0)
    inst_offset = np.cumsum(lengths) - lengths
    rank = np.arange(inst.size, dtype=np.int64) - (np.cumsum(runs_per) - runs_per)[inst]
    pos = inst_offset[inst] + 2 * rank
    counts = np.empty(int(lengths.sum()), dtype=np.int64)
    counts[pos] = starts - prev_end
    counts[pos + 1] = ends - starts
    tails = np.flatnonzero(tail > 0)
    counts[inst_offset[tails] + 2 * runs_per[tails]] = tail[tails]
    return counts, lengths


def _counts_torch(resized: _Resized, geometry: _CropGeometry, threshold: float,
                  inverted: bool, im_h: int, im_w: int, device: torch.device
                  ) -> tuple[np.ndarray, np.ndarray]:
    """_counts_numpy with every per-pixel step in torch on `device`. Host waits: the size of
    `nonzero` and the single device-to-host copy of the counts; everything between is
    sync-free (no boolean-mask indexing, no bincount, no blocking host-to-device copy)."""
    g = geometry
    n, total = len(g.crop_w), im_h * im_w
    tables = _to_device(np.stack(g.column_tables(im_h)), device)  # before any wait
    dtype = resized[0][1].dtype if resized else torch.float32
    buffer = torch.full((g.total,), float("inf") if inverted else float("-inf"), dtype=dtype,
                        device=device)
    for i, r0, c0, ch, cw, start, values in _placements(resized, g, lambda t: t):
        columns = buffer[start:start + cw * (ch + 2)].view(cw, ch + 2)
        columns[:, 1:-1] = values[r0:r0 + ch, c0:c0 + cw].t()
    fg = buffer > threshold
    if inverted:
        fg = ~fg
    edges = torch.nonzero(fg[1:] != fg[:-1]).squeeze(1) + 1  # waits: its size is data-dependent
    if edges.numel() == 0:
        return np.full(n, total, dtype=np.int64), np.ones(n, dtype=np.int64)
    col_start, col_offset, col_inst = tables[0], tables[1], tables[2]
    rise, fall = edges[0::2], edges[1::2]
    col = torch.searchsorted(col_start, rise.contiguous(), right=True) - 1
    starts, ends, inst = rise + col_offset[col], fall + col_offset[col], col_inst[col]
    # merge runs continuing across columns, compacting with a scatter instead of a boolean
    # index (which would wait); slots past the merged count belong to a dummy instance n
    raw = starts.numel()
    one_true = torch.ones(1, dtype=torch.bool, device=device)
    joined = (ends[:-1] == starts[1:]) & (inst[:-1] == inst[1:])
    is_head, is_last = torch.cat([one_true, ~joined]), torch.cat([~joined, one_true])
    merged_id = torch.cumsum(is_head.to(torch.int64), 0) - 1
    dump = torch.full_like(merged_id, raw)
    m_start = torch.zeros(raw + 1, dtype=torch.int64, device=device)
    m_end = torch.zeros(raw + 1, dtype=torch.int64, device=device)
    m_inst = torch.full((raw + 1,), n, dtype=torch.int64, device=device)
    m_start.scatter_(0, torch.where(is_head, merged_id, dump), starts)
    m_inst.scatter_(0, torch.where(is_head, merged_id, dump), inst)
    m_end.scatter_(0, torch.where(is_last, merged_id, dump), ends)
    starts, ends, inst = m_start[:raw], m_end[:raw], m_inst[:raw]
    n_slots = n + 1  # real instances + the dummy holding unused slots
    new_inst = torch.cat([one_true, inst[1:] != inst[:-1]])
    prev_end = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), ends[:-1]])
    prev_end = torch.where(new_inst, torch.zeros_like(prev_end), prev_end)
    runs_per = torch.zeros(n_slots, dtype=torch.int64, device=device)
    runs_per.scatter_add_(0, inst, torch.ones_like(inst))
    last_end = torch.zeros(n_slots, dtype=torch.int64, device=device)
    last_end.scatter_reduce_(0, inst, ends, reduce="amax")  # runs ascend within an instance
    tail = total - last_end
    lengths = 2 * runs_per + (tail > 0).to(torch.int64)
    inst_offset = torch.cumsum(lengths, 0) - lengths
    rank = torch.arange(raw, dtype=torch.int64, device=device) \
        - (torch.cumsum(runs_per, 0) - runs_per)[inst]
    pos = inst_offset[inst] + 2 * rank
    size = 2 * raw + n_slots + 1  # upper bound on all counts, + 1 dump slot
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    counts[pos] = starts - prev_end
    counts[pos + 1] = ends - starts
    tail_pos = torch.where(tail > 0, inst_offset + 2 * runs_per, size - 1)
    counts[tail_pos[:n]] = tail[:n]
    host = torch.cat([lengths[:n], counts]).cpu().numpy()  # the one device-to-host copy
    lengths_np = host[:n]
    return host[n:n + int(lengths_np.sum())], lengths_np


def _complement_counts(counts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of each instance's complement: the same runs with the zeros/ones roles swapped,
    i.e. a leading 0 added (or, where the counts start with an empty zeros run, removed)."""
    starts = np.cumsum(lengths) - lengths
    leads_zero = counts[starts] == 0
    kept = np.delete(counts, starts[leads_zero])
    shifted = starts - (np.cumsum(leads_zero) - leads_zero)
    return (np.insert(kept, shifted[~leads_zero], 0),
            lengths + np.where(leads_zero, -1, 1))


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """Host array -> device without a blocking copy (pinned + non_blocking on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# compression to COCO strings

def _compress(counts: np.ndarray, lengths: np.ndarray, im_h: int, im_w: int) -> list[dict]:
    """Flat uncompressed counts -> compressed COCO RLE strings via pycocotools' C code."""
    counts32 = counts.astype(np.uint32)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    uncompressed = [{"size": [im_h, im_w], "counts": counts32[bounds[k]:bounds[k + 1]]}
                    for k in range(len(lengths))]
    encoded = mask_util.frPyObjects(uncompressed, im_h, im_w)
    return [{"size": [im_h, im_w], "counts": e["counts"].decode("ascii")} for e in encoded]


def _as_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else counts
