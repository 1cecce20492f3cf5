import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.data.coco import decode_rle, load_coco_gt
from cellseg.data.hw3 import class_names_of, list_sample_dirs, list_test_images, read_id_entries, read_sample
from cellseg.data.images import read_image, read_label_image
from cellseg.data.synth import MANIFEST, synthesize
from cellseg.errors import InputError, OutputExistsError

FOUR = ("class1", "class2", "class3", "class4")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("s") / "data", n_train=8, n_test=3, seed=0, size=128)


def _trait_dirs(root: Path, trait: str) -> list[Path]:
    manifest = json.loads((root / MANIFEST).read_text())
    return [root / "train" / sid for sid, info in manifest["train"].items() if trait in info["traits"]]


def test_layout_and_every_sample_reads(synth_root: Path) -> None:
    dirs = list_sample_dirs(synth_root)
    assert len(dirs) == 8
    assert class_names_of(synth_root) == FOUR
    manifest = json.loads((synth_root / MANIFEST).read_text())
    seen_labels: set[int] = set()
    for d in dirs:
        sample = read_sample(d, FOUR)
        assert sample.image.shape == (128, 128, 3)
        assert len(sample.labels) == manifest["train"][d.name]["instances"]
        assert np.all(sample.masks.reshape(len(sample.labels), 128 * 128).any(axis=1))
        seen_labels |= set(sample.labels.tolist())
    assert seen_labels == {1, 2, 3, 4}


def test_awkward_traits(synth_root: Path) -> None:
    (rgba,) = _trait_dirs(synth_root, "rgba_lzw")
    with tifffile.TiffFile(rgba / "image.tif") as tif:
        page = tif.pages[0]
        assert page.shape[-1] == 4 and page.compression == tifffile.COMPRESSION.LZW
    assert read_image(rgba / "image.tif").shape == (128, 128, 3)

    (gray,) = _trait_dirs(synth_root, "gray16")
    raw = tifffile.imread(gray / "image.tif")
    assert raw.dtype == np.uint16 and raw.ndim == 2 and raw.max() > 255
    assert read_image(gray / "image.tif").shape == (128, 128, 3)

    (empty,) = _trait_dirs(synth_root, "empty")
    assert sorted(p.name for p in empty.iterdir()) == ["image.tif"]
    assert read_sample(empty, FOUR).masks.shape == (0, 128, 128)

    sparse_dirs = _trait_dirs(synth_root, "sparse_ids")
    assert sparse_dirs and set(sparse_dirs) == set(_trait_dirs(synth_root, "float64_masks"))
    for d in sparse_dirs:
        ids = []
        for f in sorted(d.glob("class*.tif")):
            assert tifffile.imread(f).dtype == np.float64
            ids += np.unique(read_label_image(f))[1:].tolist()
        assert min(ids) > 1 and max(ids) > len(ids)  # not starting at 1, with gaps

    manifest = json.loads((synth_root / MANIFEST).read_text())
    info = manifest["train"][rgba.name]
    sample = read_sample(rgba, FOUR)
    one = read_label_image(rgba / f"class{info['one_pixel']['class']}.tif") == info["one_pixel"]["id"]
    assert one.sum() == 1
    (j,) = [i for i, m in enumerate(sample.masks) if np.array_equal(m, one)]
    assert (sample.boxes[j, 2] - sample.boxes[j, 0], sample.boxes[j, 3] - sample.boxes[j, 1]) == (1, 1)
    multi = read_label_image(rgba / f"class{info['multi_piece']['class']}.tif") == info["multi_piece"]["id"]
    assert sum(np.array_equal(m, multi) for m in sample.masks) == 1  # two pieces, one instance
    assert _pieces(multi) >= 2


def _pieces(mask: np.ndarray) -> int:
    """Number of 8-connected components (plain flood fill; masks here are small)."""
    todo = set(zip(*np.nonzero(mask)))
    pieces = 0
    while todo:
        pieces += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (y + dy, x + dx) in todo:
                        todo.remove((y + dy, x + dx))
                        stack.append((y + dy, x + dx))
    return pieces


def test_test_set(synth_root: Path) -> None:
    images = list_test_images(synth_root)
    entries = read_id_entries(synth_root / "test_image_name_to_ids.json")
    assert sorted(e.file_name for e in entries) == [p.name for p in images]
    sizes = {(e.height, e.width) for e in entries}
    assert any(h != w for h, w in sizes) and min(min(s) for s in sizes) <= 48
    gt = load_coco_gt(synth_root / "test_annotations.json")
    by_name = {img["file_name"]: img for img in gt["images"]}
    for e in entries:
        assert by_name[e.file_name]["id"] == e.image_id
        assert read_image(synth_root / "test_release" / e.file_name).shape == (e.height, e.width, 3)
    assert gt["annotations"]
    union = {}
    for ann in gt["annotations"]:
        mask = decode_rle(ann["segmentation"])
        assert mask.sum() == ann["area"] > 0
        union.setdefault(ann["image_id"], []).append(mask)
    for masks in union.values():  # later-drawn cells own overlaps: masks are disjoint
        assert np.stack(masks).sum(axis=0).max() == 1


def test_deterministic_and_refuses_overwrite(tmp_path: Path, synth_root: Path) -> None:
    again = synthesize(tmp_path / "again", n_train=8, n_test=3, seed=0, size=128)
    files = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (synth_root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synthesize(tmp_path / "other", n_train=2, n_test=1, seed=1, size=64)
    assert sorted(p.name for p in (other / "train").iterdir()) != sorted(p.name for p in (again / "train").iterdir())

    with pytest.raises(OutputExistsError, match="not empty"):
        synthesize(again, n_train=1, n_test=1, seed=0, size=64)
    (again / "keep.txt").write_text("mine")
    synthesize(again, n_train=1, n_test=1, seed=3, size=64, force=True)
    assert len(list_sample_dirs(again)) == 1 and (again / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    with pytest.raises(InputError):
        synthesize(tmp_path / "bad", n_train=0, n_test=0, seed=0)


def test_crowded_scales_with_size(tmp_path: Path) -> None:
    root = synthesize(tmp_path / "c", n_train=1, n_test=0, seed=5, size=512, crowded=True)
    (d,) = list_sample_dirs(root)
    n = len(read_sample(d, FOUR).labels)
    # >= 300 cells on 1024 x 1024 means >= 75 on 512 x 512
    assert n >= 75
    sparse = synthesize(tmp_path / "n", n_train=1, n_test=0, seed=5, size=512)
    (d2,) = list_sample_dirs(sparse)
    assert len(read_sample(d2, FOUR).labels) < n
