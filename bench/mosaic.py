"""Native-scale check: tile validation crops into large mosaics and keep their ground truth.

`python -m cellseg.bench.mosaic DATA --samples-file val.txt --grid 4 --out DIR` writes two HW3
layouts: DIR/crops (the crops themselves) and DIR/mosaics (grid x grid crops per image, e.g.
4 x 4 of 256 px = 1024 px). A model that sees cells at their pixel size scores about the same
on both; a model that resizes every image to a fixed side does not."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cellseg.data.hw3 import class_names_of, find_train_root, read_sample
from cellseg.errors import InputError


def class_label_images(masks: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[int, np.ndarray]:
    """Per present class k, a uint16 label image numbering that class's instances 1..N_k."""
    out: dict[int, np.ndarray] = {}
    for k in range(1, n_classes + 1):
        idx = np.flatnonzero(labels == k)
        if idx.size:
            label = np.zeros(masks.shape[1:], np.uint16)
            for j, i in enumerate(idx, start=1):
                label[masks[i]] = j
            out[k] = label
    return out


def write_sample(folder: Path, image: np.ndarray, class_labels: dict[int, np.ndarray]) -> None:
    """One HW3 sample: uint8 RGB image.tif and class<k>.tif label images."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "image.tif", (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), compression="zlib")
    for k, label in class_labels.items():
        tifffile.imwrite(folder / f"class{k}.tif", label, compression="zlib")


def build_mosaics(data: Path, sample_ids: list[str], grid: int, out: Path) -> tuple[Path, Path]:
    root = find_train_root(data)
    class_names = class_names_of(root)
    n_classes = len(class_names)
    samples = [read_sample(root / sid, class_names) for sid in sample_ids]
    if not samples:
        raise InputError("no samples given for the mosaics")
    h, w = samples[0].image.shape[:2]
    tiles = []
    for s in samples:
        if s.image.shape[:2] != (h, w):
            raise InputError(f"{s.sample_id}: size {s.image.shape[:2]} differs from {(h, w)}; mosaics need equal crops")
        labels = class_label_images(s.masks, s.labels, n_classes)
        write_sample(out / "crops" / "train" / s.sample_id, s.image, labels)
        tiles.append((s.image, labels))
    per = grid * grid
    for m in range(len(tiles) // per):
        image = np.zeros((grid * h, grid * w, 3), np.float32)
        big: dict[int, np.ndarray] = {}
        offset = {k: 0 for k in range(1, n_classes + 1)}
        for t, (tile, labels) in enumerate(tiles[m * per:(m + 1) * per]):
            r, c = divmod(t, grid)
            window = (slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
            image[window] = tile
            for k, label in labels.items():
                canvas = big.setdefault(k, np.zeros((grid * h, grid * w), np.uint16))
                canvas[window] = np.where(label > 0, label.astype(np.uint16) + offset[k], 0)
                offset[k] += int(label.max())
        write_sample(out / "mosaics" / "train" / f"mosaic_{m:03d}", image, big)
    return out / "crops", out / "mosaics"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--samples-file", type=Path, required=True, help="one sample id per line")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ids = [line.strip() for line in args.samples_file.read_text().splitlines() if line.strip()]
    per = args.grid ** 2
    ids = ids[: len(ids) // per * per]  # whole mosaics only: crops and mosaics hold the same cells
    crops, mosaics = build_mosaics(args.data, ids, args.grid, args.out)
    print(f"wrote {crops} ({len(ids)} crops) and {mosaics} ({len(ids) // per} mosaics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
