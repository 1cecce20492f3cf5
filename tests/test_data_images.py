from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.data.images import IMAGE_RULE, read_image, read_label_image
from cellseg.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rule_is_named() -> None:
    assert IMAGE_RULE == "rgb01-v1"


def test_uint8_rgb_tif_png_jpg(tmp_path: Path) -> None:
    rgb = _rgb()
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="rgb")
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    for name in ("a.tif", "a.png"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.float32 and out.shape == (20, 30, 3)
        np.testing.assert_allclose(out, rgb / 255.0, atol=1e-6)
    jpg = read_image(tmp_path / "a.jpg")
    assert jpg.shape == (20, 30, 3) and 0.0 <= jpg.min() and jpg.max() <= 1.0


def test_rgba_lzw_drops_alpha(tmp_path: Path) -> None:
    rgb = _rgb()
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", compression="lzw")
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), rgb / 255.0, atol=1e-6)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), rgb / 255.0, atol=1e-6)


def test_gray_and_planar(tmp_path: Path) -> None:
    gray = _rgb()[:, :, 0]
    tifffile.imwrite(tmp_path / "g.tif", gray)
    tifffile.imwrite(tmp_path / "g1.tif", gray[:, :, None], photometric="minisblack")
    Image.fromarray(gray).save(tmp_path / "g.png")
    for name in ("g.tif", "g1.tif", "g.png"):
        out = read_image(tmp_path / name)
        assert out.shape == (20, 30, 3)
        for c in range(3):
            np.testing.assert_allclose(out[:, :, c], gray / 255.0, atol=1e-6)
    rgb = _rgb()
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "p.tif"), rgb / 255.0, atol=1e-6)


def test_uint16_is_percentile_stretched(tmp_path: Path) -> None:
    gray = np.linspace(1000, 3000, 100 * 100).reshape(100, 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", gray, compression="zlib")
    out = read_image(tmp_path / "g16.tif")
    assert out.shape == (100, 100, 3) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.45 < out[50, 50, 0] < 0.55  # middle of the ramp
    assert np.all(np.diff(out[:, :, 0].ravel()) >= 0)  # monotone


def test_float_images(tmp_path: Path) -> None:
    unit = np.random.default_rng(1).random((10, 12, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", unit, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "f.tif"), unit)  # [0, 1] floats kept
    tifffile.imwrite(tmp_path / "c.tif", np.full((10, 12), 5.0))
    assert np.all(read_image(tmp_path / "c.tif") == 0.0)  # constant out of [0,1] -> zeros
    bad = unit.copy()
    bad[0, 0, 0] = np.nan
    tifffile.imwrite(tmp_path / "n.tif", bad, photometric="rgb")
    with pytest.raises(DataError, match="n.tif.*NaN"):
        read_image(tmp_path / "n.tif")


@pytest.mark.filterwarnings("ignore:.*zero-size array")
def test_bad_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.tif: file not found"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "zero.tif").write_bytes(b"")
    with pytest.raises(DataError, match="zero.tif: empty file"):
        read_image(tmp_path / "zero.tif")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 50)
    with pytest.raises(DataError, match="junk.tif"):
        read_image(tmp_path / "junk.tif")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.png: cannot read image"):
        read_image(tmp_path / "junk.png")
    for compression in (None, "lzw", "zlib"):
        tifffile.imwrite(tmp_path / "full.tif", _rgb(64, 64), photometric="rgb", compression=compression)
        data = (tmp_path / "full.tif").read_bytes()
        (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match="trunc.tif: cannot read image"):
            read_image(tmp_path / "trunc.tif")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.png: cannot read image"):
        read_image(tmp_path / "trunc.png")
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((10, 10, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(DataError, match="two.tif: unsupported number of channels 2"):
        read_image(tmp_path / "two.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((6, 10, 10), np.uint8))
    with pytest.raises(DataError, match="stack.tif: unsupported image shape"):
        read_image(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 5), np.uint8))
    with pytest.raises(DataError, match="empty.tif"):
        read_image(tmp_path / "empty.tif")
    tifffile.imwrite(tmp_path / "cplx.tif", np.zeros((4, 4), np.complex64))
    with pytest.raises(DataError, match="cplx.tif: unsupported pixel type"):
        read_image(tmp_path / "cplx.tif")


def test_label_images(tmp_path: Path) -> None:
    labels = np.zeros((8, 9), np.float64)
    labels[1:3, 1:3] = 3
    labels[5, 5] = 10
    tifffile.imwrite(tmp_path / "f64.tif", labels)
    out = read_label_image(tmp_path / "f64.tif")
    assert out.dtype == np.int64 and out.shape == (8, 9)
    np.testing.assert_array_equal(out, labels.astype(np.int64))
    for dtype in (np.uint8, np.uint16, np.int32, np.uint32, np.float32):
        tifffile.imwrite(tmp_path / "x.tif", labels.astype(dtype))
        np.testing.assert_array_equal(read_label_image(tmp_path / "x.tif"), out)
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_label_image(tmp_path / "x.png"), out)

    frac = labels.copy()
    frac[0, 0] = 1.5
    tifffile.imwrite(tmp_path / "frac.tif", frac)
    with pytest.raises(DataError, match="frac.tif: label image has non-integer ids"):
        read_label_image(tmp_path / "frac.tif")
    neg = labels.astype(np.int16)
    neg[0, 0] = -1
    tifffile.imwrite(tmp_path / "neg.tif", neg)
    with pytest.raises(DataError, match="neg.tif: label image has negative ids"):
        read_label_image(tmp_path / "neg.tif")
    tifffile.imwrite(tmp_path / "negf.tif", -labels)
    with pytest.raises(DataError, match="negf.tif: label image has negative ids"):
        read_label_image(tmp_path / "negf.tif")
    nan = labels.copy()
    nan[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(DataError, match="nan.tif: label image contains NaN"):
        read_label_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(DataError, match="rgb.tif: label image has shape"):
        read_label_image(tmp_path / "rgb.tif")


@pytest.mark.shared
def test_real_sample_image() -> None:
    path = SHARED / "hw3_sample" / "train" / "sample-image" / "image.tif"
    if not path.exists():
        pytest.skip("shared data absent")
    image = read_image(path)
    assert image.shape == (397, 482, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    labels = read_label_image(path.parent / "class2.tif")
    assert labels.shape == (397, 482) and len(np.unique(labels)) == 160


# ---- axes from the file's own metadata, never guessed
@pytest.mark.parametrize("shape, kwargs, expected", [
    ((1, 1, 3), {"photometric": "rgb"}, (1, 1, 3)),  # one pixel high: the height axis stays
    ((1, 7, 3), {"photometric": "rgb"}, (1, 7, 3)),
    ((5, 1), {"photometric": "minisblack"}, (5, 1, 3)),
    ((3, 1, 6), {"photometric": "rgb", "planarconfig": "separate"}, (1, 6, 3)),  # 'SYX'
    ((1, 4, 6, 3), {"photometric": "rgb"}, (4, 6, 3)),  # 'QYXS' with one page
])
def test_size_one_axes_are_kept_or_dropped_by_name(tmp_path: Path, shape, kwargs, expected) -> None:
    data = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    tifffile.imwrite(tmp_path / "a.tif", data, **kwargs)
    assert read_image(tmp_path / "a.tif").shape == expected


def test_imagej_channel_axis_is_read_and_stacks_are_refused(tmp_path: Path) -> None:
    rgb = _rgb(6, 7)
    tifffile.imwrite(tmp_path / "c.tif", np.moveaxis(rgb, 2, 0).copy(), imagej=True, metadata={"axes": "CYX"})
    np.testing.assert_allclose(read_image(tmp_path / "c.tif"), rgb / 255.0, atol=1e-6)
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((3, 6, 7), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match="z.tif: .*stack of 3 images along the depth axis 'Z'"):
        read_image(tmp_path / "z.tif")
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((2, 6, 7, 3), np.uint8), photometric="rgb")
    with pytest.raises(DataError, match="t.tif: .*stack of 2 images"):
        read_label_image(tmp_path / "t.tif")


def test_photometric_is_honoured(tmp_path: Path) -> None:
    gray = _rgb()[:, :, 0]
    tifffile.imwrite(tmp_path / "w.tif", gray, photometric="miniswhite")
    np.testing.assert_allclose(read_image(tmp_path / "w.tif")[:, :, 0], (255 - gray) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(read_label_image(tmp_path / "w.tif"), gray)  # ids stay ids
    colormap = np.zeros((3, 256), np.uint16)
    colormap[0, 5] = 65535  # index 5 is pure red
    tifffile.imwrite(tmp_path / "p.tif", np.full((4, 4), 5, np.uint8), photometric="palette", colormap=colormap)
    np.testing.assert_allclose(read_image(tmp_path / "p.tif")[0, 0], [1.0, 0.0, 0.0])
    tifffile.imwrite(tmp_path / "k.tif", np.zeros((4, 4, 4), np.uint8), photometric="separated")
    with pytest.raises(DataError, match="k.tif: unsupported TIFF photometric"):
        read_image(tmp_path / "k.tif")


def _forge_size(path: Path, width: int, height: int) -> None:
    """Rewrite the ImageWidth / ImageLength tags of a small classic TIFF in place."""
    import struct

    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offsets = {tag.name: tag.offset for tag in tif.pages[0].tags.values()}
    struct.pack_into("<I", raw, offsets["ImageWidth"] + 8, width)
    struct.pack_into("<I", raw, offsets["ImageLength"] + 8, height)
    path.write_bytes(bytes(raw))


def test_huge_declared_size_is_refused_before_reading(tmp_path: Path) -> None:
    from cellseg.data.images import MAX_IMAGE_PIXELS

    tifffile.imwrite(tmp_path / "huge.tif", np.zeros((8, 8), np.uint8))
    _forge_size(tmp_path / "huge.tif", 100_000, 100_000)
    for reader in (read_image, read_label_image):
        with pytest.raises(DataError, match=r"huge.tif: image declares 100000 x 100000 = 10,000,000,000 pixels.*tiled"):
            reader(tmp_path / "huge.tif")
    assert MAX_IMAGE_PIXELS == 16384 ** 2


def test_huge_png_header_is_refused_before_decoding(tmp_path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)  # 400 M gray pixels, no data
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"huge.png: image declares 20000 x 20000"):
        read_image(tmp_path / "huge.png")
