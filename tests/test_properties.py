"""Property tests: whatever TIFF, PNG, results or GT JSON a user hands over, cellseg either reads
it correctly or raises one of its own errors (a CellsegError with a one-line message naming the
file). Example counts are modest so the default run stays fast on 2 cores."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cellseg.data.coco import encode_mask, load_coco_gt
from cellseg.data.images import read_image, read_label_image
from cellseg.errors import CellsegError
from cellseg.evaluate import evaluate_coco, load_results

# 40 examples each in the default run; CELLSEG_HYPOTHESIS_EXAMPLES=2000 for a deeper search.
SETTINGS = settings(max_examples=int(os.environ.get("CELLSEG_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_]


def _one_line_naming(err: CellsegError, path: Path) -> None:
    assert "\n" not in str(err) and path.name in str(err), str(err)


def _read_both(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """read_image and read_label_image; each either returns or raises a CellsegError."""
    out = []
    for reader in (read_image, read_label_image):
        try:
            out.append(reader(path))
        except CellsegError as err:
            _one_line_naming(err, path)
            out.append(None)
    return out[0], out[1]


def _check_image(image: np.ndarray | None, height: int, width: int) -> None:
    if image is not None:
        assert image.shape == (height, width, 3) and image.dtype == np.float32
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


@st.composite
def tiff_arrays(draw):
    """An array and tifffile.imwrite options: size-1 axes, planar / contiguous samples, extra
    leading axes, every common dtype and photometric."""
    dtype = draw(st.sampled_from(DTYPES))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["YX", "YXS", "SYX", "QYX", "QYXS"]))
    samples = draw(st.sampled_from([1, 2, 3, 4, 5]))
    pages = draw(st.sampled_from([1, 1, 2]))
    shape = {"YX": (height, width), "YXS": (height, width, samples), "SYX": (samples, height, width),
             "QYX": (pages, height, width), "QYXS": (pages, height, width, samples)}[layout]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    array = (rng.random(shape) * draw(st.sampled_from([1, 255, 70000]))).astype(dtype)
    kwargs = {}
    photometric = draw(st.sampled_from([None, "minisblack", "miniswhite", "rgb", "palette"]))
    if photometric is not None:
        kwargs["photometric"] = photometric
    if photometric == "palette":
        kwargs["colormap"] = rng.integers(0, 65535, (3, 256)).astype(np.uint16)
    if layout in ("SYX", "YXS") and photometric in ("rgb", "minisblack"):
        kwargs["planarconfig"] = "separate" if layout == "SYX" else "contig"
    kwargs["compression"] = draw(st.sampled_from([None, "zlib"]))
    return array, layout, (height, width), kwargs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@SETTINGS
@given(spec=tiff_arrays())
def test_any_tiff_is_read_with_its_own_axes_or_refused(spec, tmp_path: Path) -> None:
    array, layout, (height, width), kwargs = spec
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "x.tif"
    try:
        tifffile.imwrite(path, array, **kwargs)
    except Exception:  # an option combination tifffile itself refuses to write
        assume(False)
    image, labels = _read_both(path)
    with tifffile.TiffFile(path) as tif:
        axes, shape = tif.series[0].axes, tif.series[0].shape
    # tifffile's writer may store an array differently than asked (a trailing axis of 2 becomes
    # X, not samples): the file's own axes say what H and W are, and the reader must keep them.
    if len(set(axes)) == len(axes) and "Y" in axes and "X" in axes:
        declared = (shape[axes.index("Y")], shape[axes.index("X")])
        _check_image(image, *declared)
        if labels is not None:
            assert labels.shape == declared and labels.dtype == np.int64
    # the known misread: a 1-pixel-high RGB image kept its height
    if layout == "YXS" and kwargs.get("photometric") == "rgb" and array.shape[2] == 3 and image is not None:
        assert image.shape[:2] == (height, width)


@SETTINGS
@given(height=st.integers(1, 4), width=st.integers(1, 4), rgb=st.booleans())
def test_one_pixel_axes_are_never_squeezed(height: int, width: int, rgb: bool, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "x.tif"
    shape = (height, width, 3) if rgb else (height, width)
    tifffile.imwrite(path, np.full(shape, 200, np.uint8), photometric="rgb" if rgb else "minisblack")
    image = read_image(path)
    assert image.shape == (height, width, 3)
    np.testing.assert_allclose(image, 200 / 255, atol=1e-6)


@SETTINGS
@given(data=st.data())
def test_damaged_tiff_bytes_only_raise_cellseg_errors(data, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "x.tif"
    tifffile.imwrite(path, np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3), photometric="rgb")
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(4, len(raw)))
    path.write_bytes(bytes(raw[:cut]))
    image, labels = _read_both(path)
    if image is not None:
        assert image.ndim == 3 and image.shape[2] == 3 and np.isfinite(image).all()


@SETTINGS
@given(height=st.integers(1, 5), width=st.integers(1, 5),
       mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "I;16", "1", "I", "F"]), cut=st.booleans())
def test_any_png_is_read_or_refused(height: int, width: int, mode: str, cut: bool, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "x.png"
    img = Image.new(mode, (width, height))
    try:
        img.save(path)
    except OSError:
        assume(False)
    if cut:
        path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 2)])
    image, _ = _read_both(path)
    if not cut:
        _check_image(image, height, width)


# ---------------------------------------------------------------------------- JSON inputs
def _gt(height: int = 8, width: int = 9) -> dict:
    mask = np.zeros((height, width), bool)
    mask[1:4, 2:5] = True
    return {"images": [{"id": 1, "file_name": "a.tif", "height": height, "width": width}],
            "categories": [{"id": 1, "name": "c1"}, {"id": 2, "name": "c2"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": encode_mask(mask),
                             "area": 9, "bbox": [2, 1, 3, 3], "iscrowd": 0}]}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

counts_strings = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=130), max_size=16)


@st.composite
def result_entries(draw):
    """Results that look almost right: plausible keys with random or garbage values."""
    entry = {"image_id": draw(st.sampled_from([1, 1, 2, "1", None])),
             "category_id": draw(st.sampled_from([1, 2, 3, 1.0])),
             "score": draw(st.sampled_from([0.9, 0.1, -1.0, float("nan"), "high"]))}
    if draw(st.booleans()):
        size = draw(st.sampled_from([[8, 9], [9, 8], [8], [0, 0], "8x9", [8, -9]]))
        counts = draw(st.one_of(counts_strings, st.just(encode_mask(np.ones((8, 9), bool))["counts"]),
                                st.lists(st.integers(-2, 80), max_size=4)))
        entry["segmentation"] = draw(st.sampled_from([{"size": size, "counts": counts}, {"counts": counts}, []]))
    if draw(st.booleans()):
        entry["bbox"] = draw(st.sampled_from([[1, 1, 2, 2], [1, 2], ["a", 1, 1, 1], [0, 0, -1, 5]]))
    return entry


def _load_and_evaluate(path: Path, gt: dict) -> None:
    try:
        results = load_results(path)
        evaluate_coco(gt, results, source=str(path))
    except CellsegError as err:
        _one_line_naming(err, path)


@SETTINGS
@given(value=json_values)
def test_any_json_value_as_results(value, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "results.json"
    path.write_text(json.dumps(value))
    _load_and_evaluate(path, _gt())


@SETTINGS
@given(entries=st.lists(result_entries(), max_size=4))
def test_almost_right_results(entries, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "results.json"
    path.write_text(json.dumps(entries))
    _load_and_evaluate(path, _gt())


@SETTINGS
@given(raw=st.binary(max_size=64))
def test_any_bytes_as_results(raw: bytes, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "results.json"
    path.write_bytes(raw)
    _load_and_evaluate(path, _gt())


@st.composite
def gt_dicts(draw):
    """A valid GT with one field replaced by a random value or a garbage RLE."""
    gt = _gt()
    section = draw(st.sampled_from(["images", "annotations", "categories"]))
    item = gt[section][0]
    key = draw(st.sampled_from(sorted(item)))
    item[key] = draw(st.one_of(json_values, counts_strings,
                               st.fixed_dictionaries({"size": st.just([8, 9]), "counts": counts_strings})))
    if draw(st.booleans()):
        gt = draw(st.sampled_from([gt, [gt], {"images": gt["images"]}]))
    return gt


@SETTINGS
@given(gt=gt_dicts())
def test_any_gt_json(gt, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "gt.json"
    path.write_text(json.dumps(gt))
    results = [{"image_id": 1, "category_id": 1, "score": 0.5,
                "segmentation": encode_mask(np.ones((8, 9), bool))}]
    try:
        loaded = load_coco_gt(path)
    except CellsegError as err:
        _one_line_naming(err, path)
        return
    try:
        evaluate_coco(loaded, results)
    except CellsegError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize("counts", ["", "0", "~", "0000000000000000", "PPPPPPPPPPPPPPPPPPP1", "1?"])
def test_garbage_counts_in_gt_are_refused(counts: str, tmp_path: Path) -> None:
    gt = _gt()
    gt["annotations"][0]["segmentation"]["counts"] = counts
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(CellsegError, match=r"gt.json: annotations\[0\]"):
        load_coco_gt(path)
