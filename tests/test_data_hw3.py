import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.data.hw3 import (
    Sample,
    class_names_of,
    find_train_root,
    list_sample_dirs,
    list_test_images,
    read_id_entries,
    read_id_map,
    read_sample,
    sample_group,
    split_train_val,
)
from cellseg.errors import DataError, InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FOUR = ("class1", "class2", "class3", "class4")


def _write_sample(folder: Path, image: np.ndarray, classes: dict[int, np.ndarray], **kw) -> Path:
    folder.mkdir(parents=True)
    photometric = "rgb" if image.ndim == 3 else "minisblack"
    tifffile.imwrite(folder / "image.tif", image, photometric=photometric, **kw)
    for k, labels in classes.items():
        tifffile.imwrite(folder / f"class{k}.tif", labels)
    return folder


def _image(h: int = 12, w: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_awkward_sample(tmp_path: Path) -> None:
    rgba = np.concatenate([_image(), np.full((12, 16, 1), 255, np.uint8)], axis=2)
    c1 = np.zeros((12, 16), np.float64)
    c1[0, 0] = 7  # 1-pixel instance, sparse id
    c1[2:4, 2:5] = 9
    c1[8:10, 12:14] = 9  # second piece of id 9: still one instance
    c3 = np.zeros((12, 16), np.float64)
    c3[5:7, 6:11] = 40
    d = _write_sample(tmp_path / "train" / "s1", rgba, {1: c1, 3: c3}, compression="lzw")
    sample = read_sample(d, FOUR)
    assert isinstance(sample, Sample) and sample.sample_id == "s1"
    assert sample.image.shape == (12, 16, 3) and sample.image.dtype == np.float32
    np.testing.assert_allclose(sample.image, rgba[:, :, :3] / 255.0, atol=1e-6)
    assert sample.masks.shape == (3, 12, 16) and sample.masks.dtype == bool
    assert sample.labels.dtype == np.int64 and sample.labels.tolist() == [1, 1, 3]
    assert sample.boxes.dtype == np.float32
    assert sample.boxes.tolist() == [[0, 0, 1, 1], [2, 2, 14, 10], [6, 5, 11, 7]]
    np.testing.assert_array_equal(sample.masks[0], c1 == 7)
    np.testing.assert_array_equal(sample.masks[1], c1 == 9)
    np.testing.assert_array_equal(sample.masks[2], c3 == 40)
    assert class_names_of(tmp_path) == ("class1", "class2", "class3")
    assert class_names_of(tmp_path / "train") == ("class1", "class2", "class3")


def test_empty_and_gray16_samples(tmp_path: Path) -> None:
    _write_sample(tmp_path / "b_empty", _image(), {})
    gray = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 50
    _write_sample(tmp_path / "a_gray", gray, {2: np.zeros((12, 16), np.uint16)})
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "no_image_dir").mkdir()
    assert find_train_root(tmp_path) == tmp_path
    dirs = list_sample_dirs(tmp_path)
    assert [d.name for d in dirs] == ["a_gray", "b_empty"]
    assert class_names_of(tmp_path) == ("class1", "class2")
    for d in dirs:
        sample = read_sample(d, ("class1", "class2"))
        assert sample.masks.shape == (0, 12, 16)
        assert sample.labels.shape == (0,) and sample.boxes.shape == (0, 4)
    gray_image = read_sample(dirs[0], ("class1", "class2")).image
    assert gray_image.shape == (12, 16, 3) and gray_image.max() == 1.0


def test_bad_samples(tmp_path: Path) -> None:
    labels = np.zeros((12, 16), np.uint16)
    labels[1, 1] = 1
    d = _write_sample(tmp_path / "shape", _image(), {1: labels[:11]})
    with pytest.raises(DataError, match=r"class1.tif: mask shape \(11, 16\) differs from image shape \(12, 16\)"):
        read_sample(d, FOUR)
    for bad in ("classA.tif", "class0.tif", "class01.tif"):
        d = _write_sample(tmp_path / bad.replace(".", "_"), _image(), {1: labels})
        (d / bad).write_bytes((d / "class1.tif").read_bytes())
        with pytest.raises(DataError, match=f"{bad}: unexpected class file name"):
            read_sample(d, FOUR)
    d = _write_sample(tmp_path / "frac", _image(), {2: labels + 0.5})
    with pytest.raises(DataError, match="class2.tif: label image has non-integer ids"):
        read_sample(d, FOUR)
    d = _write_sample(tmp_path / "neg", _image(), {2: -labels.astype(np.int32)})
    with pytest.raises(DataError, match="class2.tif: label image has negative ids"):
        read_sample(d, FOUR)
    d = _write_sample(tmp_path / "k5", _image(), {5: labels})
    with pytest.raises(DataError, match="class5.tif: class 5 but the data set has 4 classes"):
        read_sample(d, FOUR)
    d = _write_sample(tmp_path / "corrupt", _image(), {1: labels})
    (d / "image.tif").write_bytes((d / "image.tif").read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt/image.tif: cannot read image"):
        read_sample(d, FOUR)


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        find_train_root(tmp_path / "nope")
    with pytest.raises(DataError, match="no train/ folder"):
        find_train_root(tmp_path)
    (tmp_path / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no sample folders"):
        list_sample_dirs(tmp_path)
    (tmp_path / "train" / "x" / "class1.tif").write_bytes(b"")
    with pytest.raises(DataError, match="x: has class files but no image.tif"):
        list_sample_dirs(tmp_path)


def test_many_instances_on_large_image(tmp_path: Path) -> None:
    # 800 instances on 1000 x 1000: read via one argsort, boxes exact
    labels = np.zeros((1000, 1000), np.uint16)
    ids = np.random.default_rng(2).permutation(np.arange(5, 5 + 800))
    for i, inst in enumerate(ids):
        r, c = divmod(i, 40)
        labels[r * 40 + 2 : r * 40 + 2 + 1 + i % 5, c * 25 : c * 25 + 3] = inst
    d = _write_sample(tmp_path / "big", _image(1000, 1000), {4: labels}, compression="zlib")
    sample = read_sample(d, FOUR)
    assert sample.masks.shape == (800, 1000, 1000)
    assert np.all(sample.labels == 4)
    order = np.sort(ids)
    for j in (0, 399, 799):
        np.testing.assert_array_equal(sample.masks[j], labels == order[j])
        rows, cols = np.nonzero(labels == order[j])
        assert sample.boxes[j].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_test_images_and_id_map(tmp_path: Path) -> None:
    (tmp_path / "test_release").mkdir()
    for name in ("b.tif", "a.tif", "c.png"):
        (tmp_path / "test_release" / name).write_bytes(b"x")
    (tmp_path / "test_release" / "readme.txt").write_text("x")
    assert [p.name for p in list_test_images(tmp_path)] == ["a.tif", "b.tif", "c.png"]
    assert [p.name for p in list_test_images(tmp_path / "test_release")] == ["a.tif", "b.tif", "c.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        list_test_images(tmp_path / "empty")
    with pytest.raises(DataError, match="test image folder not found"):
        list_test_images(tmp_path / "nope")
    good = [{"file_name": "a.tif", "id": 1, "height": 5, "width": 6}, {"file_name": "b.tif", "id": 7, "height": 5, "width": 6}]
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(good))
    assert read_id_map(path) == {"a.tif": 1, "b.tif": 7}
    assert read_id_entries(path)[1].height == 5
    bad_cases = {
        "{not json": "not valid JSON",
        json.dumps({"a.tif": 1}): "expected a JSON list",
        json.dumps([1]): "entry 0 is not an object",
        json.dumps([{"file_name": "a.tif", "id": 1}]): "entry 0 lacks height, width",
        json.dumps([{"file_name": "a.tif", "id": "1", "height": 5, "width": 6}]): "must be non-negative integers",
        json.dumps(good + [{"file_name": "a.tif", "id": 9, "height": 5, "width": 6}]): "duplicate file_name a.tif",
        json.dumps(good + [{"file_name": "z.tif", "id": 7, "height": 5, "width": 6}]): "duplicate id 7",
    }
    for text, message in bad_cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=f"ids.json: .*{message}"):
            read_id_map(path)
    with pytest.raises(DataError, match="missing.json: id map file not found"):
        read_id_map(tmp_path / "missing.json")


def test_sample_group() -> None:
    assert sample_group("consep_train_1_000") == "consep_train_1"
    assert sample_group("consep_test_11_015") == "consep_test_11"
    assert sample_group("sample-image") == "sample-image"
    assert sample_group("abc_12") == "abc"
    assert sample_group("123") == "123"


def test_split_train_val_by_group() -> None:
    ids = [f"tile_{t}_{p:03d}" for t in range(10) for p in range(1 + t % 4)] + ["lonely"]
    for seed in range(5):
        train, val = split_train_val(ids, 0.25, seed)
        assert sorted(train + val) == sorted(ids)
        assert not {sample_group(s) for s in train} & {sample_group(s) for s in val}
        assert 0.1 * len(ids) <= len(val) <= 0.4 * len(ids)
        assert (train, val) == split_train_val(list(reversed(ids))[::-1], 0.25, seed)
    assert split_train_val(ids, 0.0, 0) == (ids, [])
    assert len(split_train_val(["a_1", "b_1"], 0.01, 0)[1]) == 1
    assert split_train_val(["a_1", "b_1"], 0.9, 0)[0]  # train never emptied
    assert split_train_val(["a_1", "a_2"], 0.5, 0) == (["a_1", "a_2"], [])  # one group
    with pytest.raises(InputError):
        split_train_val(ids, 1.0, 0)


def _clustered_tiles() -> tuple[list[str], dict[str, np.ndarray]]:
    """Twelve tiles of four crops; classes cluster by tile as in histology (each tile holds one
    or two of the four classes), so a split by sample count alone often misses a class."""
    layout = [(1, 0, 0, 0), (0, 9, 0, 0), (0, 8, 0, 2), (0, 0, 7, 0), (0, 0, 6, 3), (0, 0, 0, 9),
              (0, 5, 0, 5), (0, 0, 9, 0), (2, 0, 0, 6), (0, 7, 0, 0), (0, 0, 0, 8), (0, 6, 4, 0)]
    ids, counts = [], {}
    for t, per_crop in enumerate(layout):
        for crop in range(4):
            sid = f"tile_{t}_{crop:03d}"
            ids.append(sid)
            counts[sid] = np.array(per_crop)
    return ids, counts


def _val_share(val: list[str], counts: dict[str, np.ndarray]) -> np.ndarray:
    return sum((counts[s] for s in val), np.zeros(4)) / sum(counts.values())


def test_stratified_split_puts_every_class_in_val() -> None:
    ids, counts = _clustered_tiles()
    misses = 0
    for seed in range(20):
        train, val = split_train_val(ids, 0.25, seed, counts)
        assert sorted(train + val) == sorted(ids)
        assert not {sample_group(s) for s in train} & {sample_group(s) for s in val}
        share = _val_share(val, counts)
        assert np.all(share > 0) and np.all(share < 1), (seed, share)
        assert (train, val) == split_train_val(ids, 0.25, seed, counts)  # deterministic
        misses += bool(np.any(_val_share(split_train_val(ids, 0.25, seed)[1], counts) == 0))
    assert misses > 0  # the layout does defeat the count-only split, so the check above means something


def test_stratified_split_keeps_a_one_tile_class_in_training() -> None:
    ids, counts = _clustered_tiles()
    for seed in range(20):
        train, val = split_train_val(ids, 0.25, seed, counts)
        assert np.all(sum((counts[s] for s in train), np.zeros(4)) > 0)
    # a class found in one tile only never leaves training, whatever the seed
    without_tile_8 = ids[:32] + ids[36:]
    for seed in range(20):
        train, _ = split_train_val(without_tile_8, 0.4, seed, counts)
        assert set(ids[:4]) <= set(train)


def test_stratified_split_tracks_each_class_share() -> None:
    rng = np.random.default_rng(7)
    ids = [f"t_{t}_{c}" for t in range(40) for c in range(int(rng.integers(2, 6)))]
    weights = {f"t_{t}": rng.dirichlet(np.full(4, 0.5)) * rng.integers(5, 60) for t in range(40)}
    counts = {s: np.round(weights[sample_group(s)]).astype(int) for s in ids}
    train, val = split_train_val(ids, 0.2, 3, counts)
    share = _val_share(val, counts)
    assert np.all(np.abs(share - 0.2) < 0.05), share
    assert abs(len(val) / len(ids) - 0.2) < 0.05


@pytest.mark.shared
def test_real_hw3_sample() -> None:
    root = SHARED / "hw3_sample"
    if not root.exists():
        pytest.skip("shared data absent")
    assert class_names_of(root) == ("class1", "class2")
    sample = read_sample(root / "train" / "sample-image", FOUR)
    assert sample.image.shape == (397, 482, 3)
    assert int((sample.labels == 1).sum()) == 2 and int((sample.labels == 2).sum()) == 159
    assert sample.masks.shape == (161, 397, 482)
    widths = sample.boxes[:, 2] - sample.boxes[:, 0]
    assert widths.min() >= 1
    ids = read_id_map(root / "test_image_name_to_ids.json")
    assert len(ids) == 101


@pytest.mark.shared
def test_real_consep_samples() -> None:
    root = SHARED / "consep"
    if not root.exists():
        pytest.skip("shared data absent")
    dirs = list_sample_dirs(root)
    assert len(dirs) == 475
    assert class_names_of(root) == FOUR
    for d in dirs[:3]:
        sample = read_sample(d, FOUR)
        assert sample.image.shape == (256, 256, 3)
        assert len(sample.labels) > 0 and set(sample.labels.tolist()) <= {1, 2, 3, 4}
        assert np.all(sample.boxes[:, 2:] > sample.boxes[:, :2])
        assert np.all(sample.masks.reshape(len(sample.labels), -1).any(axis=1))
    train, val = split_train_val([d.name for d in dirs], 0.2, 0)
    assert not {sample_group(s) for s in train} & {sample_group(s) for s in val}


def test_class_masks_in_png_are_read_and_lossy_ones_refused(tmp_path: Path) -> None:
    """class1.png next to image.tif was silently ignored: its instances count now."""
    from PIL import Image

    d = tmp_path / "train" / "s"
    d.mkdir(parents=True)
    tifffile.imwrite(d / "image.tif", np.zeros((10, 12, 3), np.uint8), photometric="rgb")
    labels = np.zeros((10, 12), np.uint8)
    labels[1:3, 1:3], labels[6:9, 6:8] = 1, 4
    Image.fromarray(labels).save(d / "class2.png")
    tifffile.imwrite(d / "class1.tiff", (labels > 0).astype(np.uint8))
    names = class_names_of(tmp_path)
    sample = read_sample(d, names)
    assert names == ("class1", "class2") and list(sample.labels) == [1, 2, 2]
    (d / "class3.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DataError, match="class3.jpg: unexpected class file name.*lossless"):
        class_names_of(tmp_path)
    (d / "class3.jpg").unlink()
    Image.fromarray(labels).save(d / "class1.png")
    with pytest.raises(DataError, match="class1.tiff: a second mask file for class 1"):
        class_names_of(tmp_path)
